"""Balancing losses as pure functions, each as its paper writes it.

Shapes (see `moe_jax.shapes`): probabilities `[G, S, E]`, choices `[G, S, K]`,
padding mask `[G, S]` (1 = real token).

Every loss is computed per group (the scope of Switch, GShard and
flaxformer) over the group's real tokens only, then averaged over the groups
that hold at least one real token. The value at perfect balance is stated in
each docstring; the trainer multiplies by the configured coefficient once and
reduces over layers as `config.loss.layer_reduction` says.

Notation: f_e is a dispatch fraction (counted before capacity, so overflowing
tokens count, as in GShard Alg. 1), P_e the mean router probability of expert
e over the group's tokens, from the full softmax over all E experts.

`LOAD_BALANCING_LOSSES` (f times P, chosen by `config.loss.load_balancing`)
apply to every learned tokens-choose router. The noisy routers also sow the
coefficient-of-variation losses of their papers: `shazeer_importance_loss`
and `shazeer_load_loss` (Shazeer 2017, router "noisy_top_k"),
`vmoe_importance_loss` and `vmoe_load_loss` (V-MoE, router "vmoe"). The
DeepSeek router sows `sequence_balance_loss` (DeepSeek-V3 Eqs. 17-20, or
Wang et al. 2024 Eqs. 2-3 by `SEQUENCE_BALANCE_FORMS`), whose scope is one
sequence instead of one group.
"""

import chex
import jax
import jax.numpy as jnp


def _real_tokens(mask_GS, shape_GS) -> jax.Array:
  if mask_GS is None:
    return jnp.ones(shape_GS, jnp.float32)
  chex.assert_shape(mask_GS, shape_GS)
  return mask_GS.astype(jnp.float32)


def _mean_over_groups(value_G: jax.Array, mask_GS: jax.Array) -> jax.Array:
  """Mean of a per-group value over the groups with any real token."""
  has_tokens_G = (jnp.sum(mask_GS, axis=1) > 0).astype(jnp.float32)
  return jnp.sum(value_G * has_tokens_G) / jnp.maximum(jnp.sum(has_tokens_G), 1)


def _group_mean(x_GS_, mask_GS):
  """Mean over each group's real tokens of x `[G, S, ...]` -> `[G, ...]`."""
  weight_GS_ = mask_GS.reshape(mask_GS.shape + (1,) * (x_GS_.ndim - 2))
  count_G = jnp.maximum(jnp.sum(mask_GS, axis=1), 1.0)
  # `where`, not a product: NaN or inf in a padded row must not leak.
  x_GS_ = jnp.where(weight_GS_ > 0, x_GS_, 0.0)
  return jnp.sum(x_GS_ * weight_GS_, axis=1) / count_G.reshape(
    (-1,) + (1,) * (x_GS_.ndim - 2)
  )


def dispatch_fraction(
  expert_index_GSK: jax.Array,
  num_experts: int,
  padding_mask_GS: jax.Array | None = None,
  *,
  ranks: int | None = None,
) -> jax.Array:
  """f_GE: per group, the share of real tokens whose first `ranks` choices
  include expert e (`ranks=None`: all K). Sums to `ranks` over experts."""
  chex.assert_rank(expert_index_GSK, 3)
  mask_GS = _real_tokens(padding_mask_GS, expert_index_GSK.shape[:2])
  chosen_GSK = expert_index_GSK[..., :ranks]
  counts_GSE = jnp.sum(
    jax.nn.one_hot(chosen_GSK, num_experts, dtype=jnp.float32), axis=2
  )
  return _group_mean(counts_GSE, mask_GS)


def mean_probability(
  probs_GSE: jax.Array, padding_mask_GS: jax.Array | None = None
) -> jax.Array:
  """P_GE: per group, the mean router probability of each expert."""
  chex.assert_rank(probs_GSE, 3)
  mask_GS = _real_tokens(padding_mask_GS, probs_GSE.shape[:2])
  return _group_mean(probs_GSE.astype(jnp.float32), mask_GS)


def _fraction_times_probability(probs, expert_index, mask, ranks, scale):
  chex.assert_equal_shape_prefix([probs, expert_index], 2)
  num_experts = probs.shape[-1]
  mask_GS = _real_tokens(mask, probs.shape[:2])
  f_GE = dispatch_fraction(expert_index, num_experts, mask_GS, ranks=ranks)
  P_GE = mean_probability(probs, mask_GS)
  loss_G = scale * jnp.sum(f_GE * P_GE, axis=-1)
  return _mean_over_groups(loss_G, mask_GS)


