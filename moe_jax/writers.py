"""Where a run writes what it measured, and what it ran on.

A workdir ends up with

  metrics.jsonl   one JSON object per `MetricWriter.write` call:
                  {"step": 100, "train/loss": 3.2, "train/moe/layer_01/
                  expert_fraction": [0.12, ...]}; NaN and +-inf are null.
                  `write_event` adds rows such as {"step": 20, "event":
                  "diverged", "terms": ["lm_loss"]} (JSONL only).
  tensorboard/    the same numbers as TensorBoard scalars. A list value
                  `key` becomes one scalar per element, `key/00`, `key/01`...
  config.json     the run's ConfigDict (`write_run_info`).
  run_info.json   versions, devices, git revision, command line, start time
                  of the first launch; never replaced.
  history.jsonl   one row per later launch ({"event": "launch", "step",
                  "run_info"}) and per config change it made ({"event":
                  "config_change", "key", "old", "new", "step"}).

A workdir belongs to one config: `check_config_change` compares a launch's
config with config.json before anything is written, and refuses any
difference but those in keys of SAFE_CHANGES that the launch names.

When a run starts, `truncate_after(s)` (s: the step of the checkpoint it
resumes from, 0 without one) drops the rows logged after s, so the JSONL
continues exactly as an uninterrupted run's would. TensorBoard is told (by
the `purge_step` of the event file that the next write opens) to hide the
events logged after s.

Only one process of a multi-host run should write (e.g. process 0).
"""

import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from moe_jax import errors

METRICS_FILE = "metrics.jsonl"
# Whose versions run_info.json records, besides python's.
_LIBS = ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy")


class MetricWriter:
  """Appends metric rows to <workdir>/metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    """Opens the writers, appending to what a previous run left there.

    Args:
      workdir: the run's directory; created if missing.
      tensorboard: also write TensorBoard event files to <workdir>/tensorboard.
    """
    self.workdir = os.fspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.path = os.path.join(self.workdir, METRICS_FILE)
    _drop_torn_tail(self.path)
    self._file = open(self.path, "a", encoding="utf-8")
    self._tensorboard = tensorboard
    self._summary = None  # opened at the first write
    self._purge_step = None

  def write(self, step: int, metrics: dict[str, Any]):
    """Logs one row of metrics measured at `step`.

    Args:
      step: the training step.
      metrics: name -> a scalar (python, numpy or 0-d jax) or a sequence / 1-d
        array of scalars. Integers stay integers; other values become floats.
    """
    if "step" in metrics:
      raise ValueError("metrics must not contain the key 'step'.")
    row = {"step": int(step)}
    for key, value in metrics.items():
      row[key] = _to_python(key, value)
    self._file.write(json.dumps(row, allow_nan=False) + "\n")
    self._file.flush()
    if not self._tensorboard:
      return
    if self._summary is None:
      import tensorboardX  # Imported here: only TensorBoard users need it.

      # tensorboardX names files by the second and opens them with "wb": the
      # suffix keeps a writer opened in the same second from clobbering one.
      self._summary = tensorboardX.SummaryWriter(
        os.path.join(self.workdir, "tensorboard"),
        purge_step=self._purge_step,
        filename_suffix=f".{time.time_ns()}",
      )
    for key, value in row.items():
      if key == "step":
        continue
      values = value if isinstance(value, list) else [value]
      for i, v in enumerate(values):
        name = f"{key}/{i:02d}" if isinstance(value, list) else key
        value_or_nan = math.nan if v is None else v
        self._summary.add_scalar(name, value_or_nan, row["step"])
    self._summary.flush()

  def truncate_after(self, step: int) -> int:
    """Drops every row logged for a step later than `step`.

    Call it when a run starts: with the step of the checkpoint it resumes
    from, or with 0 when there is none (a launch stopped before its first
    checkpoint logged rows that the new one logs again). The rows after
    `step` belong to an interrupted launch's future. TensorBoard hides the
    events of steps > `step` from earlier event files (`purge_step` of the
    next file), unless there are none.

    Returns:
      How many rows were dropped.
    """
    rows = read_metrics(self.workdir)
    kept = [row for row in rows if row["step"] <= step]
    self._file.close()
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for row in kept:
        f.write(json.dumps(row, allow_nan=False) + "\n")
    os.replace(tmp, self.path)
    self._file = open(self.path, "a", encoding="utf-8")
    if self._summary is not None:
      self._summary.close()
      self._summary = None
    # Events of an earlier launch may lie beyond `step` even when the JSONL
    # holds none (that launch truncated it and was stopped before it wrote).
    board = os.path.join(self.workdir, "tensorboard")
    if os.path.isdir(board) and os.listdir(board):
      self._purge_step = step + 1
    return len(rows) - len(kept)

  def write_event(self, step: int, event: str, **fields):
    """Logs a row {"step": step, "event": event, **fields} to the JSONL
    only (not TensorBoard), e.g. {"step": 20, "event": "diverged", "terms":
    ["lm_loss"]}. `fields` must be JSON values."""
    row = {"step": int(step), "event": event, **fields}
    self._file.write(json.dumps(row, allow_nan=False) + "\n")
    self._file.flush()

  def close(self):
    """Flushes and closes both writers."""
    self._file.close()
    if self._summary is not None:
      self._summary.close()
      self._summary = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc_info):
    self.close()


class NullWriter:
  """Stands in for a `MetricWriter` in the processes of a multi-process run
  that do not write (all but process 0)."""

  def write(self, step: int, metrics: dict[str, Any]):
    del step, metrics

  def truncate_after(self, step: int) -> int:
    del step
    return 0

  def write_event(self, step: int, event: str, **fields):
    del step, event, fields

  def close(self):
    pass


def _drop_torn_tail(path: str):
  """Cuts a last line that a crash left without its newline, if any."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


