"""Tests of moe_jax.layers: Router, Experts, MoeLayer vs NumPy references."""

import dataclasses
import functools
import warnings

import chex
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.layers import (
  Experts,
  MoeConfig,
  MoeLayer,
  NoncausalRoutingWarning,
  Router,
)
from moe_jax.routing import ROUTING_SCHEMES

D, F, E = 8, 16, 4


def _config(**overrides):
  base = dict(
    num_experts=E,
    expert_dim=F,
    group_size=16,
    min_capacity=0,
    activation="relu",
  )
  base.update(overrides)
  return MoeConfig(**base)


def _init(config, x_BLD):
  layer = MoeLayer(config)
  params = layer.init(jax.random.key(0), x_BLD, deterministic=True)["params"]
  return layer, nn.unbox(params)  # the expert weights carry logical names


def _numpy_expert(params, e, x_ND):
  wi = np.asarray(params["experts"]["wi"], np.float64)[e]
  wo = np.asarray(params["experts"]["wo"], np.float64)[e]
  return np.maximum(x_ND @ wi, 0.0) @ wo


@pytest.mark.parametrize("router", ["top_k", "soft_mixture"])
def test_soft_mixture_limit_matches_float64_reference(router):
  """K = E with ample capacity is the dense soft mixture of Jacobs et al. 1991:
  y_t = sum_e softmax(x_t W_r)_e FFN_e(x_t), computed here in float64 NumPy.
  Router "soft_mixture" is that limit by construction (C = S whatever the
  capacity factor)."""
  x_BLD = jax.random.normal(jax.random.key(1), (2, 8, D))
  factor = 4.0 if router == "top_k" else 0.1
  config = _config(router=router, top_k=E, eval_capacity_factor=factor)
  layer, params = _init(config, x_BLD)
  y_BLD = layer.apply({"params": params}, x_BLD, deterministic=True)

  x_ND = np.asarray(x_BLD, np.float64).reshape(-1, D)
  logits_NE = x_ND @ np.asarray(params["router"]["kernel"], np.float64)
  p_NE = np.exp(logits_NE - logits_NE.max(-1, keepdims=True))
  p_NE /= p_NE.sum(-1, keepdims=True)
  expected_ND = sum(
    p_NE[:, e : e + 1] * _numpy_expert(params, e, x_ND) for e in range(E)
  )
  np.testing.assert_allclose(
    np.asarray(y_BLD).reshape(-1, D), expected_ND, rtol=1e-4, atol=1e-5
  )


def test_switch_top1_matches_float64_reference_with_drops():
  """Switch Eq. 2 with capacity (Eq. 3): y_t = p_{e*} FFN_{e*}(x_t) for the
  first C tokens (in order) choosing each expert, exactly 0 for the rest."""
  x_BLD = jax.random.normal(jax.random.key(2), (1, 16, D))
  # switch rule: C = ceil(16 / 4 * 0.5) = 2 slots per expert.
  config = _config(eval_capacity_factor=0.5)
  layer, params = _init(config, x_BLD)
  y_ND = np.asarray(layer.apply({"params": params}, x_BLD, deterministic=True))[
    0
  ]

  x_ND = np.asarray(x_BLD, np.float64)[0]
  logits_NE = x_ND @ np.asarray(params["router"]["kernel"], np.float64)
  p_NE = np.exp(logits_NE - logits_NE.max(-1, keepdims=True))
  p_NE /= p_NE.sum(-1, keepdims=True)
  used = [0] * E
  expected_ND = np.zeros_like(x_ND)
  for t in range(16):
    e = int(np.argmax(p_NE[t]))
    if used[e] < 2:
      used[e] += 1
      expected_ND[t] = p_NE[t, e] * _numpy_expert(params, e, x_ND[t : t + 1])[0]
  np.testing.assert_allclose(y_ND, expected_ND, rtol=1e-4, atol=1e-5)
  assert np.sum(np.all(y_ND == 0.0, axis=-1)) == 16 - sum(used)


def test_zero_capacity_outputs_exact_zeros():
  """With C = 0 every token is dropped: the layer adds exactly nothing."""
  x_BLD = jax.random.normal(jax.random.key(3), (2, 8, D))
  # flaxformer rule: C = round(0.01 * 16 / 4) = round(0.04) = 0.
  config = _config(capacity_rule="flaxformer", eval_capacity_factor=0.01)
  layer, params = _init(config, x_BLD)
  y_BLD, sown = layer.apply(
    {"params": params}, x_BLD, deterministic=True, mutable=["moe_metrics"]
  )
  assert np.all(np.asarray(y_BLD) == 0.0)
  assert float(sown["moe_metrics"]["drop_fraction"][0]) == 1.0


