"""Routing metrics as pure functions: what a router did to one batch.

Shapes (see `moe_jax.shapes`): `routing.Routing` fields `[G, S, K]` and
`[G, S, E]`, padding mask `[G, S]`. All metrics count real tokens only and
are computed over the whole batch (all groups together); the trainer
reports each per layer. Definitions:

- expert_fraction (vector of E, sums to 1): f_e = c_e / (T K), the share of
  the batch's routed choices (before capacity) that picked expert e.
- load_cv: std / mean of the choice counts c_e (population std); 0 is
  perfect balance (Shazeer 2017 §4 reports CV of the load).
- max_violation: MaxVio = (max_e c_e - mean_e c_e) / mean_e c_e
  (Wang 2024, Eq. 4); 0 is perfect balance.
- dead_experts: experts with f_e < 0.1 / E.
- drop_fraction_rank_{k}: share of the real tokens whose rank-k choice was
  not dispatched (capacity overflow or a second-choice policy).
- drop_fraction: share of real tokens that lost every expert and pass
  through on the residual alone (flaxformer's fraction_tokens_left_behind).
- router_entropy: mean over tokens of H(p_t) in nats (ln E when uniform).
- router_confidence: mean combine weight of the dispatched pairs
  (flaxformer's router_confidence).
- top1_probability: mean over tokens of max_e p_{t,e}.
"""

import jax
import jax.numpy as jnp

from moe_jax.routing import Routing


def routing_metrics(
  routing: Routing, padding_mask_GS: jax.Array | None = None
) -> dict[str, jax.Array]:
  """The metrics above for one MoE layer and batch (scalars, one E-vector)."""
  G, S, K = routing.expert_index_GSK.shape
  E = routing.probs_GSE.shape[-1]
  if padding_mask_GS is None:
    mask_GS = jnp.ones((G, S), jnp.float32)
  else:
    mask_GS = padding_mask_GS.astype(jnp.float32)
  num_tokens = jnp.maximum(jnp.sum(mask_GS), 1.0)

  choices_GSKE = jax.nn.one_hot(routing.expert_index_GSK, E)
  counts_E = jnp.einsum("gske,gs->e", choices_GSKE, mask_GS)
  mean_count = jnp.maximum(jnp.mean(counts_E), 1e-9)
  fraction_E = counts_E / jnp.maximum(jnp.sum(counts_E), 1e-9)

  kept_GSK = routing.kept_GSK.astype(jnp.float32)
  dropped_K = jnp.einsum("gsk,gs->k", 1.0 - kept_GSK, mask_GS) / num_tokens
  lost_all_GS = jnp.all(~routing.kept_GSK, axis=-1).astype(jnp.float32)

  # Padded rows may hold anything (even NaN): zero them before any product.
  probs_GSE = jnp.where(mask_GS[..., None] > 0, routing.probs_GSE, 0.0)
  gates_GSK = jnp.where(mask_GS[..., None] > 0, routing.gates_GSK, 0.0)
  entropy_GS = -jnp.sum(probs_GSE * jnp.log(jnp.maximum(probs_GSE, 1e-30)), -1)
  num_kept = jnp.maximum(jnp.sum(kept_GSK * mask_GS[..., None]), 1.0)

  metrics = {
    "expert_fraction": fraction_E,
    "load_cv": jnp.std(counts_E) / mean_count,
    "max_violation": (jnp.max(counts_E) - jnp.mean(counts_E)) / mean_count,
    "dead_experts": jnp.sum(fraction_E < 0.1 / E).astype(jnp.float32),
    "drop_fraction": jnp.sum(lost_all_GS * mask_GS) / num_tokens,
    "router_entropy": jnp.sum(entropy_GS * mask_GS) / num_tokens,
    "router_confidence": jnp.sum(gates_GSK * mask_GS[..., None]) / num_kept,
    "top1_probability": jnp.sum(jnp.max(probs_GSE, -1) * mask_GS) / num_tokens,
  }
  for k in range(K):
    metrics[f"drop_fraction_rank_{k + 1}"] = dropped_K[k]
  return metrics
