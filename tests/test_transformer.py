"""Tests of moe_jax.models.transformer: causality, MoE placement, dense."""

import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moe_jax.layers import MoeConfig
from moe_jax.models import TransformerConfig, TransformerLM
from moe_jax.models.transformer import dense_twin_dim

V, L = 32, 16


def _config(num_experts=4, group_size=L, **overrides):
  moe = None
  if num_experts:
    moe = MoeConfig(
      num_experts=num_experts,
      expert_dim=32,
      group_size=group_size,
      capacity_factor=1.0,
      eval_capacity_factor=0.5,
      min_capacity=0,
    )
  base = dict(
    vocab_size=V,
    max_len=L,
    d_model=16,
    num_layers=4,
    num_heads=2,
    mlp_dim=24,
    moe_every=2,
    moe=moe,
    dense_moe_dim=32,
  )
  base.update(overrides)
  return TransformerConfig(**base)


def _params(model, tokens):
  return nn.unbox(model.init(jax.random.key(0), tokens)["params"])


def test_moe_every_places_moe_in_every_nth_block():
  """moe_every=2: blocks 1 and 3 hold the MoE layer (Switch: every other)."""
  tokens = jnp.zeros((2, L), jnp.int32)
  params = _params(TransformerLM(_config()), tokens)
  moe_blocks = sorted(
    k for k, v in params.items() if k.startswith("layer_") and "moe" in v
  )
  assert moe_blocks == ["layer_01", "layer_03"]
  assert params["layer_00"]["mlp"]["wi"].shape == (16, 24)
  assert params["layer_01"]["moe"]["experts"]["wi"].shape == (4, 16, 32)
  every = _params(TransformerLM(_config(moe_every=1)), tokens)
  assert all("moe" in every[f"layer_{i:02d}"] for i in range(4))


def test_dense_baseline_is_flop_matched():
  """num_experts=0: the MoE blocks get a dense FFN of width top_k * F."""
  tokens = jnp.zeros((2, L), jnp.int32)
  params = _params(TransformerLM(_config(num_experts=0)), tokens)
  assert params["layer_01"]["mlp"]["wi"].shape == (16, 32)
  assert params["layer_00"]["mlp"]["wi"].shape == (16, 24)


def _moe_dict(**overrides):
  moe = dict(
    router="switch",
    top_k=1,
    expert_dim=512,
    capacity_factor=1.25,
    capacity_rule="switch",
    num_shared_experts=0,
    shared_expert_dim=0,
  )
  moe.update(overrides)
  return ml_collections.ConfigDict(moe)


@pytest.mark.parametrize(
  "overrides, width",
  [
    (dict(), 512),  # Switch: K F = 1 x 512
    (dict(router="gshard", top_k=2), 1024),  # 2 x 512
    (dict(router="soft_mixture", top_k=8), 4096),  # every expert: E F
    # DeepSeek-V3: 4 routed x 128 + 1 shared x 128 (configs/deepseek_v3.py)
    (
      dict(
        router="deepseek",
        top_k=4,
        expert_dim=128,
        num_shared_experts=1,
        shared_expert_dim=128,
      ),
      640,
    ),
    (dict(top_k=1, num_shared_experts=2), 512 + 2 * 512),  # F_s 0 = F
    # Expert choice: c experts per token on average, whatever top_k (the
    # eval router's K): c F = 2 x 512; under the gshard rule C = c K S / E,
    # so c K F = 1.5 x 2 x 512; c = 1.3 gives round(1.3 x 100) = 130.
    (dict(router="expert_choice", top_k=2, capacity_factor=2.0), 1024),
    (
      dict(
        router="expert_choice",
        top_k=2,
        capacity_factor=1.5,
        capacity_rule="gshard",
      ),
      1536,
    ),
    (
      dict(router="expert_choice", capacity_factor=1.3, expert_dim=100),
      130,
    ),
  ],
)
def test_dense_twin_dim_counts_every_active_hidden_unit(overrides, width):
  assert dense_twin_dim(_moe_dict(**overrides)) == width


def test_dense_twin_dim_errors():
  with pytest.raises(ValueError, match="unknown router='nope'"):
    dense_twin_dim(_moe_dict(router="nope"))
  with pytest.raises(ValueError, match="unknown capacity_rule='nope'"):
    dense_twin_dim(_moe_dict(router="expert_choice", capacity_rule="nope"))
  with pytest.raises(ValueError, match="routed 0 must be >= 1"):
    dense_twin_dim(_moe_dict(top_k=0))