def load_balancing_loss(
  router_probs: jax.Array,
  expert_indices: jax.Array,
  padding_mask: jax.Array | None = None,
) -> jax.Array:
  """Switch Transformer load-balancing loss (Fedus 2021, Eqs. 4-6).

    loss = E * sum_e f_e * P_e,
    f_e = (1/S) sum_t 1{argmax p_t = e}       (Eq. 5: first choice only)
    P_e = (1/S) sum_t p_{t,e}                  (Eq. 6)

  Equals 1 under uniform routing for any E; a fully collapsed router (every
  token's first choice and all its probability on one expert) gives E.
  Multiply by alpha = 1e-2 (Switch §2.2) in the total loss.

  Args:
    router_probs: probs_GSE, full softmax over experts.
    expert_indices: expert_index_GSK; only rank 0 is used.
    padding_mask: `[G, S]`, 1 for real tokens.
  """
  E = router_probs.shape[-1]
  return _fraction_times_probability(
    router_probs, expert_indices, padding_mask, 1, E
  )


def gshard_load_balancing_loss(router_probs, expert_indices, padding_mask=None):
  """GShard auxiliary loss as written in the paper (Lepikhin 2020, Alg. 1).

    l_aux = (1/E) sum_e (c_e / S) * m_e,
    c_e = number of tokens whose FIRST choice is e (overflow included),
    m_e = (1/S) sum_t p_{t,e}.

  This is the Switch loss divided by E^2: 1/E^2 under uniform routing, 1/E
  when collapsed. (Lingvo, praxis and vmoe multiply it by E^2.)
  """
  E = router_probs.shape[-1]
  return _fraction_times_probability(
    router_probs, expert_indices, padding_mask, 1, 1.0 / E
  )


def all_choices_load_balancing_loss(
  router_probs, expert_indices, padding_mask=None
):
  """Switch-form loss with f over all K choices (flaxformer; ST-MoE App. A).

    loss = E * sum_e f_e * P_e,  f_e = (1/S) sum_t 1{e in TopK(p_t)},

  so sum_e f_e = K and the loss is K under uniform routing (1 at K = 1, where
  it equals `load_balancing_loss`) and E when one expert is in every token's
  top K and holds all the probability.
  """
  E = router_probs.shape[-1]
  return _fraction_times_probability(
    router_probs, expert_indices, padding_mask, None, E
  )


def k_normalized_load_balancing_loss(
  router_probs, expert_indices, padding_mask=None
):
  """The all-choices loss divided by K (Megatron-LM; DeepSeek's f_i).

    loss = E * sum_e (c_e / (S K)) * P_e = (E / K) * sum_e f_e * P_e,

  with c_e the number of the group's K*S choices that picked e. Equals 1
  under uniform routing for every K, and E/K when collapsed onto one expert.
  """
  top_k = expert_indices.shape[-1]
  E = router_probs.shape[-1]
  return _fraction_times_probability(
    router_probs, expert_indices, padding_mask, None, E / top_k
  )


LOAD_BALANCING_LOSSES = {
  "switch": load_balancing_loss,
  "gshard": gshard_load_balancing_loss,
  "all_choices": all_choices_load_balancing_loss,
  "k_normalized": k_normalized_load_balancing_loss,
}


def _v3_sequence_probabilities(scores_BLE: jax.Array) -> jax.Array:
  """s'_{i,t} = s_{i,t} / sum_j s_{j,t} (DeepSeek-V3 Eq. 19)."""
  return scores_BLE / jnp.sum(scores_BLE, axis=-1, keepdims=True)  # Eq. 19


def _wang_sequence_probabilities(scores_BLE: jax.Array) -> jax.Array:
  """The raw gate scores s_{i,t} themselves (Wang et al. 2024, Eq. 3)."""
  return scores_BLE


# What P_i averages over the sequence's tokens, by `sequence_balance_form`.
SEQUENCE_BALANCE_FORMS = {
  "deepseek_v3": _v3_sequence_probabilities,
  "wang2024": _wang_sequence_probabilities,
}


