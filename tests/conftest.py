"""Shared pytest setup: hypothesis profiles sized for a 2-core CPU.

Property tests spend their time compiling JAX ops for new shapes, so they
draw shapes from small fixed sets and run a modest number of examples.
Choose a profile with HYPOTHESIS_PROFILE=thorough for a longer search.

Many tests compile the same tiny models again: the fault tests launch
`python -m moe_jax.train` several times on one config, and in-process tests
build equal modules. One JAX persistent compilation cache for the session
(a fresh directory shared by the xdist workers and the subprocesses they
start, through the JAX_COMPILATION_CACHE_DIR they inherit; removed at the
end) compiles each of them once. A cached executable is the one XLA
compiled, so results are unchanged; set JAX_COMPILATION_CACHE_DIR yourself
to use another directory, or to "" to turn the cache off.
"""

import os
import shutil
import tempfile

import hypothesis

_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # Set before any test module imports jax, which reads it at import; the
  # xdist workers are started later and inherit it.
  _OWN_CACHE = tempfile.mkdtemp(prefix="moe_jax_test_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE


def pytest_unconfigure(config):
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_configure(config):
  # Many tests build top-2 layers in the papers' k-major order; the warning
  # is tested once, in tests/test_layers.py.
  config.addinivalue_line(
    "filterwarnings", "ignore::moe_jax.layers.NoncausalRoutingWarning"
  )


hypothesis.settings.register_profile(
  "default",
  max_examples=30,
  deadline=None,
  suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.register_profile(
  "thorough",
  max_examples=300,
  deadline=None,
  suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.load_profile(
  os.environ.get("HYPOTHESIS_PROFILE", "default")
)
