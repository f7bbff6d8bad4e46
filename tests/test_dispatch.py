"""Tests for `moe_jax.dispatch`: the einsum, index and dropless backends.

The MoE output is y_t = sum_e g_{t,e} FFN_e(x_t) over the kept pairs
(REFERENCE (a); GShard Alg. 2). References are float64 NumPy loops over the
pairs, with gates recomputed from the logits, an analytic input gradient and
central finite differences for the router gradient. The routing decisions
(which pairs are kept, and where) come from `route_tokens`, tested in
`test_routing.py`; here they are inputs.
"""

import functools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import dispatch as dispatch_lib
from moe_jax.dispatch import (
  DISPATCHERS,
  combine,
  dispatch,
  dispatch_and_combine_tensors,
  dropless_combine,
  dropless_dispatch,
  index_combine,
  index_dispatch,
  sort_by_expert,
)
from moe_jax.grouped_matmul import grouped_matmul
from moe_jax.routing import PRIORITIES, ROUTERS, Routing, route_tokens

D = 4
# (G, S, E, K, C) configurations. Compiling ops for a new shape costs far
# more than running them, so examples draw from this short list (its shapes
# are those of test_routing.py) and vary everything else: logits, tokens,
# router, priority, padding.
CONFIGS = (
  (1, 1, 1, 1, 1),  # one token, one expert
  (2, 8, 3, 2, 0),  # capacity 0: everything dropped
  (2, 8, 3, 2, 3),  # some drops
  (2, 8, 3, 3, 8),  # K = E, C = S: no drops
  (1, 6, 4, 2, 9),  # C > S
  (3, 5, 8, 2, 1),  # heavy drops, E = 8
)


def _experts(x_EGCD, w_EDD):
  """A toy expert per e: FFN_e(x) = tanh(x W_e); FFN_e(0) = 0."""
  return jnp.tanh(
    jnp.einsum(
      "egcd,edf->egcf", x_EGCD, w_EDD, precision=jax.lax.Precision.HIGHEST
    )
  )


@jax.jit  # compiles its loops once per shape, not once per eager call
def _grouped_experts(x_ND, w_EDD, group_sizes_E):
  """The same toy experts on rows sorted by expert (a grouped matmul)."""
  return jnp.tanh(
    grouped_matmul(x_ND, w_EDD, group_sizes_E, implementation="tiles")
  )


def _moe(x_GSD, logits_GSE, w_EDD, *, backend, capacity, **route_kwargs):
  """route, dispatch, experts, combine; returns (y_GSD, x_EGCD or x_ND for
  "dropless", routing). Every backend gets the same routing, so dropless
  sees the same drops as the others when capacity < S."""
  E = logits_GSE.shape[-1]
  routing = route_tokens(logits_GSE, capacity=capacity, **route_kwargs)
  x_expert, context = dispatch(x_GSD, routing, E, capacity, backend)
  if backend == "dropless":
    y_expert = _grouped_experts(x_expert, w_EDD, context.group_sizes_E)
  else:
    y_expert = _experts(x_expert, w_EDD)
  y_GSD = combine(y_expert, routing, E, capacity, backend, context)
  return y_GSD, x_expert, routing


def _loss_and_grads(case, backend):
  """sum(y * cot) and its gradients w.r.t. x and the logits."""

  def loss(x, z):
    y, _, _ = _moe(x, z, case["w"], backend=backend, **case["route"])
    return jnp.sum(y * case["cot"])

  return jax.value_and_grad(loss, argnums=(0, 1))(case["x"], case["logits"])


@st.composite
def dispatch_cases(draw, configs=CONFIGS):
  G, S, E, top_k, capacity = draw(st.sampled_from(configs))
  routers = sorted(n for n, c in ROUTERS.items() if c.top_k in (None, top_k))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  padding = None
  if draw(st.booleans()):
    padding = jnp.asarray(rng.random((G, S)) < 0.7)
  gaps = 0.05 + rng.exponential(0.6, size=(G, S, E))
  logits = np.take_along_axis(
    np.cumsum(gaps, -1) - 2.0,
    np.argsort(rng.random((G, S, E)), -1),
    -1,
  )
  return dict(
    x=jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32),
    logits=jnp.asarray(logits, jnp.float32),
    w=jnp.asarray(rng.normal(size=(E, D, D)) / np.sqrt(D), jnp.float32),
    cot=jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32),
    route=dict(
      router=draw(st.sampled_from(routers)),
      top_k=top_k,
      capacity=capacity,
      priority=draw(st.sampled_from(PRIORITIES)),
      renormalize_after_drop=draw(st.booleans()),
      padding_mask_GS=padding,
    ),
  )