def test_top1_router_gets_task_gradient_through_gate():
  """Switch §2.1: the gate p_{e*} is the router's only task-loss gradient."""
  x_BLD = jax.random.normal(jax.random.key(4), (2, 8, D))
  layer, params = _init(_config(), x_BLD)

  def task_loss(p):
    return jnp.sum(layer.apply({"params": p}, x_BLD, deterministic=True) ** 2)

  grad_router = jax.jit(jax.grad(task_loss))(params)["router"]["kernel"]
  assert float(jnp.max(jnp.abs(grad_router))) > 1e-6


def _value_and_grads(config, x_BLD, params=None):
  """sum(sin(y)) and its gradients w.r.t. (params, x), jitted. Parameters
  do not depend on the dispatch backend, so they are initialised through
  the cheapest one."""
  layer = MoeLayer(config)
  if params is None:
    _, params = _init(dataclasses.replace(config, dispatch="indices"), x_BLD)

  def f(p, x):
    return jnp.sum(jnp.sin(layer.apply({"params": p}, x, deterministic=True)))

  return params, jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x_BLD)


@pytest.mark.parametrize("router,top_k", [("switch", 1), ("gshard", 2)])
def test_einsum_and_index_dispatch_agree(router, top_k):
  """Both capacity backends give the same outputs and gradients (with
  drops: C = ceil(16 / 4 * 0.75) = 3 of 16 tokens per expert)."""
  x_BLD = jax.random.normal(jax.random.key(5), (2, 16, D))
  results = [
    _value_and_grads(
      _config(
        router=router, top_k=top_k, dispatch=backend, eval_capacity_factor=0.75
      ),
      x_BLD,
    )
    for backend in ("einsum", "indices")
  ]
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router,top_k", [("switch", 1), ("gshard", 2)])
def test_dropless_agrees_with_capacity_backends_when_nothing_drops(
  router, top_k
):
  """With C >= S (eval CF = E = 4: C = ceil(16 / 4 * 4) = 16 = S) no pair is
  dropped, so einsum, indices and dropless (which never drops) give the
  same outputs and gradients from the same parameters: one parameter tree
  serves every backend."""
  x_BLD = jax.random.normal(jax.random.key(5), (2, 16, D))
  config = _config(router=router, top_k=top_k, eval_capacity_factor=float(E))
  dropless = dataclasses.replace(config, dispatch="dropless")
  layer = MoeLayer(dropless)
  init = jax.jit(functools.partial(layer.init, deterministic=True))
  chex.assert_trees_all_equal_shapes(
    nn.unbox(init(jax.random.key(0), x_BLD)["params"]),
    _init(config, x_BLD)[1],
  )
  params, reference = _value_and_grads(config, x_BLD)
  for other in (dataclasses.replace(config, dispatch="einsum"), dropless):
    _, result = _value_and_grads(other, x_BLD, params)
    chex.assert_trees_all_close(result, reference, rtol=1e-5, atol=1e-6)


def test_dropless_matches_float64_reference_and_never_drops():
  """GShard top-2 (Alg. 1: g_k = p_k / (p_1 + p_2)) without capacity:
  y_t = sum_k g_{t,k} FFN_{e_k}(x_t) for every token, even at a training
  capacity factor that would drop most pairs (0.1), in float64 NumPy."""
  x_BLD = jax.random.normal(jax.random.key(11), (1, 16, D))
  config = _config(
    router="gshard", top_k=2, dispatch="dropless", capacity_factor=0.1
  )
  layer, params = _init(config, x_BLD)
  y_BLD, sown = layer.apply(
    {"params": params}, x_BLD, deterministic=False, mutable=["moe_metrics"]
  )
  assert float(sown["moe_metrics"]["drop_fraction_rank_2"][0]) == 0.0

  x_ND = np.asarray(x_BLD, np.float64)[0]
  logits_NE = x_ND @ np.asarray(params["router"]["kernel"], np.float64)
  p_NE = np.exp(logits_NE - logits_NE.max(-1, keepdims=True))
  p_NE /= p_NE.sum(-1, keepdims=True)
  expected_ND = np.zeros_like(x_ND)
  for t in range(16):
    top2 = np.argsort(-p_NE[t])[:2]
    for e in top2:
      gate = p_NE[t, e] / p_NE[t, top2].sum()
      expected_ND[t] += gate * _numpy_expert(params, e, x_ND[t : t + 1])[0]
  np.testing.assert_allclose(y_BLD[0], expected_ND, rtol=1e-4, atol=1e-5)


