"""The errors a person fixes in their command, told apart from bugs.

`ConfigError` is a mistake in a run's configuration (a value out of range,
an unknown router, a workdir that holds another config's run). It is a
`ValueError`, so code that catches those keeps working; the command line
(`python -m moe_jax.train`) prints it as one line, `error: <message>`, and
exits with status 2, while any other exception keeps its traceback.

`DiskFullError` is a disk that filled up during a run (an OSError with
errno ENOSPC): the command line prints it as one line too, with exit
status 1, naming the newest checkpoint the re-run resumes from.

`DivergenceError` is a run that stopped on a non-finite loss; it is a
`FloatingPointError` whose message reads "... at step N ...".
"""

import contextlib
import dataclasses
import errno
import numbers
import os
from collections.abc import Sequence


class ConfigError(ValueError):
  """A configuration mistake: the message names the value and what is
  allowed."""


class DivergenceError(FloatingPointError):
  """Training produced a non-finite loss (or train state) at `step`.

  Attributes:
    step: the step whose logged metrics (or state) are not finite.
    terms: the non-finite terms, as named in the metric log without the
      "train/" prefix ("lm_loss", "aux/router_z_loss", "grad_norm", ...).
  """

  def __init__(self, message: str, step: int, terms: Sequence[str]):
    super().__init__(message)
    self.step = step
    self.terms = list(terms)


class DiskFullError(OSError):
  """The workdir's disk filled up mid-run (errno ENOSPC) while a checkpoint
  or the metric log was written. The message says which write failed and
  the newest checkpoint on disk; a re-run of the same command, once there
  is space, resumes from the newest good checkpoint."""

  def __init__(self, message: str):
    super().__init__(errno.ENOSPC, message)

  def __str__(self) -> str:
    return self.strerror


def is_disk_full(error: BaseException) -> bool:
  """Whether `error`, or an exception it was raised from or during, is a
  full disk: an OSError with errno ENOSPC, or a message saying "No space
  left on device" (tensorstore, which writes the checkpoints' arrays,
  reports its OS errors in its own exception types)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if os.strerror(errno.ENOSPC) in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


@contextlib.contextmanager
def config_errors():
  """Re-raises a ValueError from inside as a ConfigError (same message,
  chained): wrap code that only validates a configuration."""
  try:
    yield
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from e


def one_line(message: str) -> str:
  """`message` with its line breaks and runs of spaces made single spaces."""
  return " ".join(str(message).split())


_TYPE_NAMES = {
  int: "an integer",
  float: "a number",
  bool: "True or False",
  str: "a string",
}


def _has_type(value, kind) -> bool:
  if kind is bool:
    return isinstance(value, bool)
  if isinstance(value, bool):  # a bool is an int to Python, not to a config
    return False
  if kind is int:
    return isinstance(value, numbers.Integral)
  if kind is float:
    return isinstance(value, numbers.Real)
  return isinstance(value, kind)


def check_field_types(config, prefix: str = ""):
  """Raises ConfigError naming the first field of the dataclass instance
  `config` whose value is not of its annotated type: int (not a bool),
  float (an int is accepted), bool or str; fields of other annotations are
  left to the dataclass's own checks. `prefix` is put before the field's
  name in the message ("model.moe.")."""
  for field in dataclasses.fields(config):
    if field.type not in (int, float, bool, str):
      continue
    value = getattr(config, field.name)
    if not _has_type(value, field.type):
      raise ConfigError(
        f"{prefix}{field.name}={value!r} must be {_TYPE_NAMES[field.type]}, "
        f"not {type(value).__name__}."
      )