def sequence_balance_loss(
  scores_BLE: jax.Array,
  expert_index_BLK: jax.Array,
  padding_mask_BL: jax.Array | None = None,
  *,
  form: str = "deepseek_v3",
) -> jax.Array:
  """Sequence-wise balance loss sum_i f_i P_i, without its coefficient
  alpha, averaged over the sequences; two published forms that differ in P.

  form="deepseek_v3": DeepSeek-V3's complementary sequence-wise balance loss
  (DeepSeek-AI 2024, Eqs. 17-20), P from the normalised scores s':

    L_Bal = sum_i f_i P_i                                   (Eq. 17 / alpha)
    f_i = N_r / (K_r T) sum_t 1{token t chose expert i}     (Eq. 18)
    s'_{i,t} = s_{i,t} / sum_j s_{j,t}                      (Eq. 19)
    P_i = (1/T) sum_t s'_{i,t}                              (Eq. 20)

  form="wang2024": the auxiliary loss of the aux-loss baseline of Wang et
  al. 2024 ("Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-
  Experts", Eqs. 2-3), the same f but P from the RAW scores s:

    L_Balance = sum_i f_i P_i,  f_i = N / (K T) sum_t 1{t chose i},
    P_i = (1/T) sum_t s_{i,t}                                (Eqs. 2-3)

  Both over the T real tokens of ONE sequence (the batch's rows, whatever
  the routing groups are). "Chose" counts the expert actually selected, i.e.
  TopK of the biased scores s + b, before capacity (the papers write TopK of
  s; with b = 0 they agree).

  Values: at perfect balance (every f_i = 1) the V3 form is
  sum_i P_i = 1 for every K and every s, and N_r / K_r when a sequence
  collapses onto K_r experts that hold all of s'. The Wang form at balance
  is sum_i P_i = N * mean(s): with sigmoid scores near 0.5 that is N / 2,
  8 at N = 16 (with K = 4 or any K), 8 times the V3 form; its gradient is
  correspondingly larger (see tests/test_deepseek.py), so the same alpha
  means a far stronger loss. alpha = 1e-4 in DeepSeek-V3 (§4.2) and 1e-3 in
  Wang 2024 (§4.1) is `config.loss.sequence_balance_weight`.

  Args:
    scores_BLE: s, the raw sigmoid scores (the V3 form normalises them;
      already normalised rows are left as they are).
    expert_index_BLK: the chosen experts.
    padding_mask_BL: 1 for real tokens.
    form: a key of `SEQUENCE_BALANCE_FORMS`.
  """
  if form not in SEQUENCE_BALANCE_FORMS:
    raise ValueError(
      f"unknown sequence_balance_form={form!r}; allowed: "
      f"{sorted(SEQUENCE_BALANCE_FORMS)}."
    )
  chex.assert_equal_shape_prefix([scores_BLE, expert_index_BLK], 2)
  E, K = scores_BLE.shape[-1], expert_index_BLK.shape[-1]
  # A sequence is a group of the per-group helpers: [B, L] plays [G, S].
  mask_BL = _real_tokens(padding_mask_BL, scores_BLE.shape[:2])
  counts_BE = dispatch_fraction(expert_index_BLK, E, mask_BL)  # (1/T) sum 1
  f_BE = (E / K) * counts_BE  # V3 Eq. 18; Wang Eq. 2
  probs_BLE = SEQUENCE_BALANCE_FORMS[form](scores_BLE.astype(jnp.float32))
  P_BE = mean_probability(probs_BLE, mask_BL)  # V3 Eq. 20; Wang Eq. 3
  loss_B = jnp.sum(f_BE * P_BE, axis=-1)  # V3 Eq. 17; Wang Eq. 2
  return _mean_over_groups(loss_B, mask_BL)


def balancing_loss_fn(name: str):
  """The function of `LOAD_BALANCING_LOSSES` called `name`."""
  if name not in LOAD_BALANCING_LOSSES:
    raise ValueError(
      f"unknown load_balancing={name!r}; allowed: "
      f"{sorted(LOAD_BALANCING_LOSSES)}."
    )
  return LOAD_BALANCING_LOSSES[name]


def router_z_loss(
  router_logits: jax.Array, padding_mask: jax.Array | None = None
) -> jax.Array:
  """ST-MoE router z-loss (Zoph 2022, Eq. 5) on the raw logits.

    L_z = (1/T) sum_t (log sum_e exp z_{t,e})^2,

  averaged over the real tokens of each group (padded tokens leave the
  denominator too: a zeroed logit row would add (log E)^2), then over groups.
  ST-MoE uses a coefficient of 1e-3.
  """
  chex.assert_rank(router_logits, 3)
  mask_GS = _real_tokens(padding_mask, router_logits.shape[:2])
  lse_GS = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)
  return _mean_over_groups(_group_mean(lse_GS**2, mask_GS), mask_GS)