# ---------------------------------------------------------------------------
# Float64 reference.


def _softmax64(z):
  z = np.asarray(z, np.float64)
  w = np.exp(z - z.max())
  return w / w.sum()


def _gates64(z_E, experts_K, kept_K, router, renormalize_after_drop):
  """Combine weights of one token from its logits (REFERENCE (b)), with the
  routing decisions (experts, kept) held fixed."""
  p = _softmax64(z_E)
  if router in ("switch", "top_k"):  # Switch Eq. 2: raw p
    g = p[experts_K]
  elif router in ("gshard", "top_k_renormalized"):  # GShard Alg. 1 line 5
    g = p[experts_K] / p[experts_K].sum()
  else:  # Mixtral: softmax over the K chosen logits
    g = _softmax64(z_E[experts_K])
  g = np.where(kept_K, g, 0.0)
  if renormalize_after_drop and g.sum() > 0:
    g = g / g.sum()
  return g


def _reference_token(x_D, z_E, w_EDD, experts_K, kept_K, route):
  """y_t = sum over kept pairs of g_k tanh(x_t W_{e_k}), float64."""
  g = _gates64(
    z_E, experts_K, kept_K, route["router"], route["renormalize_after_drop"]
  )
  y = np.zeros(x_D.shape[-1])
  for k, e in enumerate(experts_K):
    if kept_K[k]:
      y += g[k] * np.tanh(x_D @ w_EDD[e])
  return y, g


def _reference(case, routing):
  """Output, d(sum y*cot)/dx (analytic), d/dlogits (finite differences)."""
  x = np.asarray(case["x"], np.float64)
  z = np.asarray(case["logits"], np.float64)
  w = np.asarray(case["w"], np.float64)
  cot = np.asarray(case["cot"], np.float64)
  experts = np.asarray(routing.expert_index_GSK)
  kept = np.asarray(routing.kept_GSK)
  G, S, E = z.shape
  y = np.zeros_like(x)
  dx = np.zeros_like(x)
  dz = np.zeros_like(z)
  h = 1e-6
  for g in range(G):
    for s in range(S):
      args = (w, experts[g, s], kept[g, s], case["route"])
      y[g, s], gates = _reference_token(x[g, s], z[g, s], *args)
      for k, e in enumerate(experts[g, s]):
        if kept[g, s, k]:
          # d/dx [cot . g tanh(x W_e)] = g W_e (cot * (1 - tanh^2)).
          t = np.tanh(x[g, s] @ w[e])
          dx[g, s] += gates[k] * w[e] @ (cot[g, s] * (1 - t**2))
      for j in range(E):
        step = np.zeros(E)
        step[j] = h
        up, _ = _reference_token(x[g, s], z[g, s] + step, *args)
        down, _ = _reference_token(x[g, s], z[g, s] - step, *args)
        dz[g, s, j] = cot[g, s] @ (up - down) / (2 * h)
  return y, dx, dz


@hypothesis.given(dispatch_cases(), st.sampled_from(DISPATCHERS))
def test_matches_float64_loop_reference(case, backend):
  """y_t = sum_e g_{t,e} FFN_e(x_t) over kept pairs (GShard Alg. 2; Switch
  Eq. 2), and its gradients w.r.t. x and, through the gates, the logits."""
  y, _, routing = _moe(
    case["x"], case["logits"], case["w"], backend=backend, **case["route"]
  )
  y_ref, dx_ref, dz_ref = _reference(case, routing)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  _, (dx, dz) = _loss_and_grads(case, backend)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dz, dz_ref, rtol=1e-4, atol=1e-5)


@hypothesis.given(dispatch_cases())
def test_backends_agree(case):
  """STYLE rule 9: the three backends give the same outputs and gradients
  w.r.t. the tokens and the router logits from the same routing (einsum and
  indices also the same buffers). With C >= S nothing is dropped and this
  is dropless against capacity-based dispatch."""
  results = {}
  for backend in DISPATCHERS:
    y, x_expert, _ = _moe(
      case["x"], case["logits"], case["w"], backend=backend, **case["route"]
    )
    loss, grads = _loss_and_grads(case, backend)
    results[backend] = (y, loss, grads)
    if backend != "dropless":
      results[backend] += (x_expert,)
  chex.assert_trees_all_close(
    results["einsum"], results["indices"], rtol=1e-6, atol=1e-6
  )
  chex.assert_trees_all_close(
    results["einsum"][:3], results["dropless"], rtol=1e-5, atol=1e-6
  )