@pytest.mark.parametrize("gated", [False, True])
def test_dense_twin_is_gated_as_the_experts(gated):
  """A gated FFN has a third matrix (Shazeer 2020); the dense twin's MoE
  block has it exactly when the experts and shared experts do."""
  moe = _moe_dict(num_shared_experts=1, shared_expert_dim=32, expert_dim=32)
  moe.update(num_experts=4, group_size=L, min_capacity=0)
  config = ml_collections.ConfigDict(
    dict(
      model=dict(
        d_model=16,
        num_layers=2,
        num_heads=2,
        mlp_dim=24,
        activation="silu",
        gated=gated,
        dropout_rate=0.0,
        dtype="float32",
        moe_every=2,
        moe=moe,
      ),
      loss=dict(load_balancing="switch"),
      data=dict(seq_len=L),
    )
  )
  tokens = jnp.zeros((1, L), jnp.int32)
  params = _params(
    TransformerLM(TransformerConfig.from_config(config, V)), tokens
  )
  config.model.moe.num_experts = 0
  twin_model = TransformerLM(TransformerConfig.from_config(config, V))
  twin = _params(twin_model, tokens)
  moe_block = params["layer_01"]["moe"]
  assert ("wi_gate" in moe_block["experts"]) == gated
  assert ("wi_gate" in moe_block["shared_experts"]) == gated
  assert ("wi_gate" in twin["layer_01"]["mlp"]) == gated
  assert twin["layer_01"]["mlp"]["wo"].shape == (32 + 32, 16)


@pytest.mark.parametrize("num_experts", [0, 4])
def test_logits_are_causal(num_experts):
  """Changing tokens at positions >= t leaves the logits before t unchanged,
  also with capacity drops: top-1 slots are filled left to right, so a
  token's drop depends only on earlier tokens of its group (REFERENCE (i)).
  Groups here are single sequences; a group spanning several sequences
  couples them (see test_groups_spanning_sequences_couple_them)."""
  model = TransformerLM(_config(num_experts=num_experts))
  tokens = jax.random.randint(jax.random.key(1), (2, L), 0, V)
  params = _params(model, tokens)
  apply = jax.jit(lambda t: model.apply({"params": params}, t))
  base = np.asarray(apply(tokens))
  t = 9
  changed = tokens.at[:, t:].set((tokens[:, t:] + 7) % V)
  after = np.asarray(apply(changed))
  np.testing.assert_array_equal(base[:, :t], after[:, :t])
  assert not np.allclose(base[:, t:], after[:, t:])


def test_training_mode_needs_and_uses_rngs():
  model = TransformerLM(_config(dropout_rate=0.1))
  tokens = jax.random.randint(jax.random.key(2), (2, L), 0, V)
  params = _params(model, tokens)

  def run(seed):
    rngs = {"dropout": jax.random.key(seed)}
    return model.apply(
      {"params": params}, tokens, deterministic=False, rngs=rngs
    )

  assert not np.allclose(run(1), run(2))
  np.testing.assert_array_equal(
    model.apply({"params": params}, tokens),
    model.apply({"params": params}, tokens),
  )


def test_bad_model_config_errors():
  with pytest.raises(ValueError, match="num_heads=3 must divide d_model=16"):
    _config(num_heads=3)
  with pytest.raises(ValueError, match="moe_every=0"):
    _config(moe_every=0)
  model = TransformerLM(_config())
  with pytest.raises(ValueError, match="exceeds max_len=16"):
    model.init(jax.random.key(0), jnp.zeros((1, L + 1), jnp.int32))


