"""The errors a person fixes in their command, told apart from bugs.

`ConfigError` is a mistake in a run's configuration (a value out of range,
an unknown router, a workdir that holds another config's run). It is a
`ValueError`, so code that catches those keeps working; the command line
(`python -m moe_jax.train`) prints it as one line, `error: <message>`, and
exits with status 2, while any other exception keeps its traceback.

`DivergenceError` is a run that stopped on a non-finite loss; it is a
`FloatingPointError` whose message reads "... at step N ...".
"""

import contextlib
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
