"""Tests of sparse upcycling (moe_jax.upcycle) and configs/finetune.py,
configs/upcycle.py."""

import importlib.util
import json
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import data, errors, train, upcycle
from moe_jax.checkpoint import Checkpointer
from moe_jax.layers import MlpBlock, MoeConfig, MoeLayer
from moe_jax.models import TransformerConfig, TransformerLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import dense  # noqa: E402
import tiny  # noqa: E402


def _load(name):
  spec = importlib.util.spec_from_file_location(
    name, REPO / "configs" / f"{name}.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _model_config(config):
  return TransformerConfig.from_config(config, data.VOCAB_SIZE)


def _init(config, seed, tokens_BL):
  model = TransformerLM(_model_config(config))
  variables = model.init(jax.random.key(seed), tokens_BL)
  return model, nn.unbox(variables["params"])


def _forward(model, params, tokens_BL, deterministic=True):
  """The model's logits, jitted (eager dropless routing is slow)."""

  def forward(params, tokens_BL):
    logits, _ = model.apply(
      {"params": params},
      tokens_BL,
      deterministic=deterministic,
      mutable=["aux_loss", "moe_metrics"],
    )
    return logits

  return np.asarray(jax.jit(forward)(params, tokens_BL))


def _tiny_dense(data_dir, **train_overrides):
  """configs/dense.py at the tiny size (`tiny.shrink` sets 4 experts)."""
  config = tiny.shrink(dense.get_config(), data_dir, **train_overrides)
  config.model.moe.num_experts = 0
  return config


def _pair(tmp_path, router="mixtral", **moe):
  """The tiny dense config and its MoE counterpart (top-1 by `router`)."""
  dense_config = _tiny_dense(tmp_path)
  moe_config = _load("upcycle").get_config(f"router={router}")
  moe_config = tiny.shrink(moe_config, tmp_path)
  moe_config.model.moe.update(moe)
  return dense_config, moe_config


@pytest.mark.parametrize(
  "dispatch, gated", [("einsum", False), ("indices", True)]
)
def test_upcycled_model_computes_the_dense_model(tmp_path, dispatch, gated):
  """Top-1 with a gate of 1 (router "mixtral": softmax over one logit), no
  drops (capacity factor E: C = S), no noise: the first forward pass
  of the upcycled MoE model gives the dense model's logits."""
  dense_config, moe_config = _pair(
    tmp_path,
    dispatch=dispatch,
    capacity_factor=4.0,
    eval_capacity_factor=4.0,
  )
  for config in (dense_config, moe_config):
    config.model.gated = gated
  tokens_BL = jax.random.randint(jax.random.key(3), (4, 32), 0, 259)
  dense_model, dense_params = _init(dense_config, 0, tokens_BL)
  moe_model, fresh = _init(moe_config, 1, tokens_BL)
  params = jax.tree.map(jnp.asarray, upcycle.upcycle(dense_params, fresh))
  # Experts are copies of their block's FFN; routers the MoE init's own.
  names = ("wi", "wi_gate", "wo") if gated else ("wi", "wo")
  for name in names:
    for e in range(4):
      np.testing.assert_array_equal(
        params["layer_01"]["moe"]["experts"][name][e],
        dense_params["layer_01"]["mlp"][name],
      )
  np.testing.assert_array_equal(
    params["layer_01"]["moe"]["router"]["kernel"],
    fresh["layer_01"]["moe"]["router"]["kernel"],
  )
  np.testing.assert_array_equal(
    params["layer_00"]["mlp"]["wi"], dense_params["layer_00"]["mlp"]["wi"]
  )
  want = _forward(dense_model, dense_params, tokens_BL)
  for deterministic in (True, False):  # eval, and training without dropout
    got = _forward(moe_model, params, tokens_BL, deterministic)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The fresh (not upcycled) MoE model is another function altogether.
  other = _forward(moe_model, fresh, tokens_BL)
  assert not np.allclose(other, want, atol=1e-2)


def test_switch_gate_scales_the_dense_ffn_by_p():
  """Switch top-1 with the raw softmax gate p = max_e softmax(z)_e and
  every expert a copy of one FFN: the layer returns p(x) * FFN(x) for a
  kept token (not FFN(x)), and 0 for a dropped one."""
  E, D, F = 4, 8, 16
  x_BLD = jax.random.normal(jax.random.key(0), (2, 16, D))
  mlp = MlpBlock(F, "gelu")
  mlp_params = mlp.init(jax.random.key(1), x_BLD)["params"]
  for capacity_factor, expect_drops in ((4.0, False), (0.5, True)):
    config = MoeConfig(
      num_experts=E,
      top_k=1,
      router="switch",
      expert_dim=F,
      group_size=16,
      capacity_factor=capacity_factor,
      eval_capacity_factor=capacity_factor,
      min_capacity=1,
      priority="token_major",
    )
    layer = MoeLayer(config)
    fresh = nn.unbox(
      layer.init(jax.random.key(2), x_BLD, deterministic=True)["params"]
    )
    params = upcycle.upcycle({"mlp": mlp_params}, {"moe": fresh})["moe"]
    params = jax.tree.map(jnp.asarray, params)
    y, sown = layer.apply(
      {"params": params},
      x_BLD,
      deterministic=True,
      mutable=["intermediates", "aux_loss", "moe_metrics"],
    )
    gates = np.asarray(sown["intermediates"]["gates"][0])[..., 0]
    kept = np.asarray(sown["intermediates"]["kept"][0])[..., 0]
    logits = np.asarray(sown["intermediates"]["router_logits"][0], np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).max(-1)  # max_e softmax(z)_e
    np.testing.assert_allclose(gates[kept], p[kept], rtol=1e-5)
    ffn = np.asarray(mlp.apply({"params": mlp_params}, x_BLD))
    want = np.where(kept[..., None], p[..., None] * ffn, 0.0)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    assert (not kept.all()) == expect_drops
    assert p.max() < 0.9  # so p * FFN is far from FFN


def test_unmatched_parameters_fail_naming_them(tmp_path):
  tokens_BL = jnp.zeros((1, 32), jnp.int32)
  dense_config, moe_config = _pair(tmp_path)
  _, dense_params = _init(dense_config, 0, tokens_BL)
  # top_k = 2: the dense twin's FFN is 2F wide, each expert F.
  wide = dense_config.copy_and_resolve_references()
  wide.model.moe.top_k = 2
  _, wide_params = _init(wide, 0, tokens_BL)
  _, fresh = _init(moe_config, 1, tokens_BL)
  with pytest.raises(
    ValueError, match=r"layer_01/moe/experts/wi \(4, 32, 64\)"
  ) as raised:
    upcycle.upcycle(wide_params, fresh)
  assert "layer_01/mlp/wi of shape (32, 64)" in str(raised.value)
  assert "(32, 128)" in str(raised.value)
  # Another width everywhere: every path is named.
  other = dense_config.copy_and_resolve_references()
  other.model.d_model = 64
  _, other_params = _init(other, 0, tokens_BL)
  with pytest.raises(ValueError, match="embed/embedding"):
    upcycle.upcycle(other_params, fresh)
  # A dense parameter with no place, and an MoE part with no source.
  extra = {**dense_params, "adapter": np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match="no place in the MoE model: adapter"):
    upcycle.upcycle(extra, fresh)
  shared = moe_config.copy_and_resolve_references()
  shared.model.moe.num_shared_experts = 1
  _, shared_fresh = _init(shared, 1, tokens_BL)
  with pytest.raises(ValueError, match="moe/shared_experts"):
    upcycle.upcycle(dense_params, shared_fresh)


def test_upcycling_through_the_trainer(tmp_path):
  """configs/upcycle.py:init_from=<dense run>: one step (learning rate 0 at
  step 0) leaves the upcycled parameters in the step-1 checkpoint."""
  data_dir = tmp_path / "tfds"
  source = tmp_path / "dense"
  dense_config = _tiny_dense(data_dir, num_steps=2)
  train.train_and_evaluate(dense_config, str(source))
  config = _load("upcycle").get_config(f"init_from={source}")
  config = tiny.shrink(config, data_dir, num_steps=1)
  workdir = tmp_path / "upcycled"
  train.train_and_evaluate(config, str(workdir))
  info = json.loads((workdir / "run_info.json").read_text())["init_from"]
  assert info["upcycled"] is True and info["source_step"] == 2
  assert info["restored"] == ["params"]
  batch = data.create_eval_batches(config.data)[0]

  def saved_params(run_config, run_dir):
    model = TransformerLM(_model_config(run_config))
    tx, _ = train.make_optimizer(run_config.optimizer, 1)
    template = train.init_state(run_config, model, tx, batch)
    with Checkpointer(
      f"{run_dir}/checkpoints", max_to_keep=5, save_interval_steps=1
    ) as ckpt:
      return jax.device_get(ckpt.restore(template)[0].params), template

  dense_params, _ = saved_params(dense_config, source)
  params, fresh = saved_params(config, workdir)
  np.testing.assert_array_equal(
    params["layer_01"]["moe"]["experts"]["wo"][3],
    dense_params["layer_01"]["mlp"]["wo"],
  )
  np.testing.assert_array_equal(
    params["layer_01"]["moe"]["router"]["kernel"],
    fresh.params["layer_01"]["moe"]["router"]["kernel"],
  )
  np.testing.assert_array_equal(
    params["embed"]["embedding"], dense_params["embed"]["embedding"]
  )
  # An MoE source cannot be upcycled (its MoE blocks have no dense FFN).
  config.init_from = str(workdir)
  with pytest.raises(errors.ConfigError, match="layer_01/mlp/wi"):
    train.train_and_evaluate(config, str(tmp_path / "again"))


def test_finetune_config_arguments():
  finetune = _load("finetune")
  config = finetune.get_config(
    "init_from=runs/x,domains=code,expert_dropout=0.3,freeze=router+embeddings,"
    "restore=params,steps=40"
  )
  assert config.init_from == "runs/x"
  assert config.data.domains == ("code",)
  assert config.model.moe.expert_dropout_rate == 0.3
  assert config.model.dropout_rate == 0.1
  assert config.optimizer.freeze == ("router", "embeddings")
  assert config.init_restore == ("params",)
  assert config.train.num_steps == 40
  assert config.model.moe.router == "switch"  # the switch_top1 base
  assert finetune.get_config("base=mixtral").model.moe.top_k == 2
  with pytest.raises(ValueError, match="unknown config argument"):
    finetune.get_config("expert_dropout_rate=0.4")
  with pytest.raises(ValueError, match="base='nope'"):
    finetune.get_config("base=nope")
  upcycled = _load("upcycle").get_config("init_from=runs/dense")
  assert upcycled.init_upcycle and upcycled.init_restore == ("params",)
  assert not _load("upcycle").get_config().init_upcycle