# ---------------------------------------------------------------------------
# Coefficient-of-variation losses of the noisy routers (Shazeer 2017; V-MoE).
# Sown by routers "noisy_top_k" and "vmoe" as `importance_loss` and
# `load_loss`, unweighted (weights: config.loss.importance_loss_weight and
# load_loss_weight). Each is 0 under perfect balance and E - 1 when one
# expert holds everything. The papers sum over a batch; here, as for every
# loss in this module, per group over the real tokens, then the mean over
# groups.


def _cv_squared(x_GE: jax.Array) -> jax.Array:
  """CV(x)^2 = Var(x) / Mean(x)^2 over experts, population variance (as
  coded in vmoe; Shazeer 2017 does not say which); 0 where the mean is 0."""
  mean_G = jnp.mean(x_GE, axis=-1)
  var_G = jnp.var(x_GE, axis=-1)
  safe_G = jnp.where(mean_G > 0, mean_G, 1.0)
  return jnp.where(mean_G > 0, var_G / safe_G**2, 0.0)


def _group_sum(x_GSE: jax.Array, mask_GS: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(mask_GS[..., None] > 0, x_GSE, 0.0), axis=1)


def _normal_cdf(x: jax.Array) -> jax.Array:
  """Phi, the standard normal CDF."""
  return jax.scipy.stats.norm.cdf(x)


def shazeer_importance_loss(
  noisy_logits: jax.Array,
  top_k: int,
  padding_mask: jax.Array | None = None,
) -> jax.Array:
  """Importance loss of noisy top-k gating (Shazeer et al. 2017, Eqs. 6-7).

    G(x) = Softmax(KeepTopK(H(x), k))          (Eqs. 3, 5; sparse gates)
    Importance(X)_e = sum_{x in X} G(x)_e      (Eq. 6)
    L_importance = CV(Importance(X))^2         (Eq. 7, before w_importance)

  G is the gate as the gating network gives it, before any capacity limit
  (the paper has none). The paper uses w_importance = 0.1 (Appendix A,
  Table 6: 0.1 with w_load = 0.1).

  Args:
    noisy_logits: H `[G, S, E]` (`routing.noisy_logits`).
    top_k: k.
    padding_mask: `[G, S]`, 1 for real tokens.
  """
  chex.assert_rank(noisy_logits, 3)
  mask_GS = _real_tokens(padding_mask, noisy_logits.shape[:2])
  H_GSE = noisy_logits.astype(jnp.float32)
  _, top_GSK = jax.lax.top_k(H_GSE, top_k)
  kept_GSE = jnp.sum(jax.nn.one_hot(top_GSK, H_GSE.shape[-1]), axis=2) > 0
  gates_GSE = jax.nn.softmax(jnp.where(kept_GSE, H_GSE, -jnp.inf))  # Eq. 3, 5
  importance_GE = _group_sum(gates_GSE, mask_GS)  # Eq. 6
  return _mean_over_groups(_cv_squared(importance_GE), mask_GS)  # Eq. 7