def test_dropless_tiles_and_ragged_dot_agree_and_are_deterministic():
  """The CPU tile loop and `jax.lax.ragged_dot` give the same layer outputs
  and gradients; two runs of the tile loop are bit-identical."""
  x_BLD = jax.random.normal(jax.random.key(12), (2, 16, D))
  results = {}
  for implementation in ("tiles", "ragged_dot"):
    config = _config(
      router="top_k",
      top_k=2,
      dispatch="dropless",
      grouped_matmul=implementation,
      tile_size=4,
    )
    results[implementation] = _value_and_grads(config, x_BLD)
  chex.assert_trees_all_close(
    results["tiles"], results["ragged_dot"], rtol=1e-5, atol=1e-6
  )
  config = _config(router="top_k", top_k=2, dispatch="dropless", tile_size=4)
  again = _value_and_grads(config, x_BLD)
  for a, b in zip(jax.tree.leaves(results["tiles"]), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ["indices", "dropless"])
def test_bfloat16_experts_with_float32_router(backend):
  """Switch §2.4 selective precision: experts in bfloat16, router, losses
  and gates in float32; the output stays within bfloat16 rounding of the
  float32 layer's and the router still gets a float32 gradient."""
  x_BLD = jax.random.normal(jax.random.key(13), (2, 16, D))
  config = _config(router="gshard", top_k=2, dispatch=backend, gated=True)
  params, (_, (grads, _)) = _value_and_grads(
    dataclasses.replace(config, dtype="bfloat16"), x_BLD
  )
  assert grads["router"]["kernel"].dtype == jnp.float32
  assert float(jnp.max(jnp.abs(grads["router"]["kernel"]))) > 0
  layer = MoeLayer(dataclasses.replace(config, dtype="bfloat16"))
  y16, sown = layer.apply(
    {"params": params},
    x_BLD.astype(jnp.bfloat16),
    deterministic=True,
    mutable=["aux_loss"],
  )
  assert y16.dtype == jnp.bfloat16
  assert sown["aux_loss"]["router_z_loss"][0].dtype == jnp.float32
  y32 = MoeLayer(config).apply({"params": params}, x_BLD, deterministic=True)
  np.testing.assert_allclose(
    np.asarray(y16, np.float32), y32, rtol=0.05, atol=0.05
  )


def test_padding_takes_no_capacity_and_gets_no_output():
  """REFERENCE (i): padded tokens take no slot, so the real tokens' drops and
  outputs do not depend on what the padding holds."""
  key1, key2 = jax.random.split(jax.random.key(6))
  x_BLD = jax.random.normal(key1, (1, 16, D))
  mask_BL = jnp.arange(16)[None] >= 6  # the first 6 tokens are padding
  config = _config(eval_capacity_factor=0.5)  # C = 2: drops happen
  layer, params = _init(config, x_BLD)
  other_BLD = jnp.where(
    mask_BL[..., None], x_BLD, jax.random.normal(key2, x_BLD.shape) * 5
  )
  y1 = layer.apply({"params": params}, x_BLD, mask_BL, deterministic=True)
  y2 = layer.apply({"params": params}, other_BLD, mask_BL, deterministic=True)
  np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
  assert np.all(np.asarray(y1)[0, :6] == 0.0)


def test_router_float32_under_bfloat16_and_jitter_only_in_training():
  """Switch §2.4 selective precision; jitter (App. C) only in training."""
  x_GSD = jax.random.normal(jax.random.key(7), (2, 8, D), jnp.bfloat16)
  router = Router(E, jitter=0.1)
  params = router.init(jax.random.key(0), x_GSD, deterministic=True)
  assert params["params"]["kernel"].dtype == jnp.float32
  logits = router.apply(params, x_GSD, deterministic=True)
  assert logits.dtype == jnp.float32
  train = [
    router.apply(
      params, x_GSD, deterministic=False, rngs={"jitter": jax.random.key(s)}
    )
    for s in (1, 2)
  ]
  assert not np.allclose(train[0], train[1])
  eval_ = router.apply(
    params, x_GSD, deterministic=True, rngs={"jitter": jax.random.key(1)}
  )
  np.testing.assert_array_equal(np.asarray(eval_), np.asarray(logits))


def test_router_init_scale():
  """Switch §2.4: std = sqrt(scale / fan_in) (truncated normal)."""
  x = jnp.zeros((1, 1, 1024))
  kernel = Router(512, init_scale=0.1).init(
    jax.random.key(0), x, deterministic=True
  )["params"]["kernel"]
  assert abs(float(jnp.std(kernel)) - np.sqrt(0.1 / 1024)) < 0.05 * np.sqrt(
    0.1 / 1024
  )


def test_bfloat16_layer_runs_with_float32_routing():
  x_BLD = jax.random.normal(jax.random.key(8), (2, 8, D)).astype(jnp.bfloat16)
  layer, params = _init(_config(dtype="bfloat16", gated=True), x_BLD)
  y, sown = layer.apply(
    {"params": params}, x_BLD, deterministic=True, mutable=["aux_loss"]
  )
  assert y.dtype == jnp.bfloat16
  assert sown["aux_loss"]["load_balancing_loss"][0].dtype == jnp.float32


