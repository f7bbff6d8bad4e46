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
