"""Checkpoints: the train state and the input position, saved as one unit.

A thin layer over `orbax.checkpoint.CheckpointManager`. Each checkpoint is a
step directory `<directory>/<step>/` with two items:

  state: any pytree of arrays (params, opt_state, step, rng, batch_stats...),
    written by `StandardSave` (tensorstore/OCDBT, one array per leaf);
  data: the input pipeline's position, a JSON dict, written by `JsonSave`.

Saving is asynchronous: `save` returns once the arrays are copied off the
device, and the files are written in a background thread. `restore`,
`wait_until_finished` and `close` wait for any save still in flight.

Restores are strict: the template must have the tree structure, shapes and
dtypes that were saved, else a `ValueError` names the first leaves that
differ (orbax alone would silently cast dtypes). To change a dtype, restore
first and cast afterwards.

A flax `TrainState` can be passed as it is: `apply_fn` and `tx` are static
fields, so only `step`, `params` and `opt_state` are saved, and the restored
state takes `apply_fn` and `tx` from the template. Make `step` an int32 array
(`jnp.asarray(0, jnp.int32)`) rather than the python int that
`TrainState.create` puts there, so that it keeps its dtype. Random keys may be
raw `jax.random.key_data` (uint32) arrays or typed `jax.random.key` arrays.
NumPy scalars (`np.float32(1)`) are not allowed as template leaves; use 0-d
arrays.

Integrity. Orbax writes a checkpoint into `<step>.orbax-checkpoint-tmp-<t>`
and renames it to `<step>` only when every item is written (with
`commit_success.txt` and `_CHECKPOINT_METADATA` inside), so a killed write
leaves a tmp directory, never a half-written `<step>`. Opening a
`Checkpointer` removes such leftovers (`cleanup_tmp_directories=True`) and
lists them in `unfinished_writes`. Each checkpoint also holds a third item,
`fingerprint`: per leaf of the state a 32-bit weighted sum of its bits, and
the SHA-256 of the data state. Tensorstore notices a truncated or replaced
array file, but not a byte changed inside one (that restores silently wrong
values); the fingerprint does. `restore_newest_good` restores the newest
checkpoint that passes every check and moves each newer bad one aside, to
`<step>.corrupt` (never deleting it); when none passes it raises
`NoGoodCheckpointError` and moves nothing.

Typical use in a trainer:

  ckpt = Checkpointer(f"{workdir}/checkpoints", max_to_keep=2,
                      save_interval_steps=500, keep_steps=(100, 200))
  if ckpt.latest_step() is not None:
    state, data_state = ckpt.restore(abstract_state)  # ShapeDtypeStructs
  for step in ...:
    ...
    ckpt.save(step, state, loader.get_state())
  ckpt.save(step, state, loader.get_state(), force=True)
  ckpt.close()
"""

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

# orbax-checkpoint 0.12.8, on a local file system (AtomicRenameTemporaryPath,
# orbax/checkpoint/_src/path/temporary_paths.py and atomicity.py):
# `cleanup_tmp_directories=True` removes, when the manager is created, the
# entries of the checkpoint directory that are directories (not symlinks)
# whose name contains this suffix: unfinished writes. A finished checkpoint
# was renamed to `<step>` after its last file was written and never carries
# the suffix, so it is never removed; neither is a `<step>.corrupt` that
# `restore_newest_good` set aside. (On GCS orbax writes in place and marks a
# finished step with commit_success.txt instead; there the cleanup removes a
# step directory without one.)
TMP_DIR_SUFFIX = ".orbax-checkpoint-tmp"
# What a finished step directory holds besides its items.
_COMMIT_FILE = "commit_success.txt"
_METADATA_FILE = "_CHECKPOINT_METADATA"
_FINGERPRINT = "fingerprint"


class NoGoodCheckpointError(RuntimeError):
  """Every checkpoint of a directory failed its checks (see
  `Checkpointer.restore_newest_good`); the message names each and why."""


@dataclasses.dataclass(frozen=True)
class BadCheckpoint:
  """A checkpoint `restore_newest_good` skipped.

  Attributes:
    step: its step.
    path: where it was.
    reason: one line: what failed.
    moved_to: where it was moved ("" when it was left in place).
  """

  step: int
  path: str
  reason: str
  moved_to: str = ""


