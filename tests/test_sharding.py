"""Tests of moe_jax.sharding that need no second device: meshes as shapes,
the logical axis rules, the errors for meshes that do not divide the model,
and the single-device layout. Multi-device runs: tests/test_expert_parallel.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from moe_jax import sharding
from moe_jax.layers import Experts, MoeConfig, MoeLayer


def _abstract_mesh(shape):
  """A mesh of `shape` that needs no devices (for checks and tracing)."""
  return AbstractMesh(
    tuple(shape), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3
  )


@pytest.mark.parametrize(
  "shape, devices, expected",
  [
    ((2, 4, 1), 8, (2, 4, 1)),
    ((-1, 2, 1), 8, (4, 2, 1)),
    ((1, 1, -1), 3, (1, 1, 3)),
  ],
)
def test_mesh_shape_fills_in_minus_one(shape, devices, expected):
  assert sharding.mesh_shape(shape, devices) == expected


@pytest.mark.parametrize(
  "shape, devices, message",
  [
    ((2, 4), 8, r"must give 3 sizes"),
    ((0, 8, 1), 8, r"sizes must be >= 1"),
    ((-1, -1, 2), 8, r"at most one -1"),
    ((-1, 3, 1), 8, r"use 3 devices, which does not divide the 8"),
    ((2, 2, 1), 8, r"needs 4 devices but jax.device_count\(\)=8"),
  ],
)
def test_mesh_shape_errors_name_the_shape(shape, devices, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(shape, devices)


def test_all_ones_is_one_device_without_a_mesh():
  mesh_config = ml_collections.ConfigDict({"shape": (1, 1, 1)})
  assert sharding.mesh_from_config(mesh_config) is None
  layout = sharding.Layout.from_config(ml_collections.ConfigDict())
  assert layout.mesh is None and "one device" in layout.describe()


def test_default_rules_split_tokens_over_data_and_expert():
  P = PartitionSpec
  spec = sharding.logical_spec
  assert spec(("batch", "length")) == P(("data", "expert"), None)
  assert spec(("expert", "embed", "mlp")) == P("expert", None, "model")
  assert spec(("expert", "expert_group", "capacity", "embed")) == P(
    "expert", "data", None, None
  )
  assert spec(()) == P()


def test_rules_override_and_errors():
  config = ml_collections.ConfigDict(
    {"shape": (1, 1, 1), "logical_axis_rules": (("mlp", None),)}
  )
  rules = sharding.rules_from_config(config)
  assert dict(rules)["mlp"] is None and dict(rules)["expert"] == "expert"
  assert sharding.logical_spec(("expert", "embed", "mlp"), rules) == (
    PartitionSpec("expert", None, None)
  )
  config.logical_axis_rules = (("experts", "expert"),)
  with pytest.raises(ValueError, match=r"unknown logical axes \['experts'\]"):
    sharding.rules_from_config(config)
  config.logical_axis_rules = (("mlp", "tensor"),)
  with pytest.raises(ValueError, match=r"maps to mesh axes \['tensor'\]"):
    sharding.rules_from_config(config)
  with pytest.raises(ValueError, match="unknown logical axis 'heads'"):
    sharding.logical_spec(("heads",))
  with pytest.raises(ValueError, match=r"use mesh axes \['expert'\] twice"):
    sharding.logical_spec(("group", "expert"))


def _run_config(num_experts=8, expert_dim=32, batch=8, seq_len=32, group=32):
  return ml_collections.ConfigDict(
    {
      "model": {
        "moe": {
          "num_experts": num_experts,
          "expert_dim": expert_dim,
          "group_size": group,
        }
      },
      "data": {
        "batch_size": batch,
        "eval_batch_size": batch,
        "seq_len": seq_len,
      },
      "mesh": {"shape": (2, 4, 1), "logical_axis_rules": ()},
    }
  )


@pytest.mark.parametrize(
  "overrides, shape, message",
  [
    (
      dict(num_experts=6),
      (2, 4, 1),
      r"num_experts=6 is not divisible by the 4",
    ),
    (
      dict(expert_dim=30),
      (1, 2, 4),
      r"expert_dim=30 is not divisible by the 4",
    ),
    (dict(batch=4), (2, 4, 1), r"batch_size=4 is not divisible by the 8"),
    # 8 x 32 tokens in groups of 64: G = 4 groups for 8 devices.
    (dict(group=64), (2, 4, 1), r"G=4 groups \(.* = 8 x 32 / 64\) is not divi"),
  ],
)
def test_mesh_that_does_not_divide_the_model_is_an_error(
  overrides, shape, message
):
  with pytest.raises(ValueError, match=message):
    sharding.check_config(_run_config(**overrides), _abstract_mesh(shape))


def test_good_config_passes_the_checks():
  sharding.check_config(_run_config(), _abstract_mesh((2, 4, 1)))


def test_dropless_under_a_mesh_is_an_error():
  config = _run_config()
  config.model.moe.dispatch = "dropless"
  with pytest.raises(ValueError, match=r"dispatch='dropless' runs on one dev"):
    sharding.check_config(config, _abstract_mesh((2, 4, 1)))


@pytest.mark.parametrize(
  "overrides, shape, message",
  [
    (
      dict(num_experts=6),
      (2, 4, 1),
      r"num_experts=6 is not divisible by the 4",
    ),
    (dict(expert_dim=6), (1, 2, 4), r"expert_dim=6 is not divisible by the 4"),
    # B*L = 4*8 tokens in groups of 8: G = 4 groups for 8 devices.
    (dict(), (2, 4, 1), r"groups G=4 is not divisible by the 8 devices"),
    (dict(dispatch="einsum"), (1, 4, 2), None),
    (
      dict(dispatch="dropless"),
      (1, 4, 2),
      r"dispatch='dropless' runs on one device only",
    ),
  ],
)
def test_layer_checks_the_active_mesh_when_traced(overrides, shape, message):
  config = MoeConfig(
    **{"num_experts": 8, "expert_dim": 8, "group_size": 8, **overrides}
  )
  layer, x_BLD = MoeLayer(config), jnp.zeros((4, 8, 4))
  with jax.sharding.use_abstract_mesh(_abstract_mesh(shape)):
    init = lambda: layer.init(jax.random.key(0), x_BLD, deterministic=True)  # noqa: E731
    if message is None:  # G = 4 over data x expert = 4 devices: fine
      jax.eval_shape(init)
    else:
      with pytest.raises(ValueError, match=message):
        jax.eval_shape(init)


def test_unknown_expert_parallel_is_an_error():
  with pytest.raises(ValueError, match=r"unknown expert_parallel='nccl'"):
    MoeConfig(expert_parallel="nccl")


def test_expert_weights_carry_logical_axis_names():
  x_EGCD = jnp.zeros((4, 1, 2, 8))
  boxed = Experts(4, 16, gated=True).init(jax.random.key(0), x_EGCD)["params"]
  assert {k: v.names for k, v in boxed.items()} == {
    "wi": ("expert", "embed", "mlp"),
    "wi_gate": ("expert", "embed", "mlp"),
    "wo": ("expert", "mlp", "embed"),
  }
  assert nn.unbox(boxed)["wi"].shape == (4, 8, 16)


def test_single_device_layout_is_plain_jit():
  layout = sharding.Layout()
  state = layout.init(
    lambda: {"w": nn.LogicallyPartitioned(jnp.ones(2), ("mlp",))}
  )
  assert isinstance(state["w"], jax.Array)
  step = layout.jit_train_step(lambda s, b: ({"w": s["w"] + b["x"]}, {}), state)
  batch = {"x": jnp.ones(2)}
  assert layout.put_batch(batch) is batch
  new, _ = step(state, batch)
  assert new["w"].tolist() == [2.0, 2.0]
  assert state["w"].is_deleted()  # donated
  abstract = layout.abstract_init(lambda: {"w": jnp.zeros(3)})
  assert abstract["w"].shape == (3,) and abstract["w"].sharding is not None
