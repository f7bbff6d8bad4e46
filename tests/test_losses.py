"""Tests for `moe_jax.losses`: balancing losses and the router z-loss.

Each loss is pinned to hand arithmetic (f, P and the sums written out below)
or to a float64 NumPy loop written from the paper's definition.
"""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import losses
from moe_jax.losses import (
  LOAD_BALANCING_LOSSES,
  all_choices_load_balancing_loss,
  dispatch_fraction,
  gshard_load_balancing_loss,
  k_normalized_load_balancing_loss,
  load_balancing_loss,
  mean_probability,
  router_z_loss,
)

_ALL = (
  ("switch", load_balancing_loss),
  ("gshard", gshard_load_balancing_loss),
  ("all_choices", all_choices_load_balancing_loss),
  ("k_normalized", k_normalized_load_balancing_loss),
)


def _call(fn, probs, experts, mask=None):
  return float(
    fn(
      jnp.asarray(probs, jnp.float32),
      jnp.asarray(experts, jnp.int32),
      None if mask is None else jnp.asarray(mask),
    )
  )


def test_registry_names():
  assert dict(_ALL) == LOAD_BALANCING_LOSSES
  assert losses.balancing_loss_fn("gshard") is gshard_load_balancing_loss
  with pytest.raises(ValueError, match="load_balancing='nope'"):
    losses.balancing_loss_fn("nope")


# ---------------------------------------------------------------------------
# Uniform and collapsed routing.

# E=4, S=8, K=2, probs all 1/4; token t chooses (t mod 4, (t+1) mod 4).
#   rank-0 counts: every expert 2 of 8 tokens -> f = 1/4; P = 1/4.
#   Switch      E * sum_e f_e P_e       = 4 * 4 * (1/4 * 1/4)       = 1
#   GShard      (1/E) sum_e (c_e/S) m_e = (1/4) * 4 * (1/4 * 1/4)   = 1/16
#   all-choices f_e = 4/8 = 1/2 (e is in 4 tokens' top-2), sum f = 2:
#               E * sum_e f_e P_e       = 4 * 4 * (1/2 * 1/4)       = 2 = K
#   k-normalised (E/K) sum_e f_e P_e   = 2 * 4 * (1/2 * 1/4)       = 1
_UNIFORM_PROBS = np.full((1, 8, 4), 0.25)
_UNIFORM_EXPERTS = np.array([[[t % 4, (t + 1) % 4] for t in range(8)]])


@pytest.mark.parametrize(
  "name, expected",
  [
    ("switch", 1.0),
    ("gshard", 1 / 16),
    ("all_choices", 2.0),
    ("k_normalized", 1.0),
  ],
)
def test_uniform_routing(name, expected):
  """Balanced values: Switch Eqs. 4-6 -> 1; GShard Alg. 1 -> 1/E^2;
  flaxformer all-k -> K; Megatron k-normalised -> 1 (REFERENCE (d))."""
  fn = LOAD_BALANCING_LOSSES[name]
  got = _call(fn, _UNIFORM_PROBS, _UNIFORM_EXPERTS)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


# Collapsed, E=4, S=8: every token has p = [1, 0, 0, 0].
#   K=1, choices all e0: f = [1, 0, 0, 0], P = [1, 0, 0, 0], sum f P = 1.
#     Switch 4 * 1 = 4 = E;  GShard (1/4) * 1 = 1/4 = 1/E;
#     all-choices 4 * 1 = 4;  k-normalised (4/1) * 1 = 4.
#   K=2, choices all (e0, e1): rank-0 f = [1, 0, 0, 0]; all-k f = [1, 1, 0, 0],
#     sum f P = 1*1 + 1*0 = 1.
#     Switch 4;  GShard 1/4;  all-choices 4 * 1 = 4;  k-normalised (4/2) = 2.
_COLLAPSED_PROBS = np.tile(np.array([1.0, 0, 0, 0]), (1, 8, 1))