def _to_python(key: str, value: Any) -> int | float | None | list:
  """Converts one metric value to JSON-ready python; non-finite -> None."""
  array = np.asarray(value)
  if array.ndim > 1:
    raise ValueError(
      f"Metric {key!r} has shape {array.shape}; expected a scalar or a 1-d "
      "list."
    )
  if array.dtype.kind in "iu":
    items = [int(v) for v in array.reshape(-1)]
  else:
    try:  # floats, bools and ml_dtypes (bfloat16, float8) but not strings
      if array.dtype.kind in "OSUMm":
        raise TypeError
      floats = array.astype(np.float64).reshape(-1)
    except (TypeError, ValueError):
      raise TypeError(
        f"Metric {key!r} has value {value!r} of dtype {array.dtype}; "
        "expected numbers."
      ) from None
    items = [float(v) if math.isfinite(v) else None for v in floats]
  return items[0] if array.ndim == 0 else items


def read_metrics(workdir: str) -> list[dict]:
  """Returns the rows of <workdir>/metrics.jsonl, in order (null -> None).

  A last line cut short by a crash mid-write is skipped; any other line that
  does not parse raises a ValueError naming the file and line number.
  """
  path = os.path.join(os.fspath(workdir), METRICS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {METRICS_FILE} in {workdir}.")
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  rows = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines):  # no newline after it: a torn last write
        continue
      raise ValueError(f"{path}, line {number} is not JSON: {e}") from e
  return rows


CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run_info.json"
HISTORY_FILE = "history.jsonl"

# The config keys that may change between launches of one run, when the
# launch names them in `allow_config_change` (--allow_config_change): how
# long the run is, how often it logs, evaluates and checkpoints, and how its
# arrays are laid out over devices (checkpoints hold global arrays). Changing
# train.num_steps recomputes the learning-rate schedule for the new length
# (warmup, then decay to the end of the new num_steps), from the step the
# change takes effect on: a cosine run extended after its end starts again
# from where the longer cosine is at that step. Everything else is what the
# run measures, and needs a new workdir.
SAFE_CHANGES = (
  "train.num_steps",
  "train.eval_every",
  "train.log_every",
  "train.checkpoint_every",
  "train.max_checkpoints_to_keep",
  "train.keep_checkpoint_steps",
  "train.progress_bar",
  "train.summary_plot",
  "mesh.shape",
  "mesh.expert_parallel",
  "mesh.logical_axis_rules",
)


@dataclasses.dataclass(frozen=True)
class ConfigChange:
  """A config key whose value differs from the workdir's config.json.

  `old` / `new` are JSON values; `added` / `removed`: the key is absent from
  the workdir's config (moe_jax gained it since the run began) / from the
  new one (moe_jax dropped it).
  """

  key: str
  old: Any = None
  new: Any = None
  added: bool = False
  removed: bool = False


