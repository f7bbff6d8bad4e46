"""Tests for `moe_jax.metrics.routing_metrics` on hand-built `Routing`s.

The definitions are those of REFERENCE (f); every expected number is worked
out in the comments from the small arrays below.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.metrics import (
  collapse_threshold,
  detect_collapse,
  expert_choice_metrics,
  expert_load,
  pool_batches,
  router_logit_metrics,
  routing_metrics,
)
from moe_jax.routing import Routing

# G=1, S=4, E=4, K=2, capacity C=2, k-major (GShard Alg. 1):
#   token  choices  kept          gates
#   t0     (e0, e1) (yes, yes)    (0.6, 0.3)
#   t1     (e0, e2) (yes, yes)    (0.5, 0.25)
#   t2     (e0, e1) (no,  no)     (0,   0)      lost every expert
#   t3     (e1, e0) (yes, no)     (0.7, 0)
# Slots: rank 0 e0: t0 0, t1 1, t2 2 (dropped); e1: t3 0. Rank 1: t0->e1 1,
# t1->e2 0, t2->e1 2 (dropped), t3->e0 3 (dropped).
# Choice counts c (before capacity): e0 4 (t0 t1 t2 t3), e1 3 (t0 t2 t3),
# e2 1 (t1), e3 0; T*K = 8.
_EXPERTS = [[[0, 1], [0, 2], [0, 1], [1, 0]]]
_KEPT = [[[True, True], [True, True], [False, False], [True, False]]]
_GATES = [[[0.6, 0.3], [0.5, 0.25], [0.0, 0.0], [0.7, 0.0]]]
_POSITION = [[[0, 1], [1, 0], [2, 2], [0, 3]]]
# Probabilities: t0, t1 uniform; t2, t3 one-hot.
_PROBS = [
  [
    [0.25, 0.25, 0.25, 0.25],
    [0.25, 0.25, 0.25, 0.25],
    [1.0, 0.0, 0.0, 0.0],
    [0.0, 1.0, 0.0, 0.0],
  ]
]


def _routing(experts, gates, position, kept, probs):
  return Routing(
    expert_index_GSK=jnp.asarray(experts, jnp.int32),
    gates_GSK=jnp.asarray(gates, jnp.float32),
    position_GSK=jnp.asarray(position, jnp.int32),
    kept_GSK=jnp.asarray(kept, bool),
    probs_GSE=jnp.asarray(probs, jnp.float32),
  )


_HAND = _routing(_EXPERTS, _GATES, _POSITION, _KEPT, _PROBS)

# Expected metrics, from the table above.
_EXPECTED = {
  # c_e, the choices before capacity (table above).
  "expert_counts": [4.0, 3.0, 1.0, 0.0],
  # f_e = c_e / (T K) = [4, 3, 1, 0] / 8.
  "expert_fraction": [0.5, 0.375, 0.125, 0.0],
  # mean c = 2; deviations [2, 1, -1, -2]; population variance
  # (4 + 1 + 1 + 4) / 4 = 2.5; std = 1.5811388; CV = 1.5811388 / 2.
  "load_cv": math.sqrt(2.5) / 2,
  # MaxVio = (max c - mean c) / mean c = (4 - 2) / 2 (Wang 2024 Eq. 4).
  "max_violation": 1.0,
  # Dead: f_e < 0.1 / E = 0.025 -> only e3 (f = 0).
  "dead_experts": 1.0,
  # Rank 1 not dispatched: t2 -> 1/4. Rank 2: t2, t3 -> 2/4.
  "drop_fraction_rank_1": 0.25,
  "drop_fraction_rank_2": 0.5,
  # Lost every expert: t2 -> 1/4.
  "drop_fraction": 0.25,
  # H(uniform over 4) = ln 4 for t0, t1; H(one-hot) = 0 for t2, t3.
  # mean = (2 ln 4) / 4 = ln 2 = 0.693147.
  "router_entropy": math.log(2),
  # Sum of gates of dispatched pairs / number of dispatched pairs
  # = (0.6 + 0.3 + 0.5 + 0.25 + 0.7) / 5 = 2.35 / 5 = 0.47.
  "router_confidence": 0.47,
  # mean_t max_e p = (0.25 + 0.25 + 1 + 1) / 4 = 0.625.
  "top1_probability": 0.625,
}


def test_metric_names():
  assert set(routing_metrics(_HAND)) == set(_EXPECTED)


@pytest.mark.parametrize("name", sorted(_EXPECTED))
def test_hand_built_routing(name):
  """REFERENCE (f): f = c/(TK), CV, MaxVio (Wang 2024 Eq. 4), dead experts
  (f < 0.1/E), drops per rank and of whole tokens (flaxformer
  fraction_tokens_left_behind), router entropy, router_confidence."""
  np.testing.assert_allclose(
    routing_metrics(_HAND)[name], _EXPECTED[name], rtol=1e-6, atol=1e-7
  )


@pytest.mark.parametrize("with_mask", [False, True])
def test_uniform_probabilities_have_entropy_ln_E(with_mask):
  """ST-MoE T14: uniform over E experts gives H = ln E (ln 32 = 3.466 for
  E = 32); with E = 8, ln 8 = 2.0794415. Balanced choices: CV = MaxVio = 0."""
  E, S = 8, 16
  experts = [[[s % E] for s in range(S)]]  # every expert twice
  routing = _routing(
    experts,
    [[[1.0 / E]] * S],
    [[[s // E] for s in range(S)]],
    [[[True]] * S],
    np.full((1, S, E), 1.0 / E),
  )
  mask = jnp.ones((1, S)) if with_mask else None
  metrics = routing_metrics(routing, mask)
  np.testing.assert_allclose(metrics["router_entropy"], math.log(8), rtol=1e-6)
  np.testing.assert_allclose(metrics["router_entropy"], 2.0794415, rtol=1e-6)
  np.testing.assert_allclose(metrics["expert_fraction"], np.full(E, 1 / E))
  assert float(metrics["load_cv"]) == pytest.approx(0.0, abs=1e-7)
  assert float(metrics["max_violation"]) == pytest.approx(0.0, abs=1e-7)
  assert float(metrics["dead_experts"]) == 0.0
  assert float(metrics["drop_fraction"]) == 0.0


def test_padding_is_excluded():
  """REFERENCE (i) (transformers #28505): metrics count real tokens only.
  Appending two padded tokens with garbage choices, gates, kept flags and
  probabilities leaves every metric of the hand case unchanged."""
  experts = [_EXPERTS[0] + [[3, 3], [2, 3]]]
  gates = [_GATES[0] + [[0.9, 0.9], [0.0, 0.0]]]
  position = [_POSITION[0] + [[0, 0], [5, 5]]]
  kept = [_KEPT[0] + [[True, True], [False, False]]]
  probs = [_PROBS[0] + [[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 1.0]]]
  padded = _routing(experts, gates, position, kept, probs)
  metrics = routing_metrics(padded, jnp.array([[1, 1, 1, 1, 0, 0]]))
  for name, expected in _EXPECTED.items():
    np.testing.assert_allclose(
      metrics[name], expected, rtol=1e-6, atol=1e-7, err_msg=name
    )


def test_metrics_pool_all_groups():
  """The module docs: metrics are over the whole batch, all groups together.
  Two groups: the hand group and one where every choice is e3 (K = 2 needs
  distinct experts, so (e3, e2)), all kept with gates 0.5.
    counts: hand [4, 3, 1, 0] + [0, 0, 4, 4] = [4, 3, 5, 4]; T K = 16
    f = [0.25, 0.1875, 0.3125, 0.25]; mean c = 4;
    MaxVio = (5 - 4) / 4 = 0.25
    drop_fraction = 1 lost token / 8 = 0.125
    router_confidence = (2.35 + 8 * 0.5) / (5 + 8) = 6.35 / 13 = 0.488462
  """
  experts = np.concatenate([_EXPERTS, [[[3, 2]] * 4]])
  gates = np.concatenate([_GATES, [[[0.5, 0.5]] * 4]])
  position = np.concatenate([_POSITION, [[[0, 0], [1, 1], [2, 2], [3, 3]]]])
  kept = np.concatenate([_KEPT, np.ones((1, 4, 2), bool)])
  probs = np.concatenate([_PROBS, np.full((1, 4, 4), 0.25)])
  metrics = routing_metrics(_routing(experts, gates, position, kept, probs))
  np.testing.assert_allclose(
    metrics["expert_fraction"], [0.25, 0.1875, 0.3125, 0.25], rtol=1e-6
  )
  np.testing.assert_allclose(metrics["max_violation"], 0.25, rtol=1e-6)
  np.testing.assert_allclose(metrics["drop_fraction"], 0.125, rtol=1e-6)
  np.testing.assert_allclose(metrics["router_confidence"], 6.35 / 13, rtol=1e-6)


# Expert choice, E = 3, S = 4, C = 1 (K = E: rank e is expert e):
#   e0 took t0, e1 took t0, e2 took t2; t1 and t3 no expert.
#   experts per token [2, 0, 1, 0] -> min 0, max 2, mean 3/4.
#   at least 1: t0, t2 -> 1/2; at least 2: t0 -> 1/4; at least 3: 0.
#   loads (tokens taken) [1, 1, 1] -> CV = MaxVio = 0, f = 1/3 each.
#   drop_fraction (no expert) = 2/4.
#   gates of kept pairs 0.5, 0.4, 0.7 -> router_confidence 1.6 / 3.
_EC_KEPT = [
  [
    [True, True, False],
    [False, False, False],
    [False, False, True],
    [False, False, False],
  ]
]
_EC_PROBS = [
  [[0.5, 0.4, 0.1], [0.3, 0.3, 0.4], [0.2, 0.1, 0.7], [0.4, 0.3, 0.3]]
]


def test_expert_choice_metrics_by_hand():
  kept = np.array(_EC_KEPT)
  probs = np.array(_EC_PROBS)
  route = _routing(
    np.broadcast_to(np.arange(3), (1, 4, 3)),
    np.where(kept, probs, 0.0),
    np.where(kept, 0, 1),
    kept,
    probs,
  )
  got = expert_choice_metrics(route)
  expected = {
    "experts_per_token_min": 0.0,
    "experts_per_token_max": 2.0,
    "experts_per_token_mean": 0.75,
    "tokens_with_at_least_1_experts": 0.5,
    "tokens_with_at_least_2_experts": 0.25,
    "tokens_with_at_least_3_experts": 0.0,
    "load_cv": 0.0,
    "max_violation": 0.0,
    "expert_fraction": [1 / 3] * 3,
    "drop_fraction": 0.5,
    "router_confidence": 1.6 / 3,
  }
  for name, value in expected.items():
    np.testing.assert_allclose(got[name], value, atol=1e-6, err_msg=name)
  assert not any(k.startswith("drop_fraction_rank") for k in got)
  # Padding t0 out: t1..t3 remain; t0's two experts no longer count.
  padded = expert_choice_metrics(route, jnp.array([[0, 1, 1, 1]]))
  np.testing.assert_allclose(padded["experts_per_token_max"], 1.0)
  np.testing.assert_allclose(padded["drop_fraction"], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(padded["max_violation"], 2.0, rtol=1e-6)


def test_expert_choice_metrics_list_at_most_four_thresholds():
  E = 8
  route = _routing(
    np.broadcast_to(np.arange(E), (1, 2, E)),
    np.zeros((1, 2, E)),
    np.zeros((1, 2, E), int),
    np.ones((1, 2, E), bool),
    np.full((1, 2, E), 1 / E),
  )
  names = [k for k in expert_choice_metrics(route) if "at_least" in k]
  assert names == [f"tokens_with_at_least_{n}_experts" for n in (1, 2, 3, 4)]


# ---------------------------------------------------------------------------
# Evaluation over several batches: MaxVio per batch and pooled.


def _top1_routing(experts_S):
  """G = 1, K = 1, E = 4, every choice kept, uniform probabilities."""
  S = len(experts_S)
  return _routing(
    [[[e] for e in experts_S]],
    [[[1.0]] * S],
    [[[0]] * S],
    [[[True]] * S],
    np.full((1, S, 4), 0.25),
  )


def _numpy_max_violation(counts):
  counts = np.asarray(counts, np.float64)
  return (counts.max() - counts.mean()) / counts.mean()  # Wang 2024 Eq. 4


def test_pooled_max_violation_differs_from_the_batch_mean():
  """Wang 2024 Table 2 reports MaxVio_global. Two batches of 8 tokens, top-1
  over E = 4 experts:
    batch 1: counts [5, 1, 1, 1]  MaxVio (5 - 2) / 2 = 1.5
    batch 2: counts [1, 5, 1, 1]  MaxVio 1.5
  mean of the batches' MaxVio (max_violation_batch) = 1.5;
  pooled counts [6, 6, 2, 2], mean 4: MaxVio_global = (6 - 4) / 4 = 0.5.
  Adding batch 3, counts [1, 1, 3, 3] (MaxVio (3 - 2) / 2 = .5): pooled
  [7, 7, 5, 5], mean 6, MaxVio_global (7 - 6) / 6 = 1/6, while the batch
  mean is (1.5 + 1.5 + .5) / 3 = 7/6."""
  batches = [
    [0, 0, 0, 0, 0, 1, 2, 3],
    [1, 1, 1, 1, 1, 0, 2, 3],
    [0, 1, 2, 2, 2, 3, 3, 3],
  ]
  per_batch = []
  for i, experts in enumerate(batches):
    found = routing_metrics(_top1_routing(experts))
    per_batch.append({f"moe/layer_01/{k}": v for k, v in found.items()})
    per_batch[-1]["lm_loss"] = np.float32(i)
  pooled = pool_batches(per_batch[:2])
  np.testing.assert_allclose(pooled["moe/layer_01/max_violation_batch"], 1.5)
  np.testing.assert_allclose(pooled["moe/layer_01/max_violation_global"], 0.5)
  np.testing.assert_array_equal(
    pooled["moe/layer_01/expert_counts"], [6, 6, 2, 2]
  )
  assert "moe/layer_01/max_violation" not in pooled
  np.testing.assert_allclose(pooled["lm_loss"], 0.5)  # others: the mean
  np.testing.assert_allclose(
    pooled["moe/layer_01/expert_fraction"], [6 / 16, 6 / 16, 2 / 16, 2 / 16]
  )
  pooled = pool_batches(per_batch)
  counts = np.sum([np.bincount(b, minlength=4) for b in batches], axis=0)
  np.testing.assert_array_equal(counts, [7, 7, 5, 5])
  np.testing.assert_allclose(
    pooled["moe/layer_01/max_violation_global"],
    _numpy_max_violation(counts),  # 1/6
  )
  np.testing.assert_allclose(
    pooled["moe/layer_01/max_violation_batch"],
    np.mean(
      [_numpy_max_violation(np.bincount(b, minlength=4)) for b in batches]
    ),
  )
  np.testing.assert_allclose(pooled["moe/layer_01/max_violation_batch"], 7 / 6)


def test_opposite_overloads_pool_to_perfect_balance():
  """Batch 1 sends every token to expert 0, batch 2 to expert 1 (E = 2):
  each batch's MaxVio is (4 - 2) / 2 = 1, the pooled counts [4, 4] give 0.
  The suffixes pair counts with their MaxVio (DeepSeek's before/after b)."""
  per_batch = [
    {
      "moe/layer_03/expert_counts_after_bias": np.asarray([4.0, 0.0]),
      "moe/layer_03/max_violation_after_bias": np.float32(1.0),
    },
    {
      "moe/layer_03/expert_counts_after_bias": np.asarray([0.0, 4.0]),
      "moe/layer_03/max_violation_after_bias": np.float32(1.0),
    },
  ]
  pooled = pool_batches(per_batch)
  assert set(pooled) == {
    "moe/layer_03/expert_counts_after_bias",
    "moe/layer_03/max_violation_after_bias_batch",
    "moe/layer_03/max_violation_after_bias_global",
  }
  key = "moe/layer_03/max_violation_after_bias"
  np.testing.assert_allclose(pooled[f"{key}_batch"], 1.0)
  np.testing.assert_allclose(pooled[f"{key}_global"], 0.0)


# ---------------------------------------------------------------------------
# Router logit statistics (ST-MoE §3.3-3.4, Eq. 5).


def test_router_logit_metrics_by_hand():
  """max |z| and mean_t logsumexp_e z_t over real tokens; the padded row
  holds NaN and a huge logit, and counts in neither.

    t0 z = [0, 0]            logsumexp = ln 2
    t1 z = [ln 3, 0]         logsumexp = ln(3 + 1) = ln 4
    t2 z = [-5, ln 1 = 0]    logsumexp = ln(e^-5 + 1)
    t3 padded
  max |z| = 5; mean logsumexp = (ln 2 + ln 4 + ln(1 + e^-5)) / 3.
  """
  z = np.array([[[0.0, 0.0], [math.log(3), 0.0], [-5.0, 0.0], [np.nan, 1e9]]])
  mask = np.array([[1, 1, 1, 0]])
  got = router_logit_metrics(jnp.asarray(z, jnp.float32), jnp.asarray(mask))
  expected = (math.log(2) + math.log(4) + math.log(1 + math.exp(-5))) / 3
  assert float(got["router_logit_max_abs"]) == pytest.approx(5.0)
  assert float(got["router_logsumexp"]) == pytest.approx(expected, rel=1e-6)


def test_router_logit_metrics_match_numpy_on_random_logits():
  """Float64 NumPy reference on random bfloat16 logits (computed in float32)."""
  rng = np.random.default_rng(0)
  z = rng.normal(scale=4.0, size=(3, 16, 8))
  mask = rng.random((3, 16)) < 0.8
  z16 = jnp.asarray(z, jnp.bfloat16)
  z64 = np.asarray(z16, np.float64)[mask]
  m = z64.max(-1, keepdims=True)
  lse = m[:, 0] + np.log(np.exp(z64 - m).sum(-1))
  got = router_logit_metrics(z16, jnp.asarray(mask))
  assert got["router_logsumexp"].dtype == jnp.float32
  np.testing.assert_allclose(got["router_logit_max_abs"], np.abs(z64).max())
  np.testing.assert_allclose(got["router_logsumexp"], lse.mean(), rtol=1e-6)
  no_mask = router_logit_metrics(z16)
  z_all = np.asarray(z16, np.float64)
  m_all = z_all.max(-1, keepdims=True)
  lse_all = m_all[..., 0] + np.log(np.exp(z_all - m_all).sum(-1))
  np.testing.assert_allclose(
    no_mask["router_logsumexp"], lse_all.mean(), rtol=1e-6
  )


# ---- detect_collapse on synthetic metrics.jsonl rows ----------------------


def _rows(shares_by_step, layer="layer_01", split="train"):
  return [
    {"step": step, f"{split}/moe/{layer}/expert_fraction": list(shares)}
    for step, shares in shares_by_step
  ]


def test_collapse_threshold_by_hand():
  # 1/E + 3/7 (1/K - 1/E): E = 8, K = 1 -> 1/8 + 3/7 * 7/8 = 1/2;
  # E = 4, K = 2 -> 1/4 + 3/7 * 1/4 = 10/28.
  assert collapse_threshold(8) == pytest.approx(0.5)
  assert collapse_threshold(4, top_k=2) == pytest.approx(10 / 28)
  with pytest.raises(ValueError, match="top_k=3"):
    collapse_threshold(2, top_k=3)


def test_detect_collapse_needs_patience_rows_above_the_line():
  even = [1 / 8] * 8
  spike = [0.6] + [0.4 / 7] * 7  # one expert takes 60% > 50%
  steps = [(10, even), (20, spike), (30, even)]  # one batch: no collapse
  steps += [(40, spike), (50, spike), (60, spike), (70, even)]
  rows = _rows(steps) + [{"step": 70, "eval/lm_loss": 1.0}]
  report = detect_collapse(rows)["layer_01"]
  assert report["collapsed"] and report["collapse_step"] == 40
  np.testing.assert_allclose(
    report["max_share"], [0.125, 0.6, 0.125, 0.6, 0.6, 0.6, 0.125]
  )
  assert report["final_max_share"] == pytest.approx(0.125)
  assert list(report["steps"]) == [10, 20, 30, 40, 50, 60, 70]
  # Two rows above the line are not enough; exactly on the line is not
  # above it.
  line = [0.5] + [0.5 / 7] * 7
  rows = _rows([(1, spike), (2, spike), (3, line), (4, spike)])
  assert not detect_collapse(rows)["layer_01"]["collapsed"]
  assert detect_collapse(rows)["layer_01"]["collapse_step"] is None


def test_detect_collapse_per_layer_split_and_top_k():
  # Top-2 over E = 4: each token's two choices are distinct, so 0.5 is
  # total collapse; the line is 10/28 = 0.357.
  two = [0.45, 0.45, 0.05, 0.05]
  rows = _rows([(s, two) for s in (1, 2, 3)], layer="layer_03")
  rows += _rows([(s, [0.25] * 4) for s in (1, 2, 3)], layer="layer_01")
  report = detect_collapse(rows, top_k=2)
  assert sorted(report) == ["layer_01", "layer_03"]
  assert (
    report["layer_03"]["collapsed"]
    and report["layer_03"]["dominant_expert"] == 0
  )
  assert not report["layer_01"]["collapsed"]
  assert not detect_collapse(rows, top_k=1)["layer_03"][
    "collapsed"
  ]  # line .679
  eval_rows = _rows([(5, two)] * 3, split="eval")
  assert detect_collapse(eval_rows, split="eval", top_k=2)["layer_01"][
    "collapsed"
  ]
  assert detect_collapse(eval_rows) == {}
  steps, fraction_TE = expert_load(rows)["layer_03"]
  assert list(steps) == [1, 2, 3] and fraction_TE.shape == (3, 4)