class Checkpointer:
  """Saves and restores (state, data_state) pairs in one directory."""

  def __init__(
    self,
    directory: str,
    *,
    max_to_keep: int,
    save_interval_steps: int,
    keep_steps: Sequence[int] = (),
  ):
    """Opens (or creates) a checkpoint directory.

    Args:
      directory: where step directories go. Relative paths are made absolute
        (orbax's tensorstore writer rejects relative ones).
      max_to_keep: how many of the most recent checkpoints to keep, besides
        those of `keep_steps`.
      save_interval_steps: `save` only writes steps that are a multiple of it
        or one of `keep_steps`.
      keep_steps: steps whose checkpoints are saved whatever the interval and
        never deleted by the max_to_keep cleanup (e.g. to compare routing at
        several points of a run).
    """
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep={max_to_keep} must be at least 1.")
    if save_interval_steps < 1:
      raise ValueError(
        f"save_interval_steps={save_interval_steps} must be at least 1."
      )
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_interval_steps = save_interval_steps
    self.keep_steps = frozenset(int(step) for step in keep_steps)
    if any(step < 0 for step in self.keep_steps):
      raise ValueError(
        f"keep_steps={sorted(self.keep_steps)} must hold steps >= 0."
      )
    # The latest max_to_keep checkpoints survive cleanup, and so does any
    # of keep_steps (orbax's preservation policies; the older max_to_keep
    # option would delete those too).
    policies = ocp.checkpoint_managers
    # What the cleanup below removes (see TMP_DIR_SUFFIX).
    self.unfinished_writes = _unfinished_writes(self.directory)
    options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy(
        [
          policies.LatestN(max_to_keep),
          policies.CustomSteps(sorted(self.keep_steps)),
        ]
      ),
      cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        _FINGERPRINT: ocp.JsonCheckpointHandler(),
      },
    )

  def all_steps(self) -> list[int]:
    """Returns the saved steps (including one still being written), sorted."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Returns the newest saved step, or None when there is none."""
    return self._manager.latest_step()

  def should_save(self, step: int, *, force: bool = False) -> bool:
    """Whether `save(step, ..., force=force)` would write a checkpoint: a
    trainer asks first, to check the state before it is saved."""
    if not force and step % self.save_interval_steps:
      if step not in self.keep_steps:
        return False
    return step not in self._manager.all_steps()

  def step_path(self, step: int) -> str:
    """The directory of the checkpoint of `step`."""
    return os.path.join(self.directory, str(step))

  def save(
    self, step: int, state: Any, data_state: dict, *, force: bool = False
  ) -> bool:
    """Starts saving `state` and `data_state` as the checkpoint of `step`.

    Args:
      step: the training step the state belongs to.
      state: a pytree of jax/numpy arrays (and python scalars).
      data_state: the input pipeline's position; must be JSON serialisable.
      force: save even when `step` is not a multiple of save_interval_steps
        (a step of keep_steps is saved without it).

    Returns:
      Whether a save was started. False when the interval says no, or when
      `step` is already saved (e.g. a forced final save right after the
      periodic one).
    """
    if not self.should_save(step, force=force):
      return False
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      **{_FINGERPRINT: ocp.args.JsonSave(fingerprint(state, data_state))},
    )
    # We already decided; orbax's own policy would also save the very first
    # step it sees, whatever the interval.
    return self._manager.save(step, args=args, force=True)

  def restore(
    self, state_template: Any, step: int | None = None
  ) -> tuple[Any, dict]:
    """Restores a checkpoint into the structure of `state_template`.

    Args:
      state_template: a pytree like the saved state: concrete arrays, or
        `jax.ShapeDtypeStruct`s (with `.sharding` to place the result; without
        one, arrays land on the default device). Shapes and dtypes must match
        the saved ones.
      step: which checkpoint; None means the latest.

    Returns:
      (state, data_state), state with the template's tree type and shardings.

    Raises:
      FileNotFoundError: there is no checkpoint (at `step`) in the directory.
      ValueError: the template's leaves, shapes or dtypes differ from the
        saved ones.
    """
    self._manager.wait_until_finished()
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoint to restore in {self.directory}.")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(
        f"No checkpoint for step={step} in {self.directory}; saved steps are "
        f"{steps}."
      )
    saved = self._manager.item_metadata(step)["state"]
    _check_template(state_template, getattr(saved, "tree", saved), step)
    items = {
      "state": ocp.args.StandardRestore(state_template),
      "data": ocp.args.JsonRestore(),
    }
    has_fingerprint = os.path.isdir(
      os.path.join(self.step_path(step), _FINGERPRINT)
    )
    if has_fingerprint:  # checkpoints written before moe_jax 0.x lack it
      items[_FINGERPRINT] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if has_fingerprint:
      _check_fingerprint(
        restored[_FINGERPRINT],
        fingerprint(restored["state"], restored["data"]),
        step,
      )
    return restored["state"], restored["data"]

  def restore_newest_good(
    self, state_template: Any
  ) -> tuple[Any, dict, int, list[BadCheckpoint]]:
    """Restores the newest checkpoint that passes every check.

    A checkpoint is bad when its step directory lacks `commit_success.txt`
    or a readable `_CHECKPOINT_METADATA`, when orbax or tensorstore fail to
    read it (a truncated, missing or garbled file) or when the restored
    state or data state differ from the fingerprint saved with them. The bad
    checkpoints newer than the one restored are moved aside, to
    `<step>.corrupt` (`<step>.corrupt.2`, ... if taken), so that the run
    saves those steps again; nothing is deleted.

    Args:
      state_template: as for `restore`.

    Returns:
      (state, data_state, step, bad): the step restored and the checkpoints
      skipped, newest first.

    Raises:
      FileNotFoundError: there is no checkpoint at all.
      NoGoodCheckpointError: every checkpoint is bad (a template that
        matches none, e.g. a changed model, ends here too); nothing was
        moved.
    """
    self._manager.wait_until_finished()
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoint to restore in {self.directory}.")
    bad = []
    for step in reversed(steps):
      try:
        _check_files(self.step_path(step))
        state, data_state = self.restore(state_template, step)
      except Exception as e:  # noqa: BLE001 - any failure makes it bad
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        bad.append(BadCheckpoint(step, self.step_path(step), reason[:300]))
        continue
      if jax.process_index() == 0:  # one process moves the shared files
        bad = [
          dataclasses.replace(b, moved_to=_move_aside(b.path)) for b in bad
        ]
      moved = bad
      if moved:
        self._manager.reload()
      return state, data_state, step, moved
    reasons = "; ".join(f"step {b.step}: {b.reason}" for b in bad)
    raise NoGoodCheckpointError(
      f"no usable checkpoint in {self.directory} ({reasons}). To start "
      f"again, delete the workdir or its checkpoints; to keep the run, restore "
      f"a good copy of a step directory; if the model's code changed, go "
      f"back to the code that wrote them."
    )

  def wait_until_finished(self):
    """Blocks until every save that was started is on disk."""
    self._manager.wait_until_finished()

  def close(self):
    """Waits for pending saves and releases orbax's background threads."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info):
    self.close()


def _check_template(template: Any, saved_tree: Any, step: int):
  """Raises ValueError unless `template` matches the saved leaves exactly.

  Leaves are matched by orbax's parameter names ("opt_state.0.mu.w"), so the
  comparison does not depend on how either side orders its leaves.
  """
  names = ocp.tree.get_param_names(template, include_empty_nodes=False)
  wanted = dict(
    zip(jax.tree.leaves(names), jax.tree.leaves(template), strict=True)
  )
  saved = {meta.name: meta for meta in jax.tree.leaves(saved_tree)}
  missing = sorted(set(wanted) - set(saved))
  extra = sorted(set(saved) - set(wanted))
  if missing or extra:
    raise ValueError(
      f"state_template does not match the checkpoint of step={step}: "
      f"{len(missing)} template leaves are not in the checkpoint, e.g. "
      f"{missing[:5]}; {len(extra)} saved leaves are not in the template, "
      f"e.g. {extra[:5]}."
    )
  for name, leaf in wanted.items():
    meta = saved[name]
    if isinstance(meta, ocp.metadata.ScalarMetadata):
      continue  # a saved python scalar has no dtype of its own to keep
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      # Typed keys are saved as their raw uint32 key data.
      raw = jax.eval_shape(jax.random.key_data, leaf)
      shape, dtype = raw.shape, raw.dtype
    if shape is not None and tuple(shape) != tuple(meta.shape):
      raise ValueError(
        f"Leaf {name!r} has shape {tuple(shape)} in state_template but "
        f"{tuple(meta.shape)} in the checkpoint of step={step}."
      )
    if dtype is not None and dtype != meta.dtype:
      raise ValueError(
        f"Leaf {name!r} has dtype {dtype} in state_template but {meta.dtype} "
        f"in the checkpoint of step={step}; restore, then cast."
      )


def _unfinished_writes(directory: str) -> list[str]:
  """The tmp directories of unfinished writes in `directory` (what orbax's
  cleanup removes; see TMP_DIR_SUFFIX)."""
  if not os.path.isdir(directory):
    return []
  return sorted(
    os.path.join(directory, name)
    for name in os.listdir(directory)
    if TMP_DIR_SUFFIX in name
    and os.path.isdir(os.path.join(directory, name))
    and not os.path.islink(os.path.join(directory, name))
  )


def finished_steps(directory: str) -> list[int]:
  """The steps in `directory` whose step directories are finished writes
  (commit marker and metadata present; their arrays are not read), sorted;
  readable without a `Checkpointer`, e.g. after a failed save."""
  if not os.path.isdir(directory):
    return []
  steps = []
  for name in os.listdir(directory):
    if not name.isdigit():
      continue
    try:
      _check_files(os.path.join(directory, name))
    except ValueError:
      continue
    steps.append(int(name))
  return sorted(steps)


def _check_files(step_dir: str):
  """Raises ValueError unless `step_dir` holds orbax's commit marker and a
  readable `_CHECKPOINT_METADATA` (orbax itself reads on without them)."""
  if not os.path.isfile(os.path.join(step_dir, _COMMIT_FILE)):
    raise ValueError(f"{_COMMIT_FILE} is missing (an unfinished write)")
  try:
    with open(os.path.join(step_dir, _METADATA_FILE), encoding="utf-8") as f:
      json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{_METADATA_FILE} is unreadable ({e})") from e


def _move_aside(path: str) -> str:
  """Renames `path` to `path.corrupt` (or `.corrupt.2`, ...); returns it."""
  target, n = f"{path}.corrupt", 1
  while os.path.exists(target):
    n += 1
    target = f"{path}.corrupt.{n}"
  os.rename(path, target)
  return target


def _as_uint32(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 values (8- and 16-bit types widened, 64-bit
  split in two)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size < 4:
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., size // 4]


@jax.jit
def _leaf_sums(leaves: list) -> list[jax.Array]:
  """Per leaf, sum_i w_i b_i mod 2^32 over its bits b_i (as uint32 words)
  with odd weights w_i = (i * 0x9E3779B1) | 1: a changed bit changes the
  sum by an odd multiple of a power of two below 2^32, never by 0 mod 2^32,
  so any single flipped bit is caught (integer sums are exact in any order,
  also across shards)."""
  out = []
  for leaf in leaves:
    bits = _as_uint32(leaf).reshape(-1)
    index = jnp.arange(bits.size, dtype=jnp.uint32)
    weights = (index * jnp.uint32(0x9E3779B1)) | jnp.uint32(1)
    out.append(jnp.sum(bits * weights, dtype=jnp.uint32))
  return out


def fingerprint(state: Any, data_state: dict) -> dict:
  """{"leaves": {name: int}, "data": sha256 hex} of a (state, data_state)
  pair: what `save` stores and `restore` checks. Names are orbax's
  parameter names ("opt_state.0.mu.w")."""
  names = jax.tree.leaves(
    ocp.tree.get_param_names(state, include_empty_nodes=False)
  )
  leaves = [
    leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
    for leaf in jax.tree.leaves(state)
  ]
  sums = jax.device_get(_leaf_sums(leaves))
  text = json.dumps(data_state, sort_keys=True)
  return {
    "leaves": {name: int(v) for name, v in zip(names, sums, strict=True)},
    "data": hashlib.sha256(text.encode("utf-8")).hexdigest(),
  }


def _check_fingerprint(saved: dict, restored: dict, step: int):
  """Raises ValueError naming what differs from the saved fingerprint."""
  if saved.get("data") != restored["data"]:
    raise ValueError(
      f"the data state of step {step} differs from its saved fingerprint"
    )
  leaves = saved.get("leaves", {})
  differ = sorted(
    name
    for name in leaves.keys() | restored["leaves"].keys()
    if leaves.get(name) != restored["leaves"].get(name)
  )
  if differ:
    raise ValueError(
      f"{len(differ)} restored leaves of step {step} differ from their saved "
      f"fingerprint, e.g. {differ[:3]} (changed bytes in the array files)"
    )