def test_sown_losses_metrics_and_decisions():
  x_BLD = jax.random.normal(jax.random.key(9), (2, 8, D))
  config = _config(
    router="gshard", top_k=2, second_policy="random", eval_capacity_factor=4.0
  )
  layer, params = _init(config, x_BLD)
  _, sown = layer.apply(
    {"params": params},
    x_BLD,
    deterministic=False,
    rngs={"routing": jax.random.key(1)},
    mutable=["aux_loss", "moe_metrics", "intermediates"],
  )
  assert set(sown["aux_loss"]) == {"load_balancing_loss", "router_z_loss"}
  assert sown["moe_metrics"]["expert_fraction"][0].shape == (E,)
  assert sown["intermediates"]["expert_index"][0].shape == (2, 8, 2)
  # At evaluation the random policy keeps every second choice (C = S).
  _, sown = layer.apply(
    {"params": params}, x_BLD, deterministic=True, mutable=["intermediates"]
  )
  assert bool(jnp.all(sown["intermediates"]["kept"][0]))


def test_experts_are_independent():
  """Expert e's output depends only on its own slice of the stacked weights."""
  x_EGCD = jax.random.normal(jax.random.key(10), (E, 1, 3, D))
  experts = Experts(E, F)
  params = experts.init(jax.random.key(0), x_EGCD)
  y = experts.apply(params, x_EGCD)
  poked = jax.tree.map(lambda w: w.at[1].multiply(2.0), params)
  y_poked = experts.apply(poked, x_EGCD)
  changed = np.any(np.asarray(y != y_poked), axis=(1, 2, 3))
  np.testing.assert_array_equal(changed, [False, True, False, False])


