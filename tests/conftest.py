"""Shared pytest setup: hypothesis profiles sized for a 2-core CPU.

Property tests spend their time compiling JAX ops for new shapes, so they
draw shapes from small fixed sets and run a modest number of examples.
Choose a profile with HYPOTHESIS_PROFILE=thorough for a longer search.
"""

import os

import hypothesis


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