def flatten_config(config) -> dict[str, Any]:
  """The leaves of a config (ConfigDict or nested dict) under dotted keys,
  {"model.moe.num_experts": 8, ...}, as JSON holds them (tuples -> lists)."""
  as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  normal = json.loads(json.dumps(_jsonable(as_dict, "config")))
  flat = {}

  def walk(prefix: str, value: Any):
    if isinstance(value, dict) and value:
      for key, inner in value.items():
        walk(f"{prefix}{key}.", inner)
    else:
      flat[prefix[:-1]] = value

  walk("", normal)
  return flat


def check_config_change(
  workdir: str, config, allow: Sequence[str] | str = ()
) -> list[ConfigChange]:
  """Enforces "a workdir belongs to one config" before a launch writes
  anything.

  Compares `config` with <workdir>/config.json (when there is one), leaf by
  leaf, as JSON values. A key present on one side only (moe_jax gained or
  dropped it since the run began) is accepted and returned, marked added /
  removed; any other difference must be named in `allow`.

  Args:
    workdir: the run's directory.
    config: the config of this launch.
    allow: keys that may differ, each one of SAFE_CHANGES; a sequence or a
      comma-separated string.

  Returns:
    The accepted changes, for `write_run_info` to record.

  Raises:
    ConfigError: `allow` names a key outside SAFE_CHANGES, or the configs
      differ in a key `allow` does not name. The message names each key with
      both values.
  """
  if isinstance(allow, str):
    allow = [key for key in allow.split(",") if key]
  unsafe = sorted(set(allow) - set(SAFE_CHANGES))
  if unsafe:
    raise errors.ConfigError(
      f"--allow_config_change names {', '.join(unsafe)}, which cannot change "
      f"within a run; only these can: {', '.join(SAFE_CHANGES)}. For another "
      "config, use a new --workdir."
    )
  path = os.path.join(os.fspath(workdir), CONFIG_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    old = flatten_config(json.load(f))
  new = flatten_config(config)
  changes = [
    ConfigChange(
      key,
      old.get(key),
      new.get(key),
      added=key not in old,
      removed=key not in new,
    )
    for key in sorted(old.keys() | new.keys())
    if key not in old or key not in new or old[key] != new[key]
  ]
  refused = [
    c for c in changes if not (c.added or c.removed) and c.key not in allow
  ]
  if refused:
    differences = "; ".join(
      f"{c.key}: {json.dumps(c.old)} in the workdir, {json.dumps(c.new)} now"
      for c in refused
    )
    fixed = [c.key for c in refused if c.key not in SAFE_CHANGES]
    if fixed:
      hint = (
        f"{', '.join(fixed)} cannot change within a run: use a new --workdir "
        f"(only {', '.join(SAFE_CHANGES)} can change, with "
        "--allow_config_change=KEY,...)."
      )
    else:
      keys = ",".join(c.key for c in refused)
      hint = (
        f"To change this run from its next step on, pass "
        f"--allow_config_change={keys} (train_and_evaluate's "
        "allow_config_change)."
      )
    raise errors.ConfigError(
      f"{workdir} holds a run of another config: {differences}. {hint}"
    )
  return changes


def check_workdir(workdir: str):
  """Raises ConfigError unless `workdir` is (or can be made) a directory
  this process can write in: checked before a run compiles anything.

  Writes and removes a probe file in it; directories it had to create for
  the probe are removed again, so a run refused later leaves no trace.
  """
  workdir = os.fspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.ConfigError(
      f"--workdir={workdir} is a file, not a directory; name a directory "
      "(it is created when missing)."
    )
  probe = os.path.join(workdir, f".write_probe.{os.getpid()}")
  missing = []  # the directories the probe needs, deepest first
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    missing.append(path)
    path = os.path.dirname(path)
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "w", encoding="utf-8") as f:
      f.write("moe_jax")
    os.remove(probe)
    for path in missing:
      os.rmdir(path)
  except OSError as e:
    reason = e.strerror or type(e).__name__
    where = f" ({e.filename})" if e.filename else ""
    raise errors.ConfigError(
      f"cannot write in --workdir={workdir}: {reason}{where}; choose a "
      "directory you can write to, or fix its permissions."
    ) from e