@pytest.mark.parametrize(
  "overrides,message",
  [
    (dict(router="nope"), "unknown router='nope'"),
    (dict(router="top_k", top_k=5), "top_k=5"),
    (dict(capacity_factor=0.0), "capacity_factor=0.0"),
    (dict(eval_capacity_factor=-1.0), "eval_capacity_factor=-1.0"),
    (dict(dispatch="scatter"), "unknown dispatch='scatter'"),
    (dict(grouped_matmul="pallas"), "unknown grouped_matmul='pallas'"),
    (dict(tile_size=-8), "tile_size=-8"),
    (
      dict(router="expert_choice", dispatch="dropless", allow_noncausal=True),
      "dispatch='dropless' with router='expert_choice'",
    ),
    (dict(priority="random"), "unknown priority='random'"),
    (dict(router="switch", top_k=2), "top_k=2"),
    (dict(router_dtype="float16"), "unknown router_dtype='float16'"),
    (
      dict(router="deepseek", top_k=2, router_dtype="bfloat16"),
      "router_dtype='bfloat16' with router='deepseek'",
    ),
    (
      dict(router="sinkhorn", allow_noncausal=True, router_dtype="bfloat16"),
      "router_dtype='bfloat16' with router='sinkhorn'",
    ),
    (
      dict(second_choice_counting="alg1"),
      "unknown second_choice_counting='alg1'",
    ),
  ],
)
def test_bad_config_errors_name_the_value(overrides, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    _config(**overrides)


def test_config_is_hashable_and_frozen():
  config = _config()
  hash(config)
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.top_k = 2


# ---------------------------------------------------------------------------
# Other routers (routing.ROUTING_SCHEMES).

LEARNED = sorted(n for n, s in ROUTING_SCHEMES.items() if s.learned)


def _router_config(router, **overrides):
  top_k = {"switch": 1, "gshard": 2, "soft_mixture": E}.get(router, 2)
  base = dict(router=router, top_k=top_k, allow_noncausal=True)
  base.update(overrides)
  return _config(**base)


def _apply(layer, params, x_BLD, *, deterministic, seed=0, **kwargs):
  keys = jax.random.split(jax.random.key(seed), 2)
  variables = {"params": params}
  if layer.config.router == "deepseek":  # its balancing bias b = 0
    variables["router_state"] = {"bias": jnp.zeros(E)}
  return layer.apply(
    variables,
    x_BLD,
    deterministic=deterministic,
    rngs={"routing": keys[0], "jitter": keys[1]},
    mutable=["aux_loss", "moe_metrics", "intermediates"],
    **kwargs,
  )


@pytest.mark.parametrize("dispatch", ["einsum", "indices"])
def test_expert_choice_matches_float64_reference(dispatch):
  """Zhou 2022: y_t = sum over the experts e that took t of p_{t,e}
  FFN_e(x_t); each expert takes its C = ceil(CF S / E) = ceil(1.5 * 16 / 4)
  = 6 highest-scoring tokens of the group (float64 NumPy loop)."""
  x_BLD = jax.random.normal(jax.random.key(11), (2, 8, D))
  config = _router_config(
    "expert_choice", eval_capacity_factor=1.5, dispatch=dispatch
  )
  layer, params = _init(config, x_BLD)
  y_BLD, sown = _apply(layer, params, x_BLD, deterministic=True)
  x_ND = np.asarray(x_BLD, np.float64).reshape(-1, D)
  logits_NE = x_ND @ np.asarray(params["router"]["kernel"], np.float64)
  p_NE = np.exp(logits_NE - logits_NE.max(-1, keepdims=True))
  p_NE /= p_NE.sum(-1, keepdims=True)
  expected_ND = np.zeros_like(x_ND)
  for e in range(E):
    chosen = sorted(range(16), key=lambda t: (-p_NE[t, e], t))[:6]
    for t in chosen:
      expected_ND[t] += (
        p_NE[t, e] * _numpy_expert(params, e, x_ND[t : t + 1])[0]
      )
  np.testing.assert_allclose(
    np.asarray(y_BLD).reshape(-1, D), expected_ND, rtol=1e-4, atol=1e-5
  )
  metrics = sown["moe_metrics"]
  assert float(metrics["max_violation"][0]) == 0.0  # 6 tokens per expert
  np.testing.assert_allclose(metrics["experts_per_token_mean"][0], 24 / 16)
  assert set(sown["aux_loss"]) == {"router_z_loss"}


@pytest.mark.parametrize("router", ["expert_choice", "sinkhorn"])
def test_noncausal_routers_are_refused_unless_allowed(router):
  """REFERENCE (i): expert choice (and Sinkhorn balancing) read later tokens
  of the group; a decoder must opt in."""
  with pytest.raises(ValueError, match="is not causal.*allow_noncausal=True"):
    _config(router=router, top_k=2)
  _config(router=router, top_k=2, allow_noncausal=True)
  with pytest.raises(ValueError, match="eval_router='nope'"):
    _config(router="top_k", top_k=2, eval_router="nope")
  with pytest.raises(ValueError, match="eval_router='expert_choice'"):
    _config(router="top_k", top_k=2, eval_router="expert_choice")


@pytest.mark.parametrize(
  "overrides, warns",
  [
    (dict(router="top_k", top_k=2, priority="k_major"), True),
    (dict(router="switch", top_k=1, priority="batch_priority"), True),
    (dict(router="hash", top_k=2, priority="k_major"), True),
    (dict(router="top_k", top_k=2, priority="token_major"), False),
    (dict(router="switch", top_k=1, priority="k_major"), False),
    (dict(router="top_k", top_k=2, dispatch="dropless"), False),
    (dict(router="top_k", top_k=2, allow_noncausal=True), False),
    # The drop order at evaluation counts too.
    (dict(router="top_k", top_k=2, eval_priority="token_major"), True),
    (
      dict(
        router="top_k",
        top_k=2,
        priority="token_major",
        eval_priority="k_major",
      ),
      True,
    ),
    # allow_noncausal accepts expert choice's training leak, but its eval
    # router is there for a causal evaluation: a leaking order still warns.
    (
      dict(
        router="expert_choice",
        top_k=2,
        allow_noncausal=True,
        eval_router="top_k",
      ),
      True,
    ),
    (
      dict(
        router="expert_choice",
        top_k=2,
        allow_noncausal=True,
        eval_router="top_k",
        eval_priority="token_major",
      ),
      False,
    ),
  ],
)
def test_noncausal_drop_orders_warn_unless_allowed(overrides, warns):
  """k-major at K >= 2 and batch priority let later tokens decide earlier
  drops; token-major order, K = 1 and dropless dispatch do not."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    MoeConfig(**overrides)
  found = [w for w in caught if w.category is NoncausalRoutingWarning]
  assert bool(found) == warns, [str(w.message) for w in caught]
  if warns:  # the message names the fix
    message = str(found[0].message)
    if overrides.get("allow_noncausal"):
      assert "Set eval_priority='token_major'" in message
    else:
      assert "allow_noncausal=True" in message


def test_eval_priority_is_the_drop_order_at_evaluation_only():
  """priority='k_major', eval_priority='token_major', K = 2, C = 1. Token 0
  ranks experts (0, 1), token 1 ranks (1, 0) (router kernel set by hand).
    k-major (training): firsts t0->e0 slot 0, t1->e1 slot 0, kept; seconds
      t0->e1 slot 1, t1->e0 slot 1, dropped: kept = [[1, 0], [1, 0]].
    token-major (evaluation): t0->e0 slot 0, t0->e1 slot 0, kept; t1->e1
      slot 1, t1->e0 slot 1, dropped: kept = [[1, 1], [0, 0]]."""
  config = _config(
    router="top_k",
    top_k=2,
    group_size=2,
    capacity_factor=0.5,  # C = ceil(0.5 * 2 / 4) = 1
    eval_capacity_factor=0.5,
    eval_priority="token_major",
  )
  x_BLD = jnp.zeros((1, 2, D)).at[0, 0, 0].set(1.0).at[0, 1, 1].set(1.0)
  layer, params = _init(config, x_BLD)
  kernel = np.zeros((D, E), np.float32)
  kernel[0, :2] = [2.0, 1.0]
  kernel[1, :2] = [1.0, 2.0]
  params["router"]["kernel"] = jnp.asarray(kernel)
  expected = {True: [[1, 1], [0, 0]], False: [[1, 0], [1, 0]]}
  for deterministic, kept in expected.items():
    _, sown = _apply(layer, params, x_BLD, deterministic=deterministic)
    np.testing.assert_array_equal(
      sown["intermediates"]["expert_index"][0][0], [[0, 1], [1, 0]]
    )
    np.testing.assert_array_equal(
      sown["intermediates"]["kept"][0][0], np.asarray(kept, bool)
    )
  with pytest.raises(ValueError, match="unknown eval_priority='nope'"):
    _config(eval_priority="nope")


def test_expert_choice_evaluates_as_tokens_choose_with_eval_router():
  """eval_router="top_k": at evaluation the same router logits route tokens
  choose top-K (causal); training still routes by expert choice."""
  x_BLD = jax.random.normal(jax.random.key(12), (2, 8, D))
  ec = _router_config("expert_choice", eval_router="top_k")
  layer, params = _init(ec, x_BLD)
  top_k_layer = MoeLayer(_router_config("top_k"))
  y_eval, sown = _apply(layer, params, x_BLD, deterministic=True)
  y_ref, _ = _apply(top_k_layer, params, x_BLD, deterministic=True)
  np.testing.assert_array_equal(np.asarray(y_eval), np.asarray(y_ref))
  assert "drop_fraction_rank_2" in sown["moe_metrics"]
  _, sown = _apply(layer, params, x_BLD, deterministic=False)
  assert "experts_per_token_mean" in sown["moe_metrics"]


def test_noisy_top_k_noise_is_zero_init_and_training_only():
  """Shazeer 2017: W_noise (and here W_g, init scale 0) start at zero
  (App. A); noise only in training; G = softmax over the K largest noisy
  logits (Eqs. 3-5) and its CV^2 losses are sown."""
  x_BLD = jax.random.normal(jax.random.key(13), (2, 8, D))
  config = _router_config(
    "noisy_top_k", router_init_scale=0.0, capacity_factor=4.0
  )
  layer, params = _init(config, x_BLD)
  assert not np.any(np.asarray(params["noise"]["kernel"]))
  assert not np.any(np.asarray(params["router"]["kernel"]))
  eval_1, _ = _apply(layer, params, x_BLD, deterministic=True, seed=1)
  eval_2, _ = _apply(layer, params, x_BLD, deterministic=True, seed=2)
  np.testing.assert_array_equal(np.asarray(eval_1), np.asarray(eval_2))
  train_1, sown = _apply(layer, params, x_BLD, deterministic=False, seed=1)
  train_2, _ = _apply(layer, params, x_BLD, deterministic=False, seed=2)
  assert not np.allclose(train_1, train_2)
  H = np.asarray(sown["intermediates"]["noisy_logits"][0], np.float64)
  np.testing.assert_allclose(
    sown["intermediates"]["noise_std"][0], np.log(2.0), rtol=1e-6
  )
  top = np.sort(H, axis=-1)[..., ::-1][..., :2]
  gates = np.exp(top - top[..., :1]) / np.exp(top - top[..., :1]).sum(
    -1, keepdims=True
  )
  np.testing.assert_allclose(
    sown["intermediates"]["gates"][0], gates, rtol=1e-5
  )
  assert set(sown["aux_loss"]) == {
    "load_balancing_loss",
    "router_z_loss",
    "importance_loss",
    "load_loss",
  }


@pytest.mark.parametrize("router", LEARNED)
def test_every_learned_router_honours_the_router_options(router):
  """Switch §2.4 float32 router kernel under a bfloat16 model, the optional
  bias, init scale 0 = zero kernel, and jitter (App. C) only in training."""
  x_BLD = jax.random.normal(jax.random.key(14), (2, 8, D)).astype(jnp.bfloat16)
  config = _router_config(
    router,
    dtype="bfloat16",
    router_bias=True,
    router_jitter=0.1,
    router_init_scale=0.0,
  )
  layer, params = _init(config, x_BLD)
  assert params["router"]["kernel"].dtype == jnp.float32
  assert not np.any(np.asarray(params["router"]["kernel"]))
  assert params["router"]["bias"].shape == (E,)
  params = jax.tree.map(lambda w: w + 0.5, params)  # make the kernel matter
  logits = {}
  for deterministic in (False, True):
    for seed in (1, 2):
      _, sown = _apply(
        layer, params, x_BLD, deterministic=deterministic, seed=seed
      )
      logits[deterministic, seed] = sown["intermediates"]["router_logits"][0]
  assert logits[False, 1].dtype == jnp.float32
  assert not np.allclose(logits[False, 1], logits[False, 2])
  np.testing.assert_array_equal(logits[True, 1], logits[True, 2])


@pytest.mark.parametrize("router", ["hash", "random"])
def test_non_learned_routers_have_no_router_and_no_aux_loss(router):
  x_BLD = jax.random.normal(jax.random.key(15), (2, 8, D))
  ids_BL = jax.random.randint(jax.random.key(16), (2, 8), 0, 50)
  config = _router_config(router, top_k=1)
  layer = MoeLayer(config)
  params = layer.init(
    jax.random.key(0), x_BLD, deterministic=True, token_ids_BL=ids_BL
  )["params"]
  assert set(params) == {"experts"}
  runs = [
    _apply(layer, params, x_BLD, deterministic=d, seed=s, token_ids_BL=ids_BL)
    for d, s in [(False, 1), (False, 2), (True, 1), (True, 2)]
  ]
  experts = [np.asarray(s["intermediates"]["expert_index"][0]) for _, s in runs]
  assert all("aux_loss" not in s for _, s in runs)
  np.testing.assert_array_equal(experts[2], experts[3])  # fixed at eval
  if router == "random":  # a fresh choice every training step
    assert not np.array_equal(experts[0], experts[1])
  else:  # a function of the token id
    np.testing.assert_array_equal(experts[0], experts[2])
    with pytest.raises(ValueError, match="needs|token_ids_BL"):
      layer.apply({"params": params}, x_BLD, deterministic=True)


# ---------------------------------------------------------------------------
# Router precision (Switch §2.4 and Table 2).


def _dot_dtypes(fn, *args):
  """(operand dtypes, result dtype) of every dot_general in fn's jaxpr."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(
          (
            tuple(v.aval.dtype for v in eqn.invars),
            eqn.outvars[0].aval.dtype,
          )
        )
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr)
  return found


