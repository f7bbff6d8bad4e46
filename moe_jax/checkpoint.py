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

import os
from collections.abc import Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp


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
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
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
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state_template),
        data=ocp.args.JsonRestore(),
      ),
    )
    return restored["state"], restored["data"]

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
