"""Tests for `moe_jax.routing`: gates, capacity, drop priority.

Expected values come from hand arithmetic (written out in comments) or from
`reference_route`, a float64 NumPy re-implementation that walks the (token,
choice) pairs one at a time with a per-expert counter, as GShard Alg. 1 does.
Nothing here calls the code under test to produce an expected value.
"""

import functools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from moe_jax import routing
from moe_jax.routing import (
  CAPACITY_RULES,
  PRIORITIES,
  ROUTERS,
  SECOND_POLICIES,
  assign_slots,
  compute_capacity,
  route_tokens,
)

# ---------------------------------------------------------------------------
# Float64 loop reference, written from the papers.


def _softmax64(z_E):
  z_E = np.asarray(z_E, np.float64)
  w_E = np.exp(z_E - z_E.max())
  return w_E / w_E.sum()


def reference_route(
  logits_GSE,
  *,
  router,
  top_k,
  capacity,
  priority="k_major",
  second_policy="all",
  threshold=0.2,
  u_GSK=None,
  padding_GS=None,
  renormalize_after_drop=False,
):
  """Tokens-choose routing of each group, one pair at a time, in float64.

  - p_t = softmax(z_t) over all E experts (Switch Eq. 1).
  - The K chosen experts: largest logits first, ties to the lower index.
  - Gates: raw p (Switch Eq. 2, "top_k"), p / sum of the K chosen p (GShard
    Alg. 1, "top_k_renormalized"), softmax over the K chosen logits (Mixtral).
  - A later rank is eligible under "all"; iff g > threshold (Mesh-TF);
    iff 2 g > u (GShard Alg. 1). Padded tokens are never eligible.
  - Pairs are visited rank by rank (k_major), token by token (token_major) or
    rank by rank over tokens sorted by descending top-1 probability, stably
    (batch priority, Riquelme 2021). Each eligible pair takes its expert's
    counter as its slot and is kept iff slot < C; the counter advances even
    on overflow (GShard Alg. 1).
  """
  logits_GSE = np.asarray(logits_GSE, np.float64)
  G, S, E = logits_GSE.shape
  K = top_k
  probs_GSE = np.zeros((G, S, E))
  expert_GSK = np.zeros((G, S, K), np.int64)
  gate_GSK = np.zeros((G, S, K))
  for g in range(G):
    for s in range(S):
      z_E = logits_GSE[g, s]
      p_E = _softmax64(z_E)
      probs_GSE[g, s] = p_E
      chosen = sorted(range(E), key=lambda e: (-z_E[e], e))[:K]
      expert_GSK[g, s] = chosen
      if router in ("switch", "top_k"):
        gate_GSK[g, s] = [p_E[e] for e in chosen]
      elif router in ("gshard", "top_k_renormalized"):
        total = sum(p_E[e] for e in chosen)
        gate_GSK[g, s] = [p_E[e] / total for e in chosen]
      elif router == "mixtral":
        gate_GSK[g, s] = _softmax64([z_E[e] for e in chosen])
      else:
        raise AssertionError(router)

  eligible_GSK = np.zeros((G, S, K), bool)
  for g in range(G):
    for s in range(S):
      for r in range(K):
        if padding_GS is not None and not padding_GS[g, s]:
          eligible_GSK[g, s, r] = False
        elif r == 0 or second_policy == "all":
          eligible_GSK[g, s, r] = True
        elif second_policy == "threshold":
          eligible_GSK[g, s, r] = gate_GSK[g, s, r] > threshold
        elif second_policy == "random":
          eligible_GSK[g, s, r] = 2.0 * gate_GSK[g, s, r] > u_GSK[g, s, r]
        else:
          raise AssertionError(second_policy)

  position_GSK = np.full((G, S, K), -1, np.int64)
  kept_GSK = np.zeros((G, S, K), bool)
  for g in range(G):
    tokens = list(range(S))
    if priority == "batch_priority":
      # Python's sort is stable: equal top-1 probabilities keep token order.
      tokens = sorted(tokens, key=lambda s: -probs_GSE[g, s].max())
    if priority == "token_major":
      pairs = [(s, r) for s in tokens for r in range(K)]
    else:
      pairs = [(s, r) for r in range(K) for s in tokens]
    counter_E = [0] * E
    for s, r in pairs:
      if not eligible_GSK[g, s, r]:
        continue
      e = expert_GSK[g, s, r]
      position_GSK[g, s, r] = counter_E[e]
      kept_GSK[g, s, r] = counter_E[e] < capacity
      counter_E[e] += 1

  gates_GSK = np.where(kept_GSK, gate_GSK, 0.0)
  if renormalize_after_drop:
    for g in range(G):
      for s in range(S):
        total = gates_GSK[g, s].sum()
        if total > 0:
          gates_GSK[g, s] = gates_GSK[g, s] / total
  return dict(
    expert_index=expert_GSK,
    gates=gates_GSK,
    pre_drop_gates=gate_GSK,
    position=position_GSK,
    kept=kept_GSK,
    eligible=eligible_GSK,
    probs=probs_GSE,
  )


# ---------------------------------------------------------------------------
# Hypothesis strategy: small fixed shapes (few compiles), distinct logits.

SHAPES_GSE = ((1, 1, 1), (1, 6, 4), (2, 8, 3), (3, 5, 8))


def _distinct_logits(rng, G, S, E):
  """Logits whose values within a token differ by at least 0.05."""
  gaps_GSE = 0.05 + rng.exponential(0.6, size=(G, S, E))
  sorted_GSE = np.cumsum(gaps_GSE, axis=-1) - rng.uniform(1.0, 4.0, (G, S, 1))
  perm_GSE = np.argsort(rng.random((G, S, E)), axis=-1)
  return np.take_along_axis(sorted_GSE, perm_GSE, axis=-1).astype(np.float32)