def test_float32_router_dot_is_float32_under_bfloat16_activations():
  """REFERENCE §i "fp32 router under bf16": with bfloat16 activations the
  router's dot x W_r takes float32 operands and returns float32."""
  x_GSD = jax.random.normal(jax.random.key(20), (2, 8, D), jnp.bfloat16)
  router = Router(E)
  params = router.init(jax.random.key(0), x_GSD, deterministic=True)
  dots = _dot_dtypes(
    lambda p, x: router.apply(p, x, deterministic=True), params, x_GSD
  )
  assert dots == [((jnp.float32, jnp.float32), jnp.float32)]


def test_bfloat16_router_logits_are_the_rounded_numpy_dot():
  """router_dtype bfloat16 (Switch Table 2's bf16 router): the dot takes
  bfloat16 operands and returns bfloat16 logits, equal to the float64 NumPy
  product of the bfloat16-rounded x and W_r, rounded to bfloat16 (to one
  bfloat16 ulp, 2^-8 relative); they differ from the float32 logits. The
  kernel and the bias stay float32 parameters."""
  x_GSD = jax.random.normal(jax.random.key(21), (2, 8, D))
  router16 = Router(E, use_bias=True, dtype=jnp.bfloat16)
  params = router16.init(jax.random.key(0), x_GSD, deterministic=True)
  params = jax.tree.map(lambda w: w + 0.3, params)  # a non-zero bias
  assert params["params"]["kernel"].dtype == jnp.float32
  assert params["params"]["bias"].dtype == jnp.float32
  logits16 = router16.apply(params, x_GSD, deterministic=True)
  assert logits16.dtype == jnp.bfloat16
  dots = _dot_dtypes(
    lambda p, x: router16.apply(p, x, deterministic=True), params, x_GSD
  )
  assert dots == [((jnp.bfloat16, jnp.bfloat16), jnp.bfloat16)]

  def bf16(a):
    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), float)

  x64 = bf16(x_GSD)
  w64 = bf16(params["params"]["kernel"])
  b64 = bf16(params["params"]["bias"])
  expected = bf16(bf16(x64 @ w64) + b64)
  got = np.asarray(logits16, np.float64)
  np.testing.assert_allclose(got, expected, rtol=2.0**-8, atol=1e-6)
  assert np.mean(got == expected) > 0.9  # mostly bit-equal
  logits32 = Router(E, use_bias=True).apply(params, x_GSD, deterministic=True)
  assert logits32.dtype == jnp.float32
  assert not np.array_equal(np.asarray(logits32, np.float64), got)
  np.testing.assert_allclose(got, logits32, rtol=0.02, atol=0.02)