@hypothesis.given(dispatch_cases(), st.sampled_from(DISPATCHERS))
def test_dropped_pairs_and_empty_slots_are_exactly_zero(case, backend):
  """REFERENCE (c) "Dropped tokens": a token that lost every expert gets
  output exactly 0 and no gradient. Buffers: an empty slot of x_EGCD is
  exactly 0 (GShard Alg. 2) and each filled slot holds its token unchanged.
  Sorted rows: the kept pairs expert by expert, in (group, token, rank)
  order within an expert, then exact zeros."""
  y, x_expert, routing = _moe(
    case["x"], case["logits"], case["w"], backend=backend, **case["route"]
  )
  experts = np.asarray(routing.expert_index_GSK)
  kept = np.asarray(routing.kept_GSK)
  x = np.asarray(case["x"])
  if backend == "dropless":
    E = case["logits"].shape[-1]
    expected = np.zeros((kept.size, x.shape[-1]), np.float32)
    n = 0
    for e in range(E):
      for g, s, _ in zip(*np.nonzero(kept & (experts == e))):
        expected[n] = x[g, s]
        n += 1
    np.testing.assert_array_equal(x_expert, expected)
  else:
    E, G, C, _ = x_expert.shape
    assert C == case["route"]["capacity"]
    position = np.asarray(routing.position_GSK)
    x_EGCD = np.asarray(x_expert)
    filled = np.zeros((E, G, C), bool)
    for g, s, k in zip(*np.nonzero(kept)):
      e, c = experts[g, s, k], position[g, s, k]
      filled[e, g, c] = True
      np.testing.assert_allclose(x_EGCD[e, g, c], x[g, s], rtol=1e-7, atol=0)
    assert np.all(x_EGCD[~filled] == 0.0)

  lost_all = ~kept.any(-1)
  assert np.all(np.asarray(y)[lost_all] == 0.0)
  _, (dx, _) = _loss_and_grads(case, backend)
  assert np.all(np.asarray(dx)[lost_all] == 0.0)


@pytest.mark.parametrize("backend", DISPATCHERS)
def test_capacity_zero_gives_exactly_zero(backend):
  """C = 0: every pair is dropped, so every output entry is exactly 0.0 and
  the expert buffers are empty `[E, G, 0, D]` (dropless: all rows zero)."""
  rng = np.random.default_rng(0)
  case = dict(
    x=jnp.asarray(rng.normal(size=(2, 8, D)), jnp.float32),
    logits=jnp.asarray(rng.normal(size=(2, 8, 3)), jnp.float32),
    w=jnp.asarray(rng.normal(size=(3, D, D)), jnp.float32),
    cot=jnp.ones((2, 8, D)),
    route=dict(router="top_k", top_k=2, capacity=0),
  )
  y, x_expert, _ = _moe(
    case["x"], case["logits"], case["w"], backend=backend, **case["route"]
  )
  if backend == "dropless":  # rows for all G*S*K pairs, none in use
    np.testing.assert_array_equal(x_expert, np.zeros((2 * 8 * 2, D)))
  else:
    assert x_expert.shape == (3, 2, 0, D)
  np.testing.assert_array_equal(y, np.zeros((2, 8, D)))
  _, (dx, dz) = _loss_and_grads(case, backend)
  np.testing.assert_array_equal(dx, np.zeros((2, 8, D)))
  np.testing.assert_array_equal(dz, np.zeros((2, 8, 3)))


@pytest.mark.parametrize("backend", DISPATCHERS)
def test_large_capacity_top_all_equals_dense_soft_mixture(backend):
  """Jacobs et al. 1991 soft mixture: with K = E, raw gates and C >= S no
  pair is dropped and y_t = sum_e p_{t,e} FFN_e(x_t), every expert."""
  rng = np.random.default_rng(1)
  G, S, E = 2, 8, 3
  x = rng.normal(size=(G, S, D))
  z = rng.normal(size=(G, S, E))
  w = rng.normal(size=(E, D, D)) / np.sqrt(D)
  y, _, routing = _moe(
    jnp.asarray(x, jnp.float32),
    jnp.asarray(z, jnp.float32),
    jnp.asarray(w, jnp.float32),
    backend=backend,
    router="top_k",
    top_k=E,
    capacity=S,
  )
  assert np.all(np.asarray(routing.kept_GSK))
  dense = np.zeros((G, S, D))
  for g in range(G):
    for s in range(S):
      p = _softmax64(z[g, s])
      for e in range(E):
        dense[g, s] += p[e] * np.tanh(x[g, s] @ w[e])
  np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-5)


