"""Where a run writes what it measured, and what it ran on.

A workdir ends up with

  metrics.jsonl   one JSON object per `MetricWriter.write` call:
                  {"step": 100, "train/loss": 3.2, "train/moe/layer_01/
                  expert_fraction": [0.12, ...]}; NaN and +-inf are null.
  tensorboard/    the same numbers as TensorBoard scalars. A list value
                  `key` becomes one scalar per element, `key/00`, `key/01`...
  config.json     the run's ConfigDict (`write_run_info`).
  run_info.json   versions, devices, git revision, command line, start time.

When a run resumes from a checkpoint at step s, `truncate_after(s)` drops the
rows logged after s, so the JSONL continues exactly as an uninterrupted run's
would. TensorBoard is told (by the `purge_step` of the event file that the
next write opens) to hide the events logged after s.

Only one process of a multi-host run should write (e.g. process 0).
"""

import datetime
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any

import numpy as np

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

  def truncate_after(self, step: int):
    """Drops every row logged for a step later than `step`.

    Call it when resuming from the checkpoint of `step`: the rows after it
    belong to the interrupted run's future and will be logged again.
    """
    kept = [row for row in read_metrics(self.workdir) if row["step"] <= step]
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
    self._purge_step = step + 1

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

  def truncate_after(self, step: int):
    del step

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


def write_run_info(workdir: str, config) -> dict:
  """Writes <workdir>/config.json and <workdir>/run_info.json.

  Args:
    workdir: the run's directory; created if missing.
    config: an ml_collections ConfigDict (or a plain dict).

  Returns:
    The run_info dict that was written.
  """
  import jax

  import moe_jax

  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(_jsonable(as_dict, "config"), f, indent=2, sort_keys=True)
    f.write("\n")

  devices = jax.devices()
  now = datetime.datetime.now(datetime.timezone.utc)
  info = {
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
  with open(os.path.join(workdir, "run_info.json"), "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)
    f.write("\n")
  return info


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