def test_bfloat16_router_layer_rounds_logits_and_probabilities():
  """MoeLayer(router_dtype="bfloat16"): sown logits are bfloat16 and the
  Switch gates (raw p) are bfloat16 numbers, within bfloat16 rounding of
  the float64 softmax of those logits; losses stay float32."""
  x_BLD = jax.random.normal(jax.random.key(22), (2, 8, D))
  config = _config(router_dtype="bfloat16", eval_capacity_factor=4.0)
  layer, params = _init(config, x_BLD)
  _, sown = _apply(layer, params, x_BLD, deterministic=True)
  logits = sown["intermediates"]["router_logits"][0]
  assert logits.dtype == jnp.bfloat16
  z64 = np.asarray(logits, np.float64)
  p64 = np.exp(z64 - z64.max(-1, keepdims=True))
  p64 /= p64.sum(-1, keepdims=True)
  gates = np.asarray(sown["intermediates"]["gates"][0], np.float32)[..., 0]
  np.testing.assert_array_equal(
    gates, np.asarray(jnp.asarray(gates).astype(jnp.bfloat16), np.float32)
  )
  np.testing.assert_allclose(gates, p64.max(-1), rtol=6 * 2.0**-8)
  assert sown["aux_loss"]["router_z_loss"][0].dtype == jnp.float32
  assert sown["aux_loss"]["load_balancing_loss"][0].dtype == jnp.float32