@hypothesis.given(
  st.integers(0, 2**31 - 1),
  st.sampled_from(PRIORITIES),
  st.sampled_from(DISPATCHERS),
  st.sampled_from([c for c in CONFIGS if c[4] >= c[1] > 1]),
)
def test_permuting_tokens_permutes_outputs(seed, priority, backend, config):
  """STYLE rule 9: with C >= S nothing is dropped, so each token's output
  depends on that token alone and permuting tokens within a group permutes
  the outputs (the MoE layer is a per-token function, Shazeer 2017 Eq. 1)."""
  G, S, E, top_k, capacity = config
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32)
  z = jnp.asarray(rng.normal(size=(G, S, E)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(E, D, D)), jnp.float32)
  perm_GS = np.stack([rng.permutation(S) for _ in range(G)])
  run = functools.partial(
    _moe,
    w_EDD=w,
    backend=backend,
    router="top_k",
    top_k=top_k,
    capacity=capacity,
    priority=priority,
  )
  y, _, _ = run(x, z)
  y_perm, _, _ = run(
    jnp.take_along_axis(x, perm_GS[..., None], 1),
    jnp.take_along_axis(z, perm_GS[..., None], 1),
  )
  np.testing.assert_allclose(
    y_perm,
    np.take_along_axis(np.asarray(y), perm_GS[..., None], 1),
    rtol=1e-6,
    atol=1e-7,
  )


@pytest.mark.parametrize("backend", ["indices", "dropless"])
def test_sparse_backends_are_bit_deterministic(backend):
  """REFERENCE (i) "Determinism of scatter-add": every slot or row gets at
  most one pair, gradients of the row moves are gathers, and the combine
  sums over K in a fixed order, so two runs (forward and backward, with
  drops and K = 2) are bit-identical."""
  rng = np.random.default_rng(2)
  case = dict(
    x=jnp.asarray(rng.normal(size=(3, 5, D)), jnp.float32),
    logits=jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32),
    w=jnp.asarray(rng.normal(size=(8, D, D)), jnp.float32),
    cot=jnp.asarray(rng.normal(size=(3, 5, D)), jnp.float32),
    route=dict(router="top_k", top_k=2, capacity=1),
  )
  first = _loss_and_grads(case, backend)
  second = _loss_and_grads(case, backend)
  jitted = jax.jit(functools.partial(_loss_and_grads, case, backend))
  third = jitted()
  fourth = jitted()
  for a, b in [(first, second), (third, fourth)]:
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(u, v)


# ---------------------------------------------------------------------------
# Hand-built routing.

# G=1, S=3, E=2, C=1, K=2 (GShard Alg. 1 lines 14-16):
#   t0: e0 slot 0 kept (g 0.7), e1 slot 0 kept (g 0.2)
#   t1: e1 slot 1 dropped,      e0 slot 1 dropped
#   t2: e1 slot 2 dropped,      e0 slot 2 dropped   (t2 loses every expert)
_HAND = Routing(
  expert_index_GSK=jnp.array([[[0, 1], [1, 0], [1, 0]]], jnp.int32),
  gates_GSK=jnp.array([[[0.7, 0.2], [0.0, 0.0], [0.0, 0.0]]], jnp.float32),
  position_GSK=jnp.array([[[0, 0], [1, 1], [2, 2]]], jnp.int32),
  kept_GSK=jnp.array([[[True, True], [False, False], [False, False]]]),
  probs_GSE=jnp.full((1, 3, 2), 0.5),
)


class HandRoutingTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_dispatch_and_combine_tensors(self):
    """dispatch[g,s,e,c] = 1 iff token s sits in slot c of e; combine =
    dispatch * g (GShard Alg. 1 lines 14-16)."""
    fn = self.variant(
      functools.partial(dispatch_and_combine_tensors, num_experts=2, capacity=1)
    )
    dispatch_GSEC, combine_GSEC = fn(_HAND)
    expected = np.zeros((1, 3, 2, 1))
    expected[0, 0, 0, 0] = 1  # t0 -> e0 slot 0
    expected[0, 0, 1, 0] = 1  # t0 -> e1 slot 0
    np.testing.assert_array_equal(dispatch_GSEC, expected)
    expected[0, 0, 0, 0], expected[0, 0, 1, 0] = 0.7, 0.2
    np.testing.assert_allclose(combine_GSEC, expected, rtol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_index_dispatch_and_combine(self):
    """x_EGCD[e, 0, 0] = x_t0 for e = 0, 1; y_t0 = 0.7 y_e0 + 0.2 y_e1, and
    y_t1 = y_t2 = 0 (dropped)."""
    x = jnp.array([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    x_EGCD = self.variant(
      functools.partial(index_dispatch, num_experts=2, capacity=1)
    )(x, _HAND)
    np.testing.assert_array_equal(x_EGCD, [[[[1.0, 2.0]]], [[[1.0, 2.0]]]])
    # Expert outputs: e0 slot 0 = [10, 20], e1 slot 0 = [100, 200].
    y_EGCD = jnp.array([[[[10.0, 20.0]]], [[[100.0, 200.0]]]])
    y = self.variant(
      functools.partial(index_combine, num_experts=2, capacity=1)
    )(y_EGCD, _HAND)
    # t0: 0.7 * [10, 20] + 0.2 * [100, 200] = [7 + 20, 14 + 40] = [27, 54].
    np.testing.assert_allclose(y, [[[27.0, 54.0], [0, 0], [0, 0]]], rtol=1e-6)


# G=1, S=3, E=2, K=1, every pair kept: t0 -> e1, t1 -> e0, t2 -> e1.
# Sorted by expert (stable): row 0 = t1 (e0); rows 1, 2 = t0, t2 (e1).
_HAND_K1 = Routing(
  expert_index_GSK=jnp.array([[[1], [0], [1]]], jnp.int32),
  gates_GSK=jnp.array([[[0.5], [0.25], [1.0]]], jnp.float32),
  position_GSK=jnp.array([[[0], [0], [1]]], jnp.int32),
  kept_GSK=jnp.ones((1, 3, 1), bool),
  probs_GSE=jnp.full((1, 3, 2), 0.5),
)


class HandSortedRoutingTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_sort_by_expert(self):
    """Rows in expert order, token order within an expert; dropped pairs
    have no row (N = G*S*K = 6 for _HAND)."""
    sort = self.variant(functools.partial(sort_by_expert, num_experts=2))
    sorted_ = sort(_HAND_K1)
    np.testing.assert_array_equal(sorted_.pair_N, [1, 0, 2])
    np.testing.assert_array_equal(sorted_.row_GSK, [[[1], [0], [2]]])
    np.testing.assert_array_equal(sorted_.group_sizes_E, [1, 2])
    # _HAND keeps pairs 0 (t0 -> e0) and 1 (t0 -> e1) only.
    sorted_ = sort(_HAND)
    np.testing.assert_array_equal(sorted_.pair_N, [0, 1, 6, 6, 6, 6])
    np.testing.assert_array_equal(sorted_.row_GSK, [[[0, 1], [6, 6], [6, 6]]])
    np.testing.assert_array_equal(sorted_.group_sizes_E, [1, 1])

  @chex.variants(with_jit=True, without_jit=True)
  def test_dropless_dispatch_and_combine(self):
    """x_ND = [x_t1, x_t0, x_t2]; with expert outputs y_ND = [10, 100, 1000]
    (per row) the combine gives t0: 0.5 * 100 = 50, t1: 0.25 * 10 = 2.5,
    t2: 1.0 * 1000 = 1000."""
    x = jnp.array([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    sorted_ = sort_by_expert(_HAND_K1, 2)
    x_ND = self.variant(dropless_dispatch)(x, sorted_)
    np.testing.assert_array_equal(x_ND, [[3.0, 4.0], [1.0, 2.0], [5.0, 6.0]])
    y_ND = jnp.array([[10.0, 10.0], [100.0, 100.0], [1000.0, 1000.0]])
    y = self.variant(dropless_combine)(y_ND, _HAND_K1, sorted_)
    np.testing.assert_allclose(
      y, [[[50.0, 50.0], [2.5, 2.5], [1000.0, 1000.0]]], rtol=1e-7
    )


def test_unknown_backend():
  with pytest.raises(ValueError, match="dispatch='nope'"):
    dispatch(jnp.zeros((1, 3, 2)), _HAND, 2, 1, "nope")
  with pytest.raises(ValueError, match="dispatch='nope'"):
    combine(jnp.zeros((2, 1, 1, 2)), _HAND, 2, 1, "nope")


def test_index_combine_checks_buffer_shape():
  """The expert buffer must be `[E, G, C, D]` for the given E and C."""
  with pytest.raises(AssertionError):
    index_combine(jnp.zeros((2, 1, 2, 2)), _HAND, 2, 1)


def test_dispatchers_registry():
  assert dispatch_lib.DISPATCHERS == ("einsum", "indices", "dropless")
