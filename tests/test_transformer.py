"""Tests of moe_jax.models.transformer: causality, MoE placement, dense."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers import MoeConfig
from moe_jax.models import TransformerConfig, TransformerLM

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