def run_info() -> dict:
  """Versions, devices, git revision, command line and time of this
  process."""
  import jax

  import moe_jax

  devices = jax.devices()
  now = datetime.datetime.now(datetime.UTC)
  return {
    "moe_jax_version": moe_jax.__version__,
    "git": git_revision(os.path.dirname(os.path.abspath(moe_jax.__file__))),
    "versions": {
      "python": platform.python_version(),
      **{name: importlib.import_module(name).__version__ for name in _LIBS},
    },
    "backend": jax.default_backend(),
    "device_kinds": sorted({d.device_kind for d in devices}),
    "device_count": len(devices),
    "process_count": jax.process_count(),
    "command": list(sys.argv),
    "start_time_utc": now.isoformat(timespec="seconds"),
  }


def write_run_info(
  workdir: str,
  config,
  *,
  step: int = 0,
  changes: Sequence[ConfigChange] = (),
  extra: dict | None = None,
) -> dict:
  """Records a launch of the run in `workdir`.

  The first launch writes <workdir>/config.json and <workdir>/run_info.json.
  Neither is replaced silently afterwards: each later launch appends to
  <workdir>/history.jsonl a row {"time", "event": "launch", "step",
  "run_info"} and one {"time", "event": "config_change", "key", "old",
  "new", "step"} per accepted change (`check_config_change`; "old" is null
  for a key the workdir lacked, "new" null for one this config lacks), and
  only then rewrites config.json to `config`.

  Args:
    workdir: the run's directory; created if missing.
    config: an ml_collections ConfigDict (or a plain dict).
    step: the step this launch starts from (its checkpoint's, else 0).
    changes: what `check_config_change` accepted for this launch.
    extra: JSON fields added to this launch's run_info (e.g. the
      "init_from" a fine-tuning run started from).

  Returns:
    This launch's run_info dict.
  """
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  config_text = (
    json.dumps(_jsonable(as_dict, "config"), indent=2, sort_keys=True) + "\n"
  )
  info = {**run_info(), **(extra or {})}
  config_path = os.path.join(workdir, CONFIG_FILE)
  info_path = os.path.join(workdir, RUN_INFO_FILE)
  if os.path.exists(info_path):
    time_utc = info["start_time_utc"]
    rows = [
      {"time": time_utc, "event": "launch", "step": step, "run_info": info}
    ]
    rows += [
      {
        "time": time_utc,
        "event": "config_change",
        "key": c.key,
        "old": c.old,
        "new": c.new,
        "step": step,
      }
      for c in changes
    ]
    with open(os.path.join(workdir, HISTORY_FILE), "a", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
      f.flush()
      os.fsync(f.fileno())
  else:
    _write_atomically(info_path, json.dumps(info, indent=2) + "\n")
  if changes or not os.path.exists(config_path):
    _write_atomically(config_path, config_text)
  return info


def read_history(workdir: str) -> list[dict]:
  """The rows of <workdir>/history.jsonl ([] when there is none)."""
  path = os.path.join(os.fspath(workdir), HISTORY_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _write_atomically(path: str, text: str):
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def git_revision(directory: str) -> dict | None:
  """Returns {"revision": sha, "dirty": bool} of the checkout at `directory`.

  `dirty` follows `git describe --dirty`: changes to tracked files count,
  untracked files do not. Returns None when git is missing, `directory` is not
  inside a work tree with a commit, or its files are not tracked there (a
  package installed into a virtualenv that sits inside some repository).
  """

  def git(*args: str) -> str:
    return subprocess.run(
      ["git", "-C", directory, *args],
      capture_output=True,
      text=True,
      check=True,
      timeout=10,
    ).stdout.strip()

  try:
    if not git("ls-files", "--", "."):
      return None
    revision = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
  except (OSError, subprocess.SubprocessError):
    return None
  return {"revision": revision, "dirty": dirty}


def _jsonable(value: Any, path: str) -> Any:
  """Turns a config dict into JSON types; tuples become lists."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v, f"{path}.{k}") for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v, f"{path}[{i}]") for i, v in enumerate(value)]
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(
    f"{path}={value!r} of type {type(value).__name__} cannot be written to "
    "config.json."
  )