@pytest.mark.parametrize(
  "name, K, expected",
  [
    ("switch", 1, 4.0),
    ("gshard", 1, 0.25),
    ("all_choices", 1, 4.0),
    ("k_normalized", 1, 4.0),
    ("switch", 2, 4.0),
    ("gshard", 2, 0.25),
    ("all_choices", 2, 4.0),
    ("k_normalized", 2, 2.0),
  ],
)
def test_collapsed_routing(name, K, expected):
  """Collapse: Switch (Fedus 2021 Eq. 4) -> E; GShard (Alg. 1) -> 1/E."""
  experts = np.tile(np.array([0, 1])[:K], (1, 8, 1))
  got = _call(LOAD_BALANCING_LOSSES[name], _COLLAPSED_PROBS, experts)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# A hand-sized asymmetric case.

# E=3, S=4, K=2:
#   t0 p=[0.6, 0.3, 0.1]  choices (0, 1)
#   t1 p=[0.2, 0.5, 0.3]  choices (1, 2)
#   t2 p=[0.7, 0.2, 0.1]  choices (0, 1)
#   t3 p=[0.1, 0.3, 0.6]  choices (2, 1)
# P = column means = [1.6, 1.3, 1.1] / 4 = [0.4, 0.325, 0.275]
# rank-0 f = [2, 1, 1] / 4 = [0.5, 0.25, 0.25]
#   sum f P = 0.2 + 0.08125 + 0.06875 = 0.35
#   Switch = 3 * 0.35 = 1.05;  GShard = 0.35 / 3 = 0.1166667
# all-k f = [2, 4, 2] / 4 = [0.5, 1.0, 0.5]  (sum = K = 2)
#   sum f P = 0.2 + 0.325 + 0.1375 = 0.6625
#   all-choices = 3 * 0.6625 = 1.9875;  k-normalised = 1.9875 / 2 = 0.99375
_ASYM_PROBS = np.array(
  [[[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]]
)
_ASYM_EXPERTS = np.array([[[0, 1], [1, 2], [0, 1], [2, 1]]])
_ASYM_EXPECTED = {
  "switch": 1.05,
  "gshard": 0.35 / 3,
  "all_choices": 1.9875,
  "k_normalized": 0.99375,
}


@pytest.mark.parametrize("name", sorted(_ASYM_EXPECTED))
def test_asymmetric_case_by_hand(name):
  """f and P of REFERENCE (d) on a 4-token group (values in the comment)."""
  got = _call(LOAD_BALANCING_LOSSES[name], _ASYM_PROBS, _ASYM_EXPERTS)
  np.testing.assert_allclose(got, _ASYM_EXPECTED[name], rtol=1e-6)


def test_fraction_and_mean_probability_by_hand():
  """f (Switch Eq. 5, first choice / all K) and P (Switch Eq. 6)."""
  experts = jnp.asarray(_ASYM_EXPERTS)
  np.testing.assert_allclose(
    dispatch_fraction(experts, 3, ranks=1), [[0.5, 0.25, 0.25]]
  )
  np.testing.assert_allclose(dispatch_fraction(experts, 3), [[0.5, 1.0, 0.5]])
  np.testing.assert_allclose(
    mean_probability(jnp.asarray(_ASYM_PROBS, jnp.float32)),
    [[0.4, 0.325, 0.275]],
    rtol=1e-6,
  )


def _reference_loss(name, probs_GSE, experts_GSK, mask_GS):
  """Float64 loops from the definitions in REFERENCE (d), per group, then
  averaged over the groups that have a real token."""
  G, S, E = probs_GSE.shape
  K = experts_GSK.shape[-1]
  values = []
  for g in range(G):
    real = [s for s in range(S) if mask_GS[g, s]]
    if not real:
      continue
    P = [sum(probs_GSE[g, s, e] for s in real) / len(real) for e in range(E)]
    first = [sum(experts_GSK[g, s, 0] == e for s in real) for e in range(E)]
    anyk = [
      sum(e in experts_GSK[g, s].tolist() for s in real) for e in range(E)
    ]
    if name == "switch":  # Fedus 2021 Eq. 4
      v = E * sum(first[e] / len(real) * P[e] for e in range(E))
    elif name == "gshard":  # Lepikhin 2020 Alg. 1
      v = sum(first[e] / len(real) * P[e] for e in range(E)) / E
    elif name == "all_choices":  # flaxformer _load_balancing_loss
      v = E * sum(anyk[e] / len(real) * P[e] for e in range(E))
    else:  # Megatron: E * sum_e c_e / (S K) * P_e
      v = E * sum(anyk[e] / (len(real) * K) * P[e] for e in range(E))
    values.append(v)
  return np.mean(values)


@pytest.mark.parametrize("name", sorted(_ASYM_EXPECTED))
def test_random_groups_against_float64_reference(name):
  """Three random groups with padding against the loop reference."""
  rng = np.random.default_rng(0)
  G, S, E, K = 3, 6, 5, 2
  logits = rng.normal(size=(G, S, E))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  experts = np.argsort(-logits, axis=-1)[..., :K]
  mask = rng.random((G, S)) < 0.7
  mask[0, 0] = True
  expected = _reference_loss(name, probs, experts, mask)
  got = _call(LOAD_BALANCING_LOSSES[name], probs, experts, mask)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


# ---------------------------------------------------------------------------
# Padding and per-group averaging.


def _garbage(rng, n, E, K):
  probs = rng.uniform(0, 5, size=(1, n, E))  # not even normalised
  experts = rng.integers(0, E, size=(1, n, K))
  return probs, experts


@pytest.mark.parametrize("name", sorted(_ASYM_EXPECTED))
def test_padded_tokens_change_nothing(name):
  """REFERENCE (i): padded tokens leave f, P and the token count
  (transformers #28505). Appending 3 padded tokens with garbage probabilities
  and choices keeps the hand value of the asymmetric case."""
  probs, experts = _garbage(np.random.default_rng(1), 3, 3, 2)
  probs = np.concatenate([_ASYM_PROBS, probs], axis=1)
  experts = np.concatenate([_ASYM_EXPERTS, experts], axis=1)
  mask = np.array([[1, 1, 1, 1, 0, 0, 0]])
  got = _call(LOAD_BALANCING_LOSSES[name], probs, experts, mask)
  np.testing.assert_allclose(got, _ASYM_EXPECTED[name], rtol=1e-6)


@pytest.mark.parametrize("name", sorted(_ASYM_EXPECTED))
def test_fully_padded_group_is_ignored(name):
  """The mean over groups counts only groups with real tokens (module docs):
  [asymmetric group, fully padded garbage group] -> the asymmetric value."""
  probs, experts = _garbage(np.random.default_rng(2), 4, 3, 2)
  probs = np.concatenate([_ASYM_PROBS, probs], axis=0)
  experts = np.concatenate([_ASYM_EXPERTS, experts], axis=0)
  mask = np.array([[1, 1, 1, 1], [0, 0, 0, 0]])
  got = _call(LOAD_BALANCING_LOSSES[name], probs, experts, mask)
  np.testing.assert_allclose(got, _ASYM_EXPECTED[name], rtol=1e-6)


def test_all_padded_batch_gives_zero_not_nan():
  """No real token anywhere: the loss is 0 (no group counts), not 0/0."""
  probs, experts = _garbage(np.random.default_rng(3), 4, 3, 2)
  for _, fn in _ALL:
    assert _call(fn, probs, experts, np.zeros((1, 4))) == 0.0


# Per-group averaging (Switch, GShard, flaxformer: the loss is per group):
#   group 0 = the asymmetric case: Switch 1.05, all-choices 1.9875.
#   group 1 = collapsed on e2, p = [0, 0, 1], choices (2, 0) for all tokens:
#     rank-0 f = [0, 0, 1], P = [0, 0, 1] -> Switch 3 * 1 = 3;
#     all-k f = [1, 0, 1] -> sum f P = 1 -> all-choices 3 * 1 = 3.
#   mean: Switch (1.05 + 3) / 2 = 2.025; all-choices (1.9875 + 3) / 2
#   = 2.49375. (Pooling the 8 tokens first would give P = [0.2, 0.1625,
#   0.6375] and f = [0.25, 0.125, 0.625]: Switch 3 * 0.46875 = 1.40625.)
@pytest.mark.parametrize(
  "name, expected",
  [
    ("switch", 2.025),
    ("gshard", 2.025 / 9),
    ("all_choices", 2.49375),
    ("k_normalized", 2.49375 / 2),
  ],
)
def test_losses_average_per_group_values(name, expected):
  probs = np.concatenate([_ASYM_PROBS, np.tile([0.0, 0, 1], (1, 4, 1))], axis=0)
  experts = np.concatenate([_ASYM_EXPERTS, np.tile([2, 0], (1, 4, 1))], axis=0)
  got = _call(LOAD_BALANCING_LOSSES[name], probs, experts)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_k1_forms_coincide():
  """REFERENCE (d): at K = 1 Switch, all-k and k-normalised are equal, and
  GShard is Switch / E^2."""
  experts = _ASYM_EXPERTS[..., :1]
  switch = _call(load_balancing_loss, _ASYM_PROBS, experts)
  np.testing.assert_allclose(switch, 1.05, rtol=1e-6)
  for fn in (all_choices_load_balancing_loss, k_normalized_load_balancing_loss):
    np.testing.assert_allclose(
      _call(fn, _ASYM_PROBS, experts), switch, rtol=1e-6
    )
  np.testing.assert_allclose(
    _call(gshard_load_balancing_loss, _ASYM_PROBS, experts),
    switch / 9,
    rtol=1e-6,
  )


# ---------------------------------------------------------------------------
# Gradient.


def test_switch_loss_gradient_is_E_f_over_S():
  """Switch Eqs. 4-6: loss = E sum_e f_e (1/S) sum_t p_{t,e} with f fixed by
  the argmax, so d loss / d p_{t,e} = E f_e / S for every token t.

  Asymmetric case: E=3, S=4, f = [0.5, 0.25, 0.25] ->
  3 * [0.5, 0.25, 0.25] / 4 = [0.375, 0.1875, 0.1875].
  A padded fifth token gets zero gradient; S stays 4.
  """
  probs = np.concatenate([_ASYM_PROBS, [[[0.2, 0.2, 0.6]]]], axis=1)
  experts = np.concatenate([_ASYM_EXPERTS, [[[2, 0]]]], axis=1)
  mask = jnp.array([[1, 1, 1, 1, 0]])
  grad = jax.grad(load_balancing_loss)(
    jnp.asarray(probs, jnp.float32), jnp.asarray(experts), mask
  )
  expected = np.zeros((1, 5, 3))
  expected[0, :4] = [0.375, 0.1875, 0.1875]
  np.testing.assert_allclose(grad, expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# Router z-loss.


def _logsumexp64(z_E):
  z_E = np.asarray(z_E, np.float64)
  m = z_E.max()
  return m + np.log(np.sum(np.exp(z_E - m)))


def test_z_loss_by_hand():
  """ST-MoE (Zoph 2022) Eq. 5: (1/T) sum_t (logsumexp z_t)^2.

  t0 z = [0, 0]: lse = ln 2 = 0.693147, squared 0.480453.
  t1 z = [ln 3, 0]: lse = ln(3 + 1) = ln 4 = 1.386294, squared 1.921812.
  mean = (0.480453 + 1.921812) / 2 = 1.201133.
  """
  z = jnp.array([[[0.0, 0.0], [np.log(3.0), 0.0]]])
  expected = (np.log(2) ** 2 + np.log(4) ** 2) / 2
  np.testing.assert_allclose(router_z_loss(z), expected, rtol=1e-6)
  np.testing.assert_allclose(expected, 1.201133, rtol=1e-6)


def test_z_loss_against_float64_logsumexp():
  """ST-MoE Eq. 5 on raw logits, no padding: the mean over all T = G*S
  tokens of lse^2 (equal groups, so the per-group mean is the same)."""
  rng = np.random.default_rng(4)
  z = rng.normal(0, 3, size=(3, 7, 5))
  expected = np.mean(
    [
      _logsumexp64(z[g, s]) ** 2
      for g, s in itertools.product(range(3), range(7))
    ]
  )
  np.testing.assert_allclose(
    router_z_loss(jnp.asarray(z, jnp.float32)), expected, rtol=1e-5
  )


def test_z_loss_is_float32_for_bfloat16_logits():
  """REFERENCE (i): the z-loss is computed in float32 under bf16."""
  z = jnp.asarray(np.random.default_rng(5).normal(size=(2, 4, 8)), jnp.bfloat16)
  loss = router_z_loss(z)
  assert loss.dtype == jnp.float32
  z64 = np.asarray(z.astype(jnp.float32), np.float64)
  expected = np.mean([_logsumexp64(row) ** 2 for row in z64.reshape(-1, 8)])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_z_loss_excludes_padding_from_the_denominator():
  """REFERENCE (i): padded rows leave the sum and the count; a zeroed padded
  row would otherwise add (ln E)^2 each.

  One group, E=4: two real rows and two zeroed padded rows (each of which
  would add (ln 4)^2 = 1.921812 to the sum and 1 to the count). Expected: the
  mean of lse^2 over the 2 real rows only.
  """
  real = np.array([[0.0, 0.0, -1.0, 2.0], [np.log(3.0), 0.0, 1.0, 0.5]])
  z = np.concatenate([real, np.zeros((2, 4))])[None]
  mask = jnp.array([[1, 1, 0, 0]])
  expected = np.mean([_logsumexp64(row) ** 2 for row in real])
  np.testing.assert_allclose(
    router_z_loss(jnp.asarray(z, jnp.float32), mask), expected, rtol=1e-6
  )


def test_z_loss_with_padding_averages_groups():
  """Module docs: mean over each group's real tokens, then over groups with
  a real token (a fully padded group is ignored).

  group 0: rows [0, 0] (lse^2 = (ln 2)^2 = 0.480453) and [ln 3, 0]
           ((ln 4)^2 = 1.921812), third row padded -> 1.201133.
  group 1: row [ln 7, 0] ((ln 8)^2 = 4.324077), two rows padded.
  group 2: all padded (garbage).
  loss = (1.201133 + 4.324077) / 2 = 2.762605.
  """
  z = np.array(
    [
      [[0.0, 0.0], [np.log(3.0), 0.0], [9.0, 9.0]],
      [[np.log(7.0), 0.0], [5.0, -5.0], [0.0, 0.0]],
      [[3.0, 1.0], [2.0, 2.0], [7.0, 0.0]],
    ]
  )
  mask = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
  g0 = (np.log(2) ** 2 + np.log(4) ** 2) / 2
  g1 = np.log(8) ** 2
  np.testing.assert_allclose((g0 + g1) / 2, 2.762605, rtol=1e-6)
  np.testing.assert_allclose(
    router_z_loss(jnp.asarray(z, jnp.float32), mask), (g0 + g1) / 2, rtol=1e-6
  )


def test_z_loss_gradient():
  """d/dz (lse z)^2 / T = 2 lse(z) softmax(z) / T (ST-MoE Eq. 5)."""
  z = np.array([[[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]]])
  grad = jax.grad(router_z_loss)(jnp.asarray(z, jnp.float32))
  expected = np.zeros_like(z)
  for t in range(2):
    lse = _logsumexp64(z[0, t])
    expected[0, t] = 2 * lse * np.exp(z[0, t] - lse) / 2
  chex.assert_trees_all_close(np.asarray(grad), expected, rtol=1e-5)


def test_nan_in_padded_rows_does_not_leak():
  """Padded rows may hold anything, even NaN: no loss or metric sees them."""
  from moe_jax import metrics, routing

  probs = np.full((1, 4, 2), 0.5, np.float32)
  probs[0, 3] = np.nan
  logits = np.zeros((1, 4, 2), np.float32)
  logits[0, 3] = np.inf
  index = np.array([[[0], [1], [0], [1]]], np.int32)
  mask = np.array([[1, 1, 1, 0]], bool)
  for fn in LOAD_BALANCING_LOSSES.values():
    assert np.isfinite(float(fn(probs, index, mask)))
  assert np.isfinite(float(router_z_loss(logits, mask)))
  route = routing.Routing(
    index,
    np.where(mask[..., None], 0.5, np.nan),
    np.zeros_like(index),
    mask[..., None],
    probs,
  )
  for name, value in metrics.routing_metrics(route, mask).items():
    assert np.all(np.isfinite(np.asarray(value))), name


# ---------------------------------------------------------------------------
# CV^2 losses of the noisy routers (Shazeer 2017; V-MoE).


def _phi(x):
  """Standard normal CDF from math.erf (independent of jax.scipy)."""
  return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _cv2(values):
  """CV^2 with the population variance."""
  values = np.asarray(values, np.float64)
  return values.var() / values.mean() ** 2


def test_cv_squared_values_at_balance_and_collapse():
  """0 under perfect balance; E - 1 when one expert holds everything:
  [T, 0, 0, 0] has mean T/4, variance T^2 (1/4 - 1/16) = 3T^2/16, so
  CV^2 = (3/16) / (1/16) = 3 = E - 1."""
  uniform = jnp.zeros((1, 8, 4))
  assert float(losses.vmoe_importance_loss(uniform)) == pytest.approx(0.0)
  collapsed = jnp.tile(jnp.array([30.0, 0, 0, 0]), (1, 8, 1))
  np.testing.assert_allclose(
    losses.vmoe_importance_loss(collapsed), 3.0, rtol=1e-6
  )


def test_shazeer_importance_by_hand():
  """Shazeer 2017 Eqs. 3, 5-7, k = 2:
    t0 H = [ln 3, 0, -5, -9] -> top-2 (e0, e1): G = [3/4, 1/4, 0, 0]
    t1 H = [-9, -5, 0, ln 3] -> top-2 (e3, e2): G = [0, 0, 1/4, 3/4]
  Importance = [3/4, 1/4, 1/4, 3/4]; mean 1/2; Var = (1/4)^2 = 1/16;
  CV^2 = (1/16) / (1/4) = 1/4."""
  H = np.array([[[math.log(3), 0, -5, -9], [-9, -5, 0, math.log(3)]]])
  got = losses.shazeer_importance_loss(jnp.asarray(H, jnp.float32), 2)
  np.testing.assert_allclose(got, 0.25, rtol=1e-6)


def test_shazeer_load_by_hand():
  """Shazeer 2017 App. A Eqs. 8-11, one token, k = 1, sigma = 1:
  z = [1, 0, 0], H = [1, 0.5, -1]: e0 is the top-1.
  kth_excluding(H, 1, e0) = 0.5 (the best of the others), and for e1, e2
  it is 1 (e0's H). P = [Phi(0.5), Phi(-1), Phi(-1)]
    = [0.691462, 0.158655, 0.158655]; Load = P; CV^2 of it."""
  z = jnp.array([[[1.0, 0.0, 0.0]]])
  H = jnp.array([[[1.0, 0.5, -1.0]]])
  P = [_phi(0.5), _phi(-1.0), _phi(-1.0)]
  np.testing.assert_allclose(P, [0.691462, 0.158655, 0.158655], atol=1e-6)
  got = losses.shazeer_load_loss(z, H, jnp.ones((1, 1, 3)), 1)
  np.testing.assert_allclose(got, _cv2(P), rtol=1e-5)


def test_shazeer_load_is_zero_when_every_expert_is_chosen():
  z = jax.random.normal(jax.random.key(0), (1, 4, 3))
  assert float(losses.shazeer_load_loss(z, z, 1.0, 3)) == 0.0


def _reference_shazeer_load(z_GSE, H_GSE, std_GSE, k, mask_GS):
  """Eqs. 8-11 as loops in float64, per group over real tokens."""
  G, S, E = z_GSE.shape
  values = []
  for g in range(G):
    real = [s for s in range(S) if mask_GS[g, s]]
    if not real:
      continue
    load = np.zeros(E)
    for s in real:
      for e in range(E):
        others = sorted(
          (H_GSE[g, s, j] for j in range(E) if j != e), reverse=True
        )
        threshold = others[k - 1]  # kth_excluding(H(x), k, e)
        load[e] += _phi((z_GSE[g, s, e] - threshold) / std_GSE[g, s, e])
    values.append(_cv2(load))
  return np.mean(values)


def _reference_vmoe_load(z_GSE, H_GSE, std, k, mask_GS):
  """vmoe `_load_auxiliary_loss` as loops in float64."""
  G, S, E = z_GSE.shape
  values = []
  for g in range(G):
    real = [s for s in range(S) if mask_GS[g, s]]
    if not real:
      continue
    q = np.zeros(E)
    for s in real:
      threshold = sorted(H_GSE[g, s], reverse=True)[k - 1]
      for e in range(E):
        q[e] += 1 - _phi((threshold - z_GSE[g, s, e]) / std)
    values.append(_cv2(q / len(real)))
  return np.mean(values)


def _reference_importance(G_GSE, mask_GS):
  values = [
    _cv2(G_GSE[g][mask_GS[g]].sum(0))
    for g in range(len(G_GSE))
    if mask_GS[g].any()
  ]
  return np.mean(values)


@pytest.mark.parametrize("k", [1, 2])
def test_noisy_losses_against_float64_references(k):
  """Three random groups with padding (one group fully padded)."""
  rng = np.random.default_rng(k)
  G, S, E = 3, 6, 4
  z = rng.normal(size=(G, S, E))
  std = np.log1p(np.exp(rng.normal(size=(G, S, E))))  # softplus
  H = z + std * rng.normal(size=(G, S, E))
  mask = rng.random((G, S)) < 0.7
  mask[0, 0], mask[2] = True, False
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731

  got = losses.shazeer_load_loss(f32(z), f32(H), f32(std), k, jnp.asarray(mask))
  want = _reference_shazeer_load(z, H, std, k, mask)
  np.testing.assert_allclose(got, want, rtol=1e-4)

  sparse_G = np.zeros_like(H)  # Eqs. 3, 5: softmax over the k largest H
  for idx in np.ndindex(G, S):
    top = np.argsort(-H[idx])[:k]
    w = np.exp(H[idx][top] - H[idx][top].max())
    sparse_G[idx][top] = w / w.sum()
  got = losses.shazeer_importance_loss(f32(H), k, jnp.asarray(mask))
  np.testing.assert_allclose(
    got, _reference_importance(sparse_G, mask), rtol=1e-4
  )

  sigma = 0.25
  got = losses.vmoe_load_loss(f32(z), f32(H), sigma, k, jnp.asarray(mask))
  want = _reference_vmoe_load(z, H, sigma, k, mask)
  np.testing.assert_allclose(got, want, rtol=1e-4)

  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)  # clean softmax
  got = losses.vmoe_importance_loss(f32(z), jnp.asarray(mask))
  np.testing.assert_allclose(got, _reference_importance(p, mask), rtol=1e-4)


def test_noisy_losses_have_finite_gradients_for_both_weight_matrices():
  """Shazeer App. A: the load estimator is smooth, so W_g and W_noise both
  get gradients (the noise scale only through Eq. 9)."""
  x = jax.random.normal(jax.random.key(1), (2, 8, 5))
  w_g = jax.random.normal(jax.random.key(2), (5, 4)) * 0.1
  w_noise = jnp.zeros((5, 4))  # App. A: W_noise starts at zero
  eps = jax.random.normal(jax.random.key(3), (2, 8, 4))

  def total(w_g, w_noise):
    z = x @ w_g
    std = jax.nn.softplus(x @ w_noise)
    H = z + eps * std
    return losses.shazeer_importance_loss(H, 2) + losses.shazeer_load_loss(
      z, H, std, 2
    )

  g_g, g_noise = jax.grad(total, argnums=(0, 1))(w_g, w_noise)
  for g in (g_g, g_noise):
    assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 1e-5