@st.composite
def routing_cases(draw, second_policies=SECOND_POLICIES):
  G, S, E = draw(st.sampled_from(SHAPES_GSE))
  top_k = draw(st.integers(1, min(E, 3)))
  routers = sorted(n for n, c in ROUTERS.items() if c.top_k in (None, top_k))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  padding = draw(st.sampled_from(["none", "random", "all_real", "one_group"]))
  if padding == "none":
    padding_GS = None
  elif padding == "random":
    padding_GS = rng.random((G, S)) < 0.7
  elif padding == "all_real":
    padding_GS = np.ones((G, S), bool)
  else:  # the last group fully padded
    padding_GS = np.ones((G, S), bool)
    padding_GS[-1] = False
  return dict(
    logits=_distinct_logits(rng, G, S, E),
    router=draw(st.sampled_from(routers)),
    top_k=top_k,
    capacity=draw(st.sampled_from(sorted({0, 1, 2, S // 2, S, S + 3}))),
    priority=draw(st.sampled_from(PRIORITIES)),
    second_policy=draw(st.sampled_from(second_policies)),
    threshold=draw(st.sampled_from([0.1, 0.2, 0.3])),
    renormalize_after_drop=draw(st.booleans()),
    padding=padding_GS,
    rng=jax.random.key(seed),
  )


def _run(case):
  padding = case["padding"]
  return route_tokens(
    jnp.asarray(case["logits"]),
    router=case["router"],
    top_k=case["top_k"],
    capacity=case["capacity"],
    priority=case["priority"],
    second_policy=case["second_policy"],
    second_threshold=case["threshold"],
    renormalize_after_drop=case["renormalize_after_drop"],
    padding_mask_GS=None if padding is None else jnp.asarray(padding),
    rng=case["rng"],
  )


def _reference(case, u_GSK=None):
  return reference_route(
    case["logits"],
    router=case["router"],
    top_k=case["top_k"],
    capacity=case["capacity"],
    priority=case["priority"],
    second_policy=case["second_policy"],
    threshold=case["threshold"],
    u_GSK=u_GSK,
    padding_GS=case["padding"],
    renormalize_after_drop=case["renormalize_after_drop"],
  )


def _real_GS(case):
  G, S, _ = case["logits"].shape
  return np.ones((G, S), bool) if case["padding"] is None else case["padding"]


@hypothesis.given(routing_cases())
def test_route_tokens_matches_float64_loop_reference(case):
  """route_tokens equals the GShard Alg. 1 pair-by-pair loop (float64).

  Covers every router of ROUTERS (Switch Eq. 2, GShard Alg. 1, Mixtral),
  capacities 0..S+3, the three drop priorities (GShard Alg. 1, MaxText,
  Riquelme 2021 BPR), the second-choice policies and padding.
  """
  G, S, _ = case["logits"].shape
  K = case["top_k"]
  u_GSK = None
  if case["second_policy"] == "random":
    # The documented policy draws u ~ U(0, 1) of shape [G, S, K] from `rng`.
    u_GSK = np.asarray(
      jax.random.uniform(case["rng"], (G, S, K), jnp.float32), np.float64
    )
  ref = _reference(case, u_GSK)
  real_GS = _real_GS(case)
  # Skip draws whose decisions sit within float32 noise of a boundary.
  later_g = ref["pre_drop_gates"][..., 1:][real_GS]
  if case["second_policy"] == "threshold":
    hypothesis.assume(np.all(np.abs(later_g - case["threshold"]) > 1e-4))
  if case["second_policy"] == "random":
    u_later = u_GSK[..., 1:][real_GS]
    hypothesis.assume(np.all(np.abs(2 * later_g - u_later) > 1e-4))
  if case["priority"] == "batch_priority":
    for g in range(G):
      top1 = np.sort(ref["probs"][g].max(-1)[real_GS[g]])
      hypothesis.assume(np.all(np.diff(top1) > 1e-5))

  out = _run(case)
  np.testing.assert_array_equal(out.expert_index_GSK, ref["expert_index"])
  np.testing.assert_array_equal(out.kept_GSK, ref["kept"])
  kept = ref["kept"]
  np.testing.assert_array_equal(
    np.asarray(out.position_GSK)[kept], ref["position"][kept]
  )
  np.testing.assert_allclose(out.gates_GSK, ref["gates"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(out.probs_GSE, ref["probs"], rtol=1e-5, atol=1e-7)
  assert out.expert_index_GSK.dtype == jnp.int32
  assert out.position_GSK.dtype == jnp.int32
  assert out.gates_GSK.dtype == jnp.float32
  assert out.kept_GSK.dtype == jnp.bool_


@hypothesis.given(routing_cases())
def test_routing_invariants(case):
  """Invariants of capacity-limited top-K routing (GShard §2.2, Alg. 1).

  At most K distinct experts per token; at most C pairs per expert and group
  with unique slots < C; padded tokens never dispatched; combine weights
  non-negative, zero where dropped, summing to <= 1; and the drop priority
  is respected (k-major: a later rank never displaces a first choice;
  token-major: an earlier token never loses its slot to a later one; BPR:
  a more confident token never loses its first choice to a less confident).
  """
  out = _run(case)
  expert_GSK = np.asarray(out.expert_index_GSK)
  kept_GSK = np.asarray(out.kept_GSK)
  position_GSK = np.asarray(out.position_GSK)
  gates_GSK = np.asarray(out.gates_GSK, np.float64)
  top1_GS = np.asarray(out.probs_GSE).max(-1)
  real_GS = _real_GS(case)
  G, S, K = expert_GSK.shape
  E = case["logits"].shape[-1]
  C = case["capacity"]

  for g in range(G):
    for s in range(S):
      # K distinct experts per token, so at most K kept and none twice.
      assert len(set(expert_GSK[g, s].tolist())) == K
      assert np.all((0 <= expert_GSK[g, s]) & (expert_GSK[g, s] < E))
    for e in range(E):
      slots = position_GSK[g][kept_GSK[g] & (expert_GSK[g] == e)]
      assert len(slots) <= C
      assert len(set(slots.tolist())) == len(slots)
      assert np.all((0 <= slots) & (slots < C))

  assert not np.any(kept_GSK & ~real_GS[..., None])
  assert np.all(gates_GSK >= 0)
  assert np.all(gates_GSK[~kept_GSK] == 0.0)
  assert np.all(gates_GSK.sum(-1) <= 1 + 1e-6)

  # Pairs known to be eligible: kept ones, real first choices, and every real
  # pair under the "all" policy.
  eligible_GSK = kept_GSK | (real_GS[..., None] & (np.arange(K) == 0))
  if case["second_policy"] == "all":
    eligible_GSK |= real_GS[..., None]
  lost_GSK = eligible_GSK & ~kept_GSK
  for g in range(G):
    for s, r in zip(*np.nonzero(kept_GSK[g])):
      e = expert_GSK[g, s, r]
      same_e = expert_GSK[g] == e
      if case["priority"] in ("k_major", "batch_priority") and r > 0:
        # A rank-r pair kept for e: no lower-rank pair for e was dropped.
        assert not np.any(lost_GSK[g][:, :r] & same_e[:, :r])
      if case["priority"] == "k_major":
        # Within a rank, an earlier token never loses to a later one.
        assert not np.any(lost_GSK[g][:s, r] & same_e[:s, r])
      if case["priority"] == "token_major":
        assert not np.any(lost_GSK[g][:s] & same_e[:s])
      if case["priority"] == "batch_priority":
        surer_S = top1_GS[g] > top1_GS[g, s] + 1e-6
        assert not np.any(lost_GSK[g][surer_S, r] & same_e[surer_S, r])


# ---------------------------------------------------------------------------
# Golden hand-sized cases.

# G=1, S=4, E=3. The logits are log p, so softmax gives p back:
#   t0 p=[0.5, 0.3, 0.2 ]  top-2 = (e0, e1)  top-1 prob 0.5
#   t1 p=[0.6, 0.1, 0.3 ]  top-2 = (e0, e2)  top-1 prob 0.6
#   t2 p=[0.2, 0.7, 0.1 ]  top-2 = (e1, e0)  top-1 prob 0.7
#   t3 p=[0.1, 0.25, 0.65] top-2 = (e2, e1)  top-1 prob 0.65
_PROBS_SE = np.array(
  [[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.2, 0.7, 0.1], [0.1, 0.25, 0.65]]
)
_LOGITS_GSE = np.log(_PROBS_SE)[None].astype(np.float32)
_EXPERTS_GSK = np.array([[[0, 1], [0, 2], [1, 0], [2, 1]]])

_GOLDEN = {
  # k-major, C=1. Rank 0: t0->e0 slot 0 kept; t1->e0 slot 1 dropped;
  # t2->e1 slot 0 kept; t3->e2 slot 0 kept. Rank 1: t0->e1 slot 1, t1->e2
  # slot 1, t2->e0 slot 2, t3->e1 slot 2: all dropped.
  "k_major": (
    [[[0, 1], [1, 1], [0, 2], [0, 2]]],
    [[[True, False], [False, False], [True, False], [True, False]]],
  ),
  # token-major, C=1. t0: e0 slot 0 kept, e1 slot 0 kept; t1: e0 slot 1
  # dropped, e2 slot 0 kept; t2: e1 slot 1, e0 slot 2 dropped; t3: e2 slot 1,
  # e1 slot 2 dropped.
  "token_major": (
    [[[0, 0], [1, 0], [1, 2], [1, 2]]],
    [[[True, True], [False, True], [False, False], [False, False]]],
  ),
  # Batch priority, C=1: tokens sorted by top-1 prob 0.7, 0.65, 0.6, 0.5 ->
  # order t2, t3, t1, t0. Rank 0: t2->e1 slot 0, t3->e2 slot 0, t1->e0 slot
  # 0 kept; t0->e0 slot 1 dropped. Rank 1: t2->e0 slot 2, t3->e1 slot 1,
  # t1->e2 slot 1, t0->e1 slot 2: all dropped.
  "batch_priority": (
    [[[1, 2], [0, 1], [0, 2], [0, 1]]],
    [[[False, False], [True, False], [True, False], [True, False]]],
  ),
}


class GoldenRoutingTest(chex.TestCase):
  """Hand-computed routing of one group, with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("k_major", "token_major", "batch_priority")
  def test_priorities_by_hand(self, priority):
    """Drop priorities: GShard Alg. 1 (k-major), MaxText (token-major), BPR
    (Riquelme 2021 §3.1); raw-probability gates (Switch Eq. 2)."""
    fn = self.variant(
      functools.partial(
        route_tokens, router="top_k", top_k=2, capacity=1, priority=priority
      )
    )
    out = fn(jnp.asarray(_LOGITS_GSE))
    position, kept = _GOLDEN[priority]
    kept = np.array(kept)
    np.testing.assert_array_equal(out.expert_index_GSK, _EXPERTS_GSK)
    np.testing.assert_array_equal(out.kept_GSK, kept)
    np.testing.assert_array_equal(
      np.asarray(out.position_GSK)[kept], np.array(position)[kept]
    )
    # Gates of "top_k" are the raw p of the chosen experts, 0 where dropped.
    raw = np.array([[[0.5, 0.3], [0.6, 0.3], [0.7, 0.2], [0.65, 0.25]]])
    np.testing.assert_allclose(
      out.gates_GSK, np.where(kept, raw, 0.0), rtol=1e-6
    )

  @chex.variants(with_jit=True, without_jit=True)
  def test_gshard_gates_and_threshold_policy(self):
    """GShard Alg. 1 line 5 renormalisation; Mesh-TF threshold policy."""
    fn = self.variant(
      functools.partial(
        route_tokens,
        router="gshard",
        top_k=2,
        capacity=4,
        second_policy="threshold",
        second_threshold=0.3,
      )
    )
    out = fn(jnp.asarray(_LOGITS_GSE))
    # g_i = p_i / (p1 + p2):
    #   t0 0.5/0.8 = 0.625,  0.3/0.8 = 0.375    (0.375 > 0.3: kept)
    #   t1 0.6/0.9 = 2/3,    0.3/0.9 = 1/3      (kept)
    #   t2 0.7/0.9 = 7/9,    0.2/0.9 = 2/9      (0.222 <= 0.3: discarded)
    #   t3 0.65/0.9 = 13/18, 0.25/0.9 = 5/18    (0.278 <= 0.3: discarded)
    gates = np.array(
      [[[0.625, 0.375], [2 / 3, 1 / 3], [7 / 9, 0], [13 / 18, 0]]]
    )
    np.testing.assert_allclose(out.gates_GSK, gates, rtol=1e-6)
    np.testing.assert_array_equal(out.kept_GSK, gates > 0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_padding_takes_no_slot(self):
    """Padded tokens are removed before capacity (REFERENCE (i); Megatron-LM
    PR #5542), so they cannot push real tokens out."""
    fn = self.variant(
      functools.partial(route_tokens, router="switch", top_k=1, capacity=1)
    )
    # t0 padded: t1 now takes e0's slot 0; t2->e1 slot 0; t3->e2 slot 0.
    out = fn(
      jnp.asarray(_LOGITS_GSE), padding_mask_GS=jnp.array([[0, 1, 1, 1]])
    )
    np.testing.assert_array_equal(
      out.kept_GSK[..., 0], [[False, True, True, True]]
    )
    np.testing.assert_array_equal(out.position_GSK[0, 1:, 0], [0, 0, 0])
    # Switch gates are raw p: [0, 0.6, 0.7, 0.65].
    np.testing.assert_allclose(
      out.gates_GSK[..., 0], [[0.0, 0.6, 0.7, 0.65]], rtol=1e-6
    )

  @chex.variants(with_jit=True, without_jit=True)
  def test_renormalize_after_drop(self):
    """fairseq/DeepSpeed: a token that lost its second expert gets weight 1."""
    fn = self.variant(
      functools.partial(
        route_tokens,
        router="top_k",
        top_k=2,
        capacity=1,
        priority="token_major",
        renormalize_after_drop=True,
      )
    )
    out = fn(jnp.asarray(_LOGITS_GSE))
    # token-major C=1 keeps t0 (e0, e1) and t1 (e2) only (see _GOLDEN):
    #   t0: 0.5, 0.3 -> 0.5/0.8 = 0.625, 0.375;  t1: 0, 0.3 -> 0, 1.
    gates = np.array([[[0.625, 0.375], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])
    np.testing.assert_allclose(out.gates_GSK, gates, rtol=1e-6)


def test_top_k_ties_go_to_the_lower_expert():
  """Equal logits: the lower expert index ranks first (top_k_gates docs)."""
  logits = jnp.array([[[0.0, 1, 1], [2, 2, -1], [1, 1, 1], [-1, 0, 0]]])
  out = route_tokens(logits, router="top_k", top_k=2, capacity=1)
  np.testing.assert_array_equal(
    out.expert_index_GSK, [[[1, 2], [0, 1], [0, 1], [1, 2]]]
  )


def test_batch_priority_sort_is_stable():
  """BPR (Riquelme 2021): equal top-1 probabilities keep token order."""
  # Top-1 probabilities (E=3): t0 = t2 = e/(e+2) = 0.576 (identical rows),
  # t1 = e^3/(e^3+2) = 0.909, t3 = e^2/(e^2+2) = 0.787.
  # Stable order t1, t3, t0, t2; C=1: t1->e1, t3->e2, t0->e0 slot 0 kept;
  # t2->e0 slot 1 dropped. (An unstable sort could drop t0 instead.)
  logits = jnp.array([[[1.0, 0, 0], [0, 3, 0], [1, 0, 0], [0, 0, 2]]])
  out = route_tokens(
    logits, router="switch", top_k=1, capacity=1, priority="batch_priority"
  )
  np.testing.assert_array_equal(
    out.kept_GSK[..., 0], [[True, True, False, True]]
  )


# ---------------------------------------------------------------------------
# Second-choice policies.


def _two_token_types(n):
  """n tokens of each type, alternating, as logits `[1, 2n, 4]`."""
  probs = np.array([[0.56, 0.24, 0.1, 0.1], [0.81, 0.09, 0.05, 0.05]])
  return jnp.asarray(np.log(np.tile(probs, (n, 1)))[None].astype(np.float32))


_route_random = functools.partial(
  route_tokens, router="gshard", top_k=2, capacity=8000, second_policy="random"
)


def test_random_policy_keep_rate_is_twice_g2():
  """GShard Alg. 1 line 12: the second choice is kept with probability 2 g2.

  Two token types, 4000 of each, no capacity limit (C = S):
    A: p = [0.56, 0.24, 0.1, 0.1]    g2 = 0.24 / 0.8  = 0.3 -> rate 0.6
    B: p = [0.81, 0.09, 0.05, 0.05]  g2 = 0.09 / 0.9  = 0.1 -> rate 0.2
  Binomial std: sqrt(0.6*0.4/4000) = 0.0077, sqrt(0.2*0.8/4000) = 0.0063;
  the tolerance 0.03 is about 4 std.
  """
  out = _route_random(_two_token_types(4000), rng=jax.random.key(0))
  kept_second = np.asarray(out.kept_GSK[0, :, 1])
  assert np.all(np.asarray(out.kept_GSK[0, :, 0]))
  assert abs(kept_second[0::2].mean() - 0.6) < 0.03
  assert abs(kept_second[1::2].mean() - 0.2) < 0.03


def test_random_policy_is_deterministic_given_the_key():
  """Same key, same kept set; the key is the only source of randomness."""
  logits = _two_token_types(4000)
  a = _route_random(logits, rng=jax.random.key(3))
  b = _route_random(logits, rng=jax.random.key(3))
  c = _route_random(logits, rng=jax.random.key(4))
  np.testing.assert_array_equal(a.kept_GSK, b.kept_GSK)
  assert not np.array_equal(a.kept_GSK, c.kept_GSK)


# ---------------------------------------------------------------------------
# Capacity.


@pytest.mark.parametrize(
  "rule, S, E, K, CF, min_capacity, expected",
  [
    # switch: ceil(CF * S / E), no K. 1.25 * 512 / 8 = 80.0 -> 80.
    ("switch", 512, 8, 1, 1.25, 0, 80),
    ("switch", 512, 8, 2, 1.25, 0, 80),  # K is ignored
    # 1.0 * 100 / 8 = 12.5 -> ceil 13.
    ("switch", 100, 8, 1, 1.0, 0, 13),
    # Float noise: 1.1 * 400 = 440.00000000000006, / 8 = 55.00000000000001;
    # a naive ceil gives 56, the intended value is 55.
    ("switch", 400, 8, 1, 1.1, 0, 55),
    # min_capacity: 1.0 * 32 / 64 = 0.5 -> ceil 1 -> max(1, 4) = 4.
    ("switch", 32, 64, 1, 1.0, 4, 4),
    # clamp to S: 4.0 * 8 / 2 = 16 -> min(16, 8) = 8.
    ("switch", 8, 2, 1, 4.0, 0, 8),
    # min_capacity above S still clamps: ceil(4/8)=1 -> max 8 -> min(8, 4) = 4.
    ("switch", 4, 8, 1, 1.0, 8, 4),
    # gshard: ceil(CF * S * K / E). 1.0 * 512 * 2 / 8 = 128 (= 2S/E, §2.2).
    ("gshard", 512, 8, 2, 1.0, 0, 128),
    # 1.25 * 100 * 2 / 8 = 31.25 -> 32.
    ("gshard", 100, 8, 2, 1.25, 0, 32),
    # 1.1 * 200 * 2 / 8 = 55.00000000000001 -> 55 (float noise).
    ("gshard", 200, 8, 2, 1.1, 0, 55),
    # flaxformer: int(round(CF * S / E)). 1.25 * 60 / 8 = 9.375 -> 9.
    ("flaxformer", 60, 8, 2, 1.25, 0, 9),
    # 1.3 * 60 / 8 = 9.75 -> 10.
    ("flaxformer", 60, 8, 1, 1.3, 0, 10),
    # Python round is half-to-even, as in flaxformer: 1.0 * 20 / 8 = 2.5 -> 2.
    ("flaxformer", 20, 8, 1, 1.0, 0, 2),
    # With min_expert_capacity=4: 1.0 * 16 / 8 = 2 -> max(2, 4) = 4.
    ("flaxformer", 16, 8, 1, 1.0, 4, 4),
    # vmoe: ceil(CF * S * K / E) up to a multiple of 4.
    # 1.0 * 100 * 2 / 8 = 25 -> 28.
    ("vmoe", 100, 8, 2, 1.0, 0, 28),
    # 1.05 * 196 * 2 / 8 = 51.45 -> 52 (already a multiple of 4).
    ("vmoe", 196, 8, 2, 1.05, 0, 52),
    # 1.0 * 64 * 1 / 8 = 8 -> 8.
    ("vmoe", 64, 8, 1, 1.0, 0, 8),
    # 1.0 * 6 * 1 / 8 = 0.75 -> ceil 1 -> multiple of 4: 4 (<= S = 6).
    ("vmoe", 6, 8, 1, 1.0, 0, 4),
    # megatron: ceil(K * S / E * CF). 2 * 512 / 8 * 1.25 = 160.
    ("megatron", 512, 8, 2, 1.25, 0, 160),
    # maxtext: int(max(ceil(S * K / E) * CF, CF)).
    # ceil(512 * 2 / 8) = 128; 128 * 1.25 = 160 -> 160.
    ("maxtext", 512, 8, 2, 1.25, 0, 160),
    # ceil(100 * 2 / 8) = 25; 25 * 1.0 = 25 -> 25 (vmoe gives 28).
    ("maxtext", 100, 8, 2, 1.0, 0, 25),
    # The ceil comes before CF: ceil(9 / 8) = 2; 2 * 2.0 = 4 -> 4, where
    # gshard gives ceil(2.0 * 9 / 8) = ceil(2.25) = 3.
    ("maxtext", 9, 8, 1, 2.0, 0, 4),
    # int() truncates: ceil(64 / 8) = 8; 8 * 1.3 = 10.4 -> 10 (gshard: 11).
    ("maxtext", 64, 8, 1, 1.3, 0, 10),
    # MaxText's float arithmetic, noise included: ceil(100 / 1) = 100;
    # 100 * 0.57 = 56.99999999999999 in float64 -> int 56.
    ("maxtext", 100, 1, 1, 0.57, 0, 56),
    # min_capacity: ceil(16 / 8) = 2; 2 * 1.0 = 2 -> max(2, 4) = 4.
    ("maxtext", 16, 8, 1, 1.0, 4, 4),
    # praxis: int(S * CF / E), no K, up to a multiple of 4 when above the
    # minimum. 512 * 2.0 / 8 = 128 -> 128 (the 2S/E of GShard top-2).
    ("praxis", 512, 8, 2, 2.0, 0, 128),
    # 100 * 1.0 / 8 = 12.5 -> int 12 -> 12 (K = 2 is ignored).
    ("praxis", 100, 8, 2, 1.0, 0, 12),
    # 100 * 1.25 / 8 = 15.625 -> int 15 -> multiple of 4: 16.
    ("praxis", 100, 8, 1, 1.25, 0, 16),
    # 60 * 1.25 / 8 = 9.375 -> int 9 -> 12 (flaxformer rounds to 9).
    ("praxis", 60, 8, 1, 1.25, 0, 12),
    # int(48 / 8) = 6 > min 5 -> rounded up to 8.
    ("praxis", 48, 8, 1, 1.0, 5, 8),
    # int(40 / 8) = 5 <= min 5 -> 5, not rounded (praxis keeps its
    # expert_capacity_dim when the automatic value is not larger).
    ("praxis", 40, 8, 1, 1.0, 5, 5),
    # int(8 / 8) = 1 <= min 1 -> 1 (praxis top-2 default, capacity dim 1).
    ("praxis", 8, 8, 1, 1.0, 1, 1),
    # int(8 / 8) = 1 > min 0 -> 4 (<= S = 8).
    ("praxis", 8, 8, 1, 1.0, 0, 4),
  ],
)
def test_compute_capacity_by_hand(rule, S, E, K, CF, min_capacity, expected):
  """Capacity formulas of REFERENCE (c): Switch Eq. 3, GShard §2.2,
  flaxformer, vmoe, Megatron-LM, MaxText, praxis."""
  got = compute_capacity(S, E, K, CF, rule=rule, min_capacity=min_capacity)
  assert got == expected
  assert isinstance(got, int)


def test_every_capacity_rule_has_a_hand_case():
  """Guard: a new rule in CAPACITY_RULES needs a hand case above."""
  assert set(CAPACITY_RULES) == {
    "switch",
    "gshard",
    "flaxformer",
    "vmoe",
    "megatron",
    "maxtext",
    "praxis",
  }


@pytest.mark.parametrize("rule", sorted(CAPACITY_RULES))
@pytest.mark.parametrize("CF", [0.0, -1.0])
def test_compute_capacity_rejects_non_positive_factor(rule, CF):
  """REFERENCE (c): CF > 0; the error names the value."""
  with pytest.raises(ValueError, match=f"capacity_factor={CF}"):
    compute_capacity(64, 8, 1, CF, rule=rule)


def test_compute_capacity_rejects_unknown_rule():
  with pytest.raises(ValueError, match="'nope'"):
    compute_capacity(64, 8, 1, 1.0, rule="nope")


def test_compute_capacity_rejects_negative_min_capacity():
  with pytest.raises(ValueError, match="min_capacity=-1"):
    compute_capacity(64, 8, 1, 1.0, min_capacity=-1)


@hypothesis.given(
  st.sampled_from(sorted(CAPACITY_RULES)),
  st.integers(1, 1024),
  st.integers(1, 64),
  st.integers(1, 4),
  st.floats(0.05, 8.0),
  st.integers(0, 16),
)
def test_compute_capacity_bounds(rule, S, E, K, CF, min_capacity):
  """C is in [min(min_capacity, S), S] and at least the rule's share.

  Switch Eq. 3 / GShard §2.2: C >= CF * S (* K) / E unless clamped to S.
  """
  C = compute_capacity(S, E, K, CF, rule=rule, min_capacity=min_capacity)
  share = CF * S * (K if CAPACITY_RULES[rule].times_k else 1) / E
  assert min(min_capacity, S) <= C <= S
  rounding = CAPACITY_RULES[rule].rounding
  if rounding == "ceil":
    assert C >= min(S, share - 1e-6)
  elif rounding == "round":
    assert C >= min(S, share - 0.5 - 1e-6)
  else:  # int() truncation (MaxText, praxis) loses less than one slot
    assert C >= min(S, share - 1 - 1e-6)
  if C < S and C > min_capacity:
    assert C % CAPACITY_RULES[rule].multiple_of == 0


# ---------------------------------------------------------------------------
# Errors name the offending value (STYLE rule 13).


def _route(**overrides):
  kwargs = dict(router="top_k", top_k=1, capacity=2)
  kwargs.update(overrides)
  return route_tokens(jnp.asarray(_LOGITS_GSE), **kwargs)  # E = 3


def test_unknown_router():
  with pytest.raises(ValueError, match="router='nope'"):
    _route(router="nope")


def test_top_k_exceeds_num_experts():
  with pytest.raises(ValueError, match=r"top_k=4.*num_experts=3"):
    _route(top_k=4)


def test_top_k_zero():
  with pytest.raises(ValueError, match="top_k=0"):
    _route(top_k=0)


def test_unknown_priority():
  with pytest.raises(ValueError, match="priority='nope'"):
    _route(priority="nope")


def test_unknown_second_policy():
  with pytest.raises(ValueError, match="second_policy='nope'"):
    _route(second_policy="nope")


def test_random_policy_needs_rng():
  with pytest.raises(ValueError, match="rng"):
    _route(top_k=2, second_policy="random")


def test_batch_priority_needs_scores():
  with pytest.raises(ValueError, match="priority_score_GS"):
    assign_slots(
      jnp.zeros((1, 3, 1), jnp.int32),
      jnp.ones((1, 3, 1), bool),
      num_experts=2,
      capacity=1,
      priority="batch_priority",
    )


@pytest.mark.parametrize(
  "router, good_k, bad_k", [("switch", 1, 2), ("gshard", 2, 1)]
)
def test_fixed_k_routers_reject_other_k(router, good_k, bad_k):
  """Switch is top-1 (Fedus 2021 §2.1); GShard is top-2 (Lepikhin 2020)."""
  _route(router=router, top_k=good_k)
  with pytest.raises(ValueError, match=f"top_k={bad_k}"):
    _route(router=router, top_k=bad_k)


# ---------------------------------------------------------------------------
# Gates: gradients, dtype, equivalences.


def test_switch_gate_carries_the_router_gradient():
  """Switch Eq. 2: y = p_{e*} E_{e*}(x), so the router gets a task gradient.

  With expert outputs reduced to constants c_t, sum_t y_t = sum_t c_t p_{t,e*}
  and d/dz_{t,j} = c_t p_{t,e*} (1{j = e*} - p_{t,j}) (softmax derivative).
  For t0 (p = [0.5, 0.3, 0.2], e* = 0, c = 2): 2 * 0.5 * [0.5, -0.3, -0.2]
  = [0.5, -0.3, -0.2].
  """
  c = np.array([[2.0, -3.0, 1.0, 0.5]], np.float32)

  def sum_of_outputs(logits):
    r = route_tokens(logits, router="switch", top_k=1, capacity=4)
    return jnp.sum(r.gates_GSK[..., 0] * c)

  grad = np.asarray(jax.grad(sum_of_outputs)(jnp.asarray(_LOGITS_GSE)))
  expected = np.zeros((1, 4, 3))
  for t in range(4):
    p = _softmax64(_LOGITS_GSE[0, t])
    e_star = int(np.argmax(p))
    for j in range(3):
      expected[0, t, j] = c[0, t] * p[e_star] * ((j == e_star) - p[j])
  np.testing.assert_allclose(expected[0, 0], [0.5, -0.3, -0.2], rtol=1e-6)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
  assert np.all(np.abs(grad) > 1e-2)


def test_gshard_top2_gates_carry_the_router_gradient():
  """GShard Alg. 1 line 5: g1 = p1/(p1+p2) = sigmoid(z1 - z2), so
  d(c1 g1 + c2 g2)/dz1 = (c1 - c2) g1 g2 = -d/dz2, and 0 for other experts.

  t0: g = (0.625, 0.375) on (e0, e1), c = (1.5, -0.5):
  d/dz0 = 2 * 0.625 * 0.375 = 0.46875, d/dz1 = -0.46875, d/dz2 = 0.
  """
  c = np.array([1.5, -0.5], np.float32)

  def sum_of_outputs(logits):
    r = route_tokens(logits, router="gshard", top_k=2, capacity=4)
    return jnp.sum(r.gates_GSK * c)

  grad = np.asarray(jax.grad(sum_of_outputs)(jnp.asarray(_LOGITS_GSE)))
  expected = np.zeros((1, 4, 3))
  for t, (a, b) in enumerate(_EXPERTS_GSK[0]):
    g1 = _PROBS_SE[t, a] / (_PROBS_SE[t, a] + _PROBS_SE[t, b])
    d = (c[0] - c[1]) * g1 * (1 - g1)
    expected[0, t, a], expected[0, t, b] = d, -d
  np.testing.assert_allclose(expected[0, 0], [0.46875, -0.46875, 0.0])
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_renormalized_top1_gate_is_one_and_has_no_router_gradient():
  """REFERENCE (b)/(i): K = 1 with renormalisation gives g = p/p = 1, so the
  router receives no task gradient (why Switch uses the raw p). The gate is
  exactly 1; its derivative p'/p - p p'/p^2 is 0 up to float32 rounding."""
  z = jnp.asarray(_LOGITS_GSE)

  def sum_of_gates(logits):
    r = route_tokens(logits, router="top_k_renormalized", top_k=1, capacity=4)
    return jnp.sum(r.gates_GSK)

  gates = route_tokens(
    z, router="top_k_renormalized", top_k=1, capacity=4
  ).gates_GSK
  np.testing.assert_array_equal(gates, np.ones((1, 4, 1), np.float32))
  np.testing.assert_allclose(jax.grad(sum_of_gates)(z), 0.0, atol=1e-6)


def test_bfloat16_logits_route_in_float32():
  """Switch §2.4 selective precision: the router softmax runs in float32."""
  z = jnp.asarray(_LOGITS_GSE, jnp.bfloat16)
  out = route_tokens(z, router="gshard", top_k=2, capacity=4)
  assert out.probs_GSE.dtype == jnp.float32
  assert out.gates_GSK.dtype == jnp.float32
  z64 = np.asarray(z.astype(jnp.float32), np.float64)
  p = np.array([[_softmax64(row) for row in z64[0]]])
  np.testing.assert_allclose(out.probs_GSE, p, rtol=1e-6)


@hypothesis.given(st.integers(0, 2**31 - 1), st.integers(1, 3))
def test_mixtral_gates_equal_renormalized_top_k(seed, top_k):
  """softmax over the K largest logits (Mixtral) = p_e / sum_{TopK} p
  (REFERENCE (b), "renorm"): exp(z_e)/sum_{TopK} exp(z_j) either way."""
  z = jnp.asarray(_distinct_logits(np.random.default_rng(seed), 3, 5, 8))
  a = route_tokens(z, router="mixtral", top_k=top_k, capacity=5)
  b = route_tokens(z, router="top_k_renormalized", top_k=top_k, capacity=5)
  np.testing.assert_array_equal(a.expert_index_GSK, b.expert_index_GSK)
  chex.assert_trees_all_close(a.gates_GSK, b.gates_GSK, rtol=1e-6, atol=1e-7)


def test_router_probabilities_is_the_full_softmax():
  """Switch Eq. 1: p_i = exp(z_i) / sum_j exp(z_j), over all E experts."""
  # z = [0, ln 2, ln 5] -> exp = [1, 2, 5], sum 8 -> p = [0.125, 0.25, 0.625].
  z = jnp.log(jnp.array([[[1.0, 2.0, 5.0]]]))
  np.testing.assert_allclose(
    routing.router_probabilities(z), [[[0.125, 0.25, 0.625]]], rtol=1e-6
  )


@hypothesis.given(
  seed=st.integers(0, 2**31 - 1),
  num_experts=st.sampled_from([2, 5, 8]),
  top_k=st.integers(1, 5),
)
def test_top_k_indices_match_lax_top_k_with_ties_and_minus_inf(
  seed, num_experts, top_k
):
  """K argmax passes (partitioned per group by GSPMD) choose exactly what
  jax.lax.top_k chooses: the same order, ties to the lower index, also
  among -inf logits."""
  top_k = min(top_k, num_experts)
  rng = np.random.default_rng(seed)
  logits = rng.integers(-1, 2, (2, 6, num_experts)).astype(np.float32)
  logits[rng.random(logits.shape) < 0.3] = -np.inf
  expected = jax.lax.top_k(logits, top_k)[1]
  got = routing.top_k_indices(jnp.asarray(logits), top_k)
  np.testing.assert_array_equal(got, expected)


_REDUCTIONS = frozenset(
  {
    "argmax",
    "argmin",
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_or",
    "reduce_and",
    "reduce_prod",
  }
)


def _constant_reductions(jaxpr, constant_in):
  """Names of the reductions in `jaxpr` whose every input is a constant
  (derived from literals and constants only, not from the inputs): what
  XLA folds at compile time. `constant_in`: per invar, whether constant."""
  constant = dict(zip(jaxpr.invars, constant_in, strict=True))
  constant.update({v: True for v in jaxpr.constvars})
  found = []

  def is_const(v):
    return isinstance(v, jax.extend.core.Literal) or constant.get(v, False)

  for eqn in jaxpr.eqns:
    inputs = [is_const(v) for v in eqn.invars]
    if eqn.primitive.name in _REDUCTIONS and all(inputs):
      found.append(eqn.primitive.name)
    inner = eqn.params.get("jaxpr")
    if inner is not None:
      found += _constant_reductions(getattr(inner, "jaxpr", inner), inputs)
    for v in eqn.outvars:
      constant[v] = all(inputs)
  return found


def test_top_k_indices_reduces_no_constant():
  """No argmax over a constant (the all-False `taken` of the first pass was
  one): XLA constant-folds such a reduction at compile time, which took
  seconds at eval size. The checker itself flags a constant argmax."""
  x_GSE = jnp.zeros((8, 512, 16))
  for k in (1, 2, 4):
    closed = jax.make_jaxpr(lambda x, k=k: routing.top_k_indices(x, k))(x_GSE)
    assert _constant_reductions(closed.jaxpr, [False]) == []
  folded = jax.make_jaxpr(
    lambda x: x + jnp.argmax(~jnp.zeros(x.shape, bool), axis=-1)[..., None]
  )(x_GSE)
  assert _constant_reductions(folded.jaxpr, [False]) == ["argmax"]


# ---------------------------------------------------------------------------
# GShard Alg. 1 slot counting of rejected second choices.


def gshard_alg1_reference(logits_GSE, u_GS, capacity, counting):
  """GShard (Lepikhin 2020) Alg. 1, line by line, in float64, per group:

    for s in tokens:                       # pass 1: first choices
      g1, e1, g2, e2 = top_2(softmax(z_s)); g1, g2 = g / (g1 + g2)
      c = c_{e1}; if c < C: keep (s, e1) at slot c; c_{e1} += 1
    for s in tokens:                       # pass 2: second choices
      rnd = u_s
      c = c_{e2}; if c < C and 2 g2 > rnd: keep (s, e2) at slot c
      c_{e2} += 1                          # "gshard_alg1": always
                                           # "kept_only": only if 2 g2 > rnd

  Returns kept `[G, S, 2]`, position `[G, S, 2]` (-1: took no slot) and the
  gates after capacity `[G, S, 2]`.
  """
  logits_GSE = np.asarray(logits_GSE, np.float64)
  G, S, E = logits_GSE.shape
  kept = np.zeros((G, S, 2), bool)
  position = np.full((G, S, 2), -1, np.int64)
  gates = np.zeros((G, S, 2))
  for g in range(G):
    top2 = []
    for s in range(S):
      p_E = _softmax64(logits_GSE[g, s])
      e1, e2 = sorted(range(E), key=lambda e: (-p_E[e], e))[:2]
      total = p_E[e1] + p_E[e2]
      top2.append((p_E[e1] / total, e1, p_E[e2] / total, e2))
    counter_E = [0] * E
    for s in range(S):  # pass 1
      g1, e1, _, _ = top2[s]
      position[g, s, 0] = counter_E[e1]
      if counter_E[e1] < capacity:
        kept[g, s, 0] = True
        gates[g, s, 0] = g1
      counter_E[e1] += 1
    for s in range(S):  # pass 2
      _, _, g2, e2 = top2[s]
      accepted = 2.0 * g2 > u_GS[g, s]
      if accepted or counting == "gshard_alg1":
        position[g, s, 1] = counter_E[e2]
      if counter_E[e2] < capacity and accepted:
        kept[g, s, 1] = True
        gates[g, s, 1] = g2
      if accepted or counting == "gshard_alg1":
        counter_E[e2] += 1
  return kept, position, gates


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_second_choice_counting_matches_gshard_alg1_loop(seed):
  """Both countings against the float64 loop of GShard Alg. 1 above, with
  the draws u the "random" policy takes from its key (u[..., 1] for the
  second choice), at capacities from scarce to ample."""
  G, S, E = 2, 16, 4
  logits = _distinct_logits(np.random.default_rng(seed), G, S, E)
  key = jax.random.key(100 + seed)
  u_GS = np.asarray(jax.random.uniform(key, (G, S, 2), jnp.float32))[..., 1]
  differ = False
  for capacity in (2, 4, 6, 8):
    refs = {}
    for counting in routing.SECOND_CHOICE_COUNTINGS:
      kept, position, gates = gshard_alg1_reference(
        logits, u_GS.astype(np.float64), capacity, counting
      )
      refs[counting] = kept
      out = route_tokens(
        jnp.asarray(logits),
        router="gshard",
        top_k=2,
        capacity=capacity,
        second_policy="random",
        second_choice_counting=counting,
        rng=key,
      )
      np.testing.assert_array_equal(out.kept_GSK, kept)
      took_slot = position >= 0
      np.testing.assert_array_equal(
        np.asarray(out.position_GSK)[took_slot], position[took_slot]
      )
      np.testing.assert_allclose(out.gates_GSK, gates, rtol=1e-5, atol=1e-7)
    # Alg. 1's counter only runs ahead of Lingvo's: it never keeps more.
    assert np.all(refs["gshard_alg1"] <= refs["kept_only"])
    differ |= bool(np.any(refs["gshard_alg1"] != refs["kept_only"]))
  assert differ  # the draws discriminate the two countings


class SecondChoiceCountingTest(chex.TestCase):
  """Hand-worked GShard Alg. 1 counting, with and without jit."""

  # E = 2, so the renormalised gates are p itself. Threshold 0.2 rejects
  # t0's second choice (0.1) and keeps the others (0.3, 0.4, 0.4).
  #   t0 p=[0.9, 0.1]  first e0, second e1 (rejected)
  #   t1 p=[0.7, 0.3]  first e0, second e1
  #   t2 p=[0.6, 0.4]  first e0, second e1
  #   t3 p=[0.4, 0.6]  first e1, second e0
  _LOGITS = np.log(
    np.array([[[0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.4, 0.6]]])
  ).astype(np.float32)

  def _route(self, counting, padding_mask_GS=None):
    fn = self.variant(
      functools.partial(
        route_tokens,
        router="gshard",
        top_k=2,
        capacity=2,
        second_policy="threshold",
        second_threshold=0.2,
        second_choice_counting=counting,
      )
    )
    return fn(jnp.asarray(self._LOGITS), padding_mask_GS=padding_mask_GS)

  @chex.variants(with_jit=True, without_jit=True)
  def test_rejected_second_choice_takes_a_slot_only_in_alg1(self):
    # C = 2, k-major. Pass 1: e0 <- t0 slot 0, t1 slot 1, t2 slot 2
    # (dropped); e1 <- t3 slot 0. Counters e0 = 3, e1 = 1.
    # kept_only, pass 2: t0 rejected, no slot; t1 -> e1 slot 1 kept;
    #   t2 -> e1 slot 2 dropped; t3 -> e0 slot 3 dropped.
    # gshard_alg1, pass 2: t0 rejected but takes e1 slot 1; t1 -> e1 slot 2
    #   dropped; t2 -> e1 slot 3 dropped; t3 -> e0 slot 3 dropped.
    lingvo = self._route("kept_only")
    alg1 = self._route("gshard_alg1")
    np.testing.assert_array_equal(
      lingvo.kept_GSK, [[[1, 0], [1, 1], [0, 0], [1, 0]]]
    )
    np.testing.assert_array_equal(
      alg1.kept_GSK, [[[1, 0], [1, 0], [0, 0], [1, 0]]]
    )
    np.testing.assert_array_equal(
      np.asarray(alg1.position_GSK), [[[0, 1], [1, 2], [2, 3], [0, 3]]]
    )
    np.testing.assert_array_equal(
      np.asarray(lingvo.position_GSK)[0, 1:], [[1, 1], [2, 2], [0, 3]]
    )
    np.testing.assert_allclose(
      lingvo.gates_GSK, [[[0.9, 0], [0.7, 0.3], [0, 0], [0.6, 0]]], rtol=1e-6
    )
    np.testing.assert_allclose(
      alg1.gates_GSK, [[[0.9, 0], [0.7, 0], [0, 0], [0.6, 0]]], rtol=1e-6
    )

  @chex.variants(with_jit=True, without_jit=True)
  def test_padding_takes_no_slot_in_alg1(self):
    # t0 padded: pass 1 e0 <- t1 slot 0, t2 slot 1; e1 <- t3 slot 0.
    # Pass 2: t1 -> e1 slot 1 kept; t2 -> e1 slot 2 dropped; t3 -> e0 slot
    # 2 dropped. t0's second choice counts nowhere, padded as it is.
    out = self._route("gshard_alg1", jnp.array([[0, 1, 1, 1]]))
    np.testing.assert_array_equal(
      out.kept_GSK, [[[0, 0], [1, 1], [1, 0], [1, 0]]]
    )


def test_unknown_second_choice_counting():
  with pytest.raises(ValueError, match="second_choice_counting='gshard'"):
    _route(second_choice_counting="gshard")


# ---------------------------------------------------------------------------
# Router softmax without selective precision.


def test_bfloat16_softmax_rounds_the_probabilities():
  """Switch Table 2's bfloat16 router: p = softmax(z) computed in bfloat16
  is within a few bfloat16 ulps (2^-8 relative each: exp, sum, divide) of
  the float64 softmax of the bfloat16-rounded z, every value is a bfloat16
  number, and it differs from the float32 (selective precision) softmax;
  both come back as float32."""
  z = np.random.default_rng(3).normal(size=(2, 16, 8)).astype(np.float32)
  z16 = np.asarray(jnp.asarray(z).astype(jnp.bfloat16), np.float64)
  p64 = np.array([[_softmax64(row) for row in group] for group in z])
  p64_of_z16 = np.array([[_softmax64(row) for row in group] for group in z16])
  p16 = routing.router_probabilities(jnp.asarray(z), jnp.bfloat16)
  p32 = routing.router_probabilities(jnp.asarray(z))
  assert p16.dtype == jnp.float32 and p32.dtype == jnp.float32
  p16 = np.asarray(p16)
  rounded = np.asarray(jnp.asarray(p16).astype(jnp.bfloat16), np.float32)
  np.testing.assert_array_equal(p16, rounded)
  np.testing.assert_allclose(p16, p64_of_z16, rtol=6 * 2.0**-8)
  np.testing.assert_allclose(p32, p64, rtol=1e-6)
  assert np.max(np.abs(p16 - np.asarray(p32))) > 1e-4


def test_bfloat16_softmax_flows_into_the_gates():
  """route_tokens(softmax_dtype=bfloat16): Switch gates (raw p) are the
  bfloat16-rounded probabilities of the chosen experts."""
  z = np.random.default_rng(4).normal(size=(1, 8, 4)).astype(np.float32)
  out = route_tokens(
    jnp.asarray(z),
    router="switch",
    top_k=1,
    capacity=8,
    softmax_dtype=jnp.bfloat16,
  )
  z16 = np.asarray(jnp.asarray(z).astype(jnp.bfloat16), np.float64)
  top1 = np.array([[_softmax64(row).max() for row in z16[0]]])[..., None]
  gates = np.asarray(out.gates_GSK)
  np.testing.assert_array_equal(
    gates, np.asarray(jnp.asarray(gates).astype(jnp.bfloat16), np.float32)
  )
  np.testing.assert_allclose(gates, top1, rtol=6 * 2.0**-8)


def test_unknown_softmax_dtype():
  with pytest.raises(ValueError, match="softmax_dtype"):
    routing.router_probabilities(jnp.zeros((1, 2, 3)), jnp.float16)