def test_groups_spanning_sequences_couple_them():
  """With one group over two sequences and tight capacity, sequence 1's
  outputs depend on sequence 0's later tokens (the slots they took)."""
  model = TransformerLM(_config(group_size=2 * L))
  tokens = jax.random.randint(jax.random.key(1), (2, L), 0, V)
  params = _params(model, tokens)
  apply = jax.jit(lambda t: model.apply({"params": params}, t))
  changed = tokens.at[0, L // 2 :].set((tokens[0, L // 2 :] + 7) % V)
  assert not np.array_equal(
    np.asarray(apply(tokens))[1], np.asarray(apply(changed))[1]
  )


def _moe_model(**moe_overrides):
  moe = dict(
    num_experts=4,
    expert_dim=32,
    group_size=L,
    capacity_factor=1.0,
    eval_capacity_factor=1.0,
    min_capacity=0,
  )
  moe.update(moe_overrides)
  return TransformerLM(_config(num_experts=0, moe=MoeConfig(**moe)))


def test_expert_choice_leaks_the_future_and_eval_router_does_not():
  """REFERENCE (b), causality: with expert choice, whether token t is taken
  depends on later tokens' scores, so earlier logits change when only later
  tokens change (training mode). eval_router="top_k" routes the same logits
  tokens-choose at evaluation, which is causal again."""
  model = _moe_model(
    router="expert_choice", allow_noncausal=True, eval_router="top_k"
  )
  tokens = jax.random.randint(jax.random.key(3), (2, L), 0, V)
  params = _params(model, tokens)
  t = 12
  changed = tokens.at[:, t:].set((tokens[:, t:] + 5) % V)

  def run(x, deterministic):
    return np.asarray(
      model.apply({"params": params}, x, deterministic=deterministic)
    )

  assert not np.allclose(run(tokens, False)[:, :t], run(changed, False)[:, :t])
  np.testing.assert_array_equal(
    run(tokens, True)[:, :t], run(changed, True)[:, :t]
  )


def test_hash_routing_gets_the_token_ids():
  """Roller 2021: TransformerLM passes its input tokens to the MoE layer, so
  equal token ids go to equal experts in every MoE block."""
  model = _moe_model(router="hash")
  tokens = jnp.array([[1, 2, 3, 1, 2, 3, 4, 5, 1, 1, 1, 6, 7, 2, 3, 4]])
  params = _params(model, tokens)
  _, sown = model.apply({"params": params}, tokens, mutable=["intermediates"])
  for layer in ("layer_01", "layer_03"):
    experts = np.asarray(sown["intermediates"][layer]["moe"]["expert_index"][0])
    for token in (1, 2, 3):
      assert len(set(experts[0][np.asarray(tokens[0]) == token, 0])) == 1


def _expert_choice_config(**moe_overrides):
  """configs/expert_choice.py at a tiny size: 2 blocks of width 16, its 8
  experts of width 32, groups of one sequence of L tokens."""
  path = Path(__file__).resolve().parents[1] / "configs" / "expert_choice.py"
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.seq_len = L
  config.model.update(d_model=16, num_layers=2, num_heads=2, mlp_dim=32)
  config.model.moe.update(expert_dim=32, group_size=L, **moe_overrides)
  return config


@pytest.mark.parametrize("eval_priority", ["config", "k_major"])
def test_expert_choice_config_evaluates_causally(eval_priority):
  """configs/expert_choice.py evaluates with the top-2 eval router in
  token-major drop order: editing the tokens at positions >= t changes no
  routing decision (expert_index, kept, gates) and no logit before t. Its
  eval capacity here is tight, C = max(ceil(1.0 * S / E), 4) = 4 slots for
  2 * 16 pairs over 8 experts, so pairs are dropped.

  The same check with k-major order (GShard Alg. 1), the config's order
  before this fix, must fail: all first choices of the group take slots
  before any second choice, so the later tokens' first choices decide
  which earlier second choices are dropped."""
  overrides = dict(eval_capacity_factor=1.0)
  if eval_priority != "config":
    overrides["eval_priority"] = eval_priority
  config = _expert_choice_config(**overrides)
  assert config.model.moe.eval_router == "top_k"
  model = TransformerLM(TransformerConfig.from_config(config, V))
  tokens = jax.random.randint(jax.random.key(4), (8, L), 0, V)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])

  @jax.jit
  def evaluate(x):
    logits, sown = model.apply(
      {"params": params}, x, deterministic=True, mutable=["intermediates"]
    )
    return logits, sown["intermediates"]["layer_01"]["moe"]

  t = L // 2
  changed = tokens.at[:, t:].set((tokens[:, t:] + 11) % V)
  logits, before = evaluate(tokens)
  logits_changed, after = evaluate(changed)
  kept = np.asarray(before["kept"][0])
  assert kept.shape == (8, L, 2) and not kept.all()  # pairs are dropped
  names = ("expert_index", "kept", "gates")
  routing_changed = {
    name: not np.array_equal(
      np.asarray(before[name][0])[:, :t], np.asarray(after[name][0])[:, :t]
    )
    for name in names
  }
  logits_changed_early = not np.array_equal(
    np.asarray(logits)[:, :t], np.asarray(logits_changed)[:, :t]
  )
  if eval_priority == "config":
    assert config.model.moe.eval_priority == "token_major"
    assert routing_changed == dict.fromkeys(names, False)
    assert not logits_changed_early
  else:
    # Earlier tokens choose the same experts, but keep or lose a second one.
    assert not routing_changed["expert_index"]
    assert routing_changed["kept"] and routing_changed["gates"]
    assert logits_changed_early