# ---------------------------------------------------------------------------
# GShard Alg. 1 counting, through the layer.


def test_second_choice_counting_reaches_the_router():
  """With a threshold policy that rejects many second choices and a scarce
  capacity, Alg. 1's counting ("gshard_alg1") keeps the same first choices
  (pass 1 is unchanged) and strictly fewer second choices than Lingvo's
  ("kept_only"): rejected choices use up slots."""
  x_BLD = jax.random.normal(jax.random.key(23), (4, 16, D))
  kept = {}
  for counting in ("kept_only", "gshard_alg1"):
    config = _config(
      router="gshard",
      top_k=2,
      second_policy="threshold",
      second_threshold=0.35,
      second_choice_counting=counting,
      eval_capacity_factor=1.0,
      allow_noncausal=True,
    )
    layer, params = _init(config, x_BLD)
    params["router"]["kernel"] = params["router"]["kernel"] * 10.0  # peaky
    _, sown = _apply(layer, params, x_BLD, deterministic=True)
    kept[counting] = np.asarray(sown["intermediates"]["kept"][0])
  np.testing.assert_array_equal(
    kept["kept_only"][..., 0], kept["gshard_alg1"][..., 0]
  )
  assert np.all(kept["gshard_alg1"] <= kept["kept_only"])
  assert kept["gshard_alg1"][..., 1].sum() < kept["kept_only"][..., 1].sum()


# ---------------------------------------------------------------------------
# Router logit metrics.


@pytest.mark.parametrize("router", ["switch", "expert_choice", "deepseek"])
def test_router_logit_metrics_are_sown(router):
  """ST-MoE §3.3-3.4: every learned router sows max |z| and the mean
  logsumexp_e z over real tokens, here against NumPy on the sown logits."""
  x_BLD = jax.random.normal(jax.random.key(24), (2, 8, D))
  mask_BL = jnp.arange(8)[None] < jnp.array([[8], [5]])  # 3 padded tokens
  layer, params = _init(_router_config(router), x_BLD)
  params = jax.tree.map(lambda w: w * 3.0, params)  # larger logits
  _, sown = _apply(
    layer, params, x_BLD, deterministic=True, padding_mask_BL=mask_BL
  )
  z = np.asarray(sown["intermediates"]["router_logits"][0], np.float64)
  real = np.asarray(mask_BL)
  z_real = z[real]  # [T, E]
  m = z_real.max(-1, keepdims=True)
  lse = m[:, 0] + np.log(np.exp(z_real - m).sum(-1))
  metrics = sown["moe_metrics"]
  np.testing.assert_allclose(
    metrics["router_logit_max_abs"][0], np.abs(z_real).max(), rtol=1e-6
  )
  np.testing.assert_allclose(
    metrics["router_logsumexp"][0], lse.mean(), rtol=1e-5
  )