def shazeer_load_loss(
  logits: jax.Array,
  noisy_logits: jax.Array,
  noise_std: jax.Array,
  top_k: int,
  padding_mask: jax.Array | None = None,
) -> jax.Array:
  """Smooth load loss of noisy top-k gating (Shazeer et al. 2017, App. A,
  Eqs. 8-11).

  P(x, e) is the probability that expert e is among the k chosen for x when
  the noise on e alone is drawn again:

    P(x, e) = Phi(((x W_g)_e - kth_excluding(H(x), k, e))
                  / Softplus((x W_noise)_e))                    (Eqs. 8-9)
    Load(X)_e = sum_{x in X} P(x, e)                           (Eq. 10)
    L_load = CV(Load(X))^2                                      (Eq. 11)

  kth_excluding(H, k, e), the k-th largest of H without component e, is the
  (k+1)-th largest of H when e is in the top k and the k-th otherwise. The
  gradient reaches W_g through (x W_g)_e and the threshold, and W_noise
  through the noise scale. At k = E every expert is always chosen: P = 1
  and the loss is 0. The paper uses w_load = 0.1 (App. A, Table 6).

  Args:
    logits: clean logits x W_g `[G, S, E]`.
    noisy_logits: H `[G, S, E]`.
    noise_std: Softplus(x W_noise), broadcastable to `[G, S, E]`; floored at
      1e-6 so the division stays finite.
    top_k: k.
    padding_mask: `[G, S]`, 1 for real tokens.
  """
  chex.assert_equal_shape([logits, noisy_logits])
  E = logits.shape[-1]
  mask_GS = _real_tokens(padding_mask, logits.shape[:2])
  if top_k >= E:
    return jnp.zeros((), jnp.float32)
  z_GSE = logits.astype(jnp.float32)
  H_GSE = noisy_logits.astype(jnp.float32)
  top_values_GSX, top_GSX = jax.lax.top_k(H_GSE, top_k + 1)
  in_top_k_GSE = jnp.sum(jax.nn.one_hot(top_GSX[..., :top_k], E), axis=2) > 0
  kth_GS1 = top_values_GSX[..., top_k - 1, None]  # k-th largest of H
  next_GS1 = top_values_GSX[..., top_k, None]  # (k+1)-th largest of H
  kth_excluding_GSE = jnp.where(in_top_k_GSE, next_GS1, kth_GS1)  # Eq. 8
  std_GSE = jnp.maximum(jnp.broadcast_to(noise_std, z_GSE.shape), 1e-6)
  P_GSE = _normal_cdf((z_GSE - kth_excluding_GSE) / std_GSE)  # Eq. 9
  load_GE = _group_sum(P_GSE, mask_GS)  # Eq. 10
  return _mean_over_groups(_cv_squared(load_GE), mask_GS)  # Eq. 11


def vmoe_importance_loss(
  logits: jax.Array, padding_mask: jax.Array | None = None
) -> jax.Array:
  """V-MoE importance loss (Riquelme et al. 2021, App. A; as coded in
  google-research/vmoe `vmoe/nn/routing.py` `_importance_auxiliary_loss`).

    imp_e = sum_t p_{t,e},  p = softmax(z) of the CLEAN logits over all E
    L_imp = Var(imp) / Mean(imp)^2             (population variance)

  vmoe's default weight is 0.005 (REFERENCE (d)).
  """
  chex.assert_rank(logits, 3)
  mask_GS = _real_tokens(padding_mask, logits.shape[:2])
  p_GSE = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # clean p
  importance_GE = _group_sum(p_GSE, mask_GS)  # vmoe: sum over items
  return _mean_over_groups(_cv_squared(importance_GE), mask_GS)  # Var/Mean^2


def vmoe_load_loss(
  logits: jax.Array,
  noisy_logits: jax.Array,
  noise_std: float,
  top_k: int,
  padding_mask: jax.Array | None = None,
) -> jax.Array:
  """V-MoE load loss (Riquelme et al. 2021, App. A; as coded in vmoe
  `_load_auxiliary_loss`).

    thr_t = the K-th largest NOISY logit of token t (e not excluded)
    q_{t,e} = 1 - Phi((thr_t - z_{t,e}) / sigma),  sigma = noise_std / E
    L_load = Var(q_bar) / Mean(q_bar)^2,  q_bar_e = mean_t q_{t,e}

  It differs from Shazeer's Eq. 9 in the threshold (e's own noisy logit is
  not excluded) and in the fixed sigma. vmoe's default weight is 0.005.

  Args:
    logits: clean logits z `[G, S, E]`.
    noisy_logits: z + sigma * eps `[G, S, E]`.
    noise_std: sigma (`routing.vmoe_noise_std`), > 0.
    top_k: K.
    padding_mask: `[G, S]`, 1 for real tokens.
  """
  chex.assert_equal_shape([logits, noisy_logits])
  mask_GS = _real_tokens(padding_mask, logits.shape[:2])
  z_GSE = logits.astype(jnp.float32)
  top_values_GSK, _ = jax.lax.top_k(noisy_logits.astype(jnp.float32), top_k)
  threshold_GS1 = top_values_GSK[..., -1:]  # vmoe: threshold_per_item
  q_GSE = 1.0 - _normal_cdf((threshold_GS1 - z_GSE) / noise_std)  # vmoe: p
  q_mean_GE = _group_mean(q_GSE, mask_GS)  # vmoe: p_mean
  return _mean_over_groups(_cv_squared(q_mean_GE), mask_GS)  # Var/Mean^2
