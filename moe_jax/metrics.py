"""Routing metrics as pure functions: what a router did to one batch.

Shapes (see `moe_jax.shapes`): `routing.Routing` fields `[G, S, K]` and
`[G, S, E]`, padding mask `[G, S]`. All metrics count real tokens only and
are computed over the whole batch (all groups together); the trainer
reports each per layer. Definitions:

- expert_counts (vector of E): c_e, how many of the batch's routed choices
  (real tokens, before capacity) picked expert e.
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

Learned routers also report two statistics of their logits z
(`router_logit_metrics`, ST-MoE, Zoph 2022 §3.3-3.4; the layer sows them):

- router_logit_max_abs: max over real tokens and experts of |z_{t,e}|.
- router_logsumexp: mean over real tokens of logsumexp_e z_{t,e}, the
  quantity the router z-loss squares (ST-MoE Eq. 5:
  L_z = (1/T) sum_t (logsumexp_e z_{t,e})^2).

Expert choice (`expert_choice_metrics`) has no per-token choices: c_e counts
the tokens expert e took (C per group by construction, so load_cv and
max_violation are 0 up to padding), drop_fraction is the share of tokens no
expert took, and instead of per-rank drops it reports the number of experts
per token (experts_per_token_min / _max / _mean) and
tokens_with_at_least_{n}_experts for n = 1 .. min(E, 4).

Batch and global MaxVio. Each of these is one batch's; the trainer logs them
per training step as they are. An evaluation over several batches goes
through `pool_batches`, which reports MaxVio two ways (Wang 2024 Table 2
reports the second): `max_violation_batch`, the mean over batches of each
batch's MaxVio, and `max_violation_global`, the MaxVio of the counts pooled
over all the batches. The pooled counts balance better than each batch
does (sampling noise cancels), so the global value is the smaller one when
every batch holds as many choices: compare like with like.
"""

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.routing import Routing


def _real_mask(routing: Routing, padding_mask_GS):
  G, S = routing.expert_index_GSK.shape[:2]
  if padding_mask_GS is None:
    return jnp.ones((G, S), jnp.float32)
  return padding_mask_GS.astype(jnp.float32)


def _load_metrics(counts_E: jax.Array) -> dict[str, jax.Array]:
  """Balance of per-expert counts c_e."""
  E = counts_E.shape[0]
  mean_count = jnp.maximum(jnp.mean(counts_E), 1e-9)
  fraction_E = counts_E / jnp.maximum(jnp.sum(counts_E), 1e-9)
  return {
    "expert_counts": counts_E,
    "expert_fraction": fraction_E,
    "load_cv": jnp.std(counts_E) / mean_count,
    "max_violation": (jnp.max(counts_E) - jnp.mean(counts_E)) / mean_count,
    "dead_experts": jnp.sum(fraction_E < 0.1 / E).astype(jnp.float32),
  }


def _router_metrics(routing: Routing, mask_GS) -> dict[str, jax.Array]:
  """Drops, entropy and confidence, shared by every router."""
  num_tokens = jnp.maximum(jnp.sum(mask_GS), 1.0)
  kept_GSK = routing.kept_GSK.astype(jnp.float32)
  lost_all_GS = jnp.all(~routing.kept_GSK, axis=-1).astype(jnp.float32)
  # Padded rows may hold anything (even NaN): zero them before any product.
  probs_GSE = jnp.where(mask_GS[..., None] > 0, routing.probs_GSE, 0.0)
  gates_GSK = jnp.where(mask_GS[..., None] > 0, routing.gates_GSK, 0.0)
  entropy_GS = -jnp.sum(probs_GSE * jnp.log(jnp.maximum(probs_GSE, 1e-30)), -1)
  num_kept = jnp.maximum(jnp.sum(kept_GSK * mask_GS[..., None]), 1.0)
  return {
    "drop_fraction": jnp.sum(lost_all_GS * mask_GS) / num_tokens,
    "router_entropy": jnp.sum(entropy_GS * mask_GS) / num_tokens,
    "router_confidence": jnp.sum(gates_GSK * mask_GS[..., None]) / num_kept,
    "top1_probability": jnp.sum(jnp.max(probs_GSE, -1) * mask_GS) / num_tokens,
  }


def router_logit_metrics(
  logits_GSE: jax.Array, padding_mask_GS: jax.Array | None = None
) -> dict[str, jax.Array]:
  """max |z| and mean logsumexp_e z over the real tokens, in float32.

  ST-MoE (Zoph 2022) Eq. 5 squares logsumexp_e z_t in its z-loss; §3.3-3.4
  watch the size of the logits. Padded rows may hold anything (even NaN)
  and are excluded; with no real token both are 0.
  """
  G, S, _ = logits_GSE.shape
  if padding_mask_GS is None:
    real_GS = jnp.ones((G, S), bool)
  else:
    real_GS = padding_mask_GS.astype(bool)
  z_GSE = jnp.where(real_GS[..., None], logits_GSE.astype(jnp.float32), 0.0)
  num_tokens = jnp.maximum(jnp.sum(real_GS.astype(jnp.float32)), 1.0)
  logsumexp_GS = jax.nn.logsumexp(z_GSE, axis=-1)  # ST-MoE Eq. 5, inner term
  return {
    "router_logit_max_abs": jnp.max(jnp.abs(z_GSE)),
    "router_logsumexp": jnp.sum(jnp.where(real_GS, logsumexp_GS, 0.0))
    / num_tokens,
  }


def routing_metrics(
  routing: Routing, padding_mask_GS: jax.Array | None = None
) -> dict[str, jax.Array]:
  """The metrics above for one MoE layer and batch (scalars, one E-vector)."""
  K = routing.expert_index_GSK.shape[-1]
  E = routing.probs_GSE.shape[-1]
  mask_GS = _real_mask(routing, padding_mask_GS)
  num_tokens = jnp.maximum(jnp.sum(mask_GS), 1.0)
  choices_GSKE = jax.nn.one_hot(routing.expert_index_GSK, E)
  counts_E = jnp.einsum("gske,gs->e", choices_GSKE, mask_GS)
  kept_GSK = routing.kept_GSK.astype(jnp.float32)
  dropped_K = jnp.einsum("gsk,gs->k", 1.0 - kept_GSK, mask_GS) / num_tokens
  metrics = {**_load_metrics(counts_E), **_router_metrics(routing, mask_GS)}
  for k in range(K):
    metrics[f"drop_fraction_rank_{k + 1}"] = dropped_K[k]
  return metrics


def expert_choice_metrics(
  routing: Routing,
  padding_mask_GS: jax.Array | None = None,
  max_listed: int = 4,
) -> dict[str, jax.Array]:
  """Metrics of an expert-choice `Routing` (K = E, rank e = expert e)."""
  E = routing.probs_GSE.shape[-1]
  mask_GS = _real_mask(routing, padding_mask_GS)
  num_tokens = jnp.maximum(jnp.sum(mask_GS), 1.0)
  kept_GSE = routing.kept_GSK.astype(jnp.float32) * mask_GS[..., None]
  experts_per_token_GS = jnp.sum(kept_GSE, axis=-1)
  real_GS = mask_GS > 0
  metrics = {
    **_load_metrics(jnp.sum(kept_GSE, axis=(0, 1))),
    **_router_metrics(routing, mask_GS),
    "experts_per_token_min": jnp.min(
      jnp.where(real_GS, experts_per_token_GS, E)
    ),
    "experts_per_token_max": jnp.max(
      jnp.where(real_GS, experts_per_token_GS, 0)
    ),
    "experts_per_token_mean": jnp.sum(experts_per_token_GS) / num_tokens,
  }
  for n in range(1, min(E, max_listed) + 1):
    at_least_GS = (experts_per_token_GS >= n).astype(jnp.float32) * mask_GS
    metrics[f"tokens_with_at_least_{n}_experts"] = (
      jnp.sum(at_least_GS) / num_tokens
    )
  return metrics


COUNTS = "expert_counts"  # c_e of `_load_metrics` (and the DeepSeek layer)
MAX_VIOLATION = "max_violation"


def pool_batches(per_batch: list[dict]) -> dict[str, np.ndarray]:
  """One evaluation's metrics from those of its batches (host NumPy).

  Metric names are "prefix/name" ("moe/layer_01/max_violation"), "name"
  without a prefix. By name:

  - expert_counts{suffix} (c_e, vector E): summed over the batches, the
    counts of the whole evaluation set;
  - max_violation{suffix}: renamed max_violation{suffix}_batch, the mean over
    batches of each batch's MaxVio;
  - max_violation{suffix}_global, added for each expert_counts{suffix}: MaxVio
    (Wang 2024 Eq. 4) of the summed counts, MaxVio_global of Wang 2024
    Table 2;
  - every other metric: its mean over the batches.

  The suffix ("", "_before_bias", "_after_bias") pairs counts with their
  MaxVio.

  Args:
    per_batch: one dict of metrics per batch, the same keys in each.

  Returns:
    The pooled metrics, float64 where computed here.
  """
  out = {}
  for key in per_batch[0]:
    values = np.stack([np.asarray(m[key], np.float64) for m in per_batch])
    prefix, _, name = key.rpartition("/")
    prefix = f"{prefix}/" if prefix else ""
    if name.startswith(COUNTS):
      counts_E = values.sum(axis=0)  # pooled c_e
      suffix = name.removeprefix(COUNTS)
      mean = counts_E.mean()
      out[key] = counts_E
      out[f"{prefix}{MAX_VIOLATION}{suffix}_global"] = (
        counts_E.max() - mean
      ) / max(mean, 1e-9)  # Wang 2024 Eq. 4 on the pooled counts
    elif name.startswith(MAX_VIOLATION):
      out[f"{key}_batch"] = values.mean(axis=0)
    else:
      out[key] = values.mean(axis=0)
  return out


# ---- Expert collapse over a run (from its metrics.jsonl rows) -------------

# How far the largest expert share must move from the even share 1/E
# towards total collapse (1/K: K experts take every choice) to count: 3/7
# puts the line at exactly 0.5 for E = 8, K = 1.
COLLAPSE_EXCESS = 3 / 7
# Consecutive logged rows above the line before a layer counts as collapsed
# (one unlucky batch does not).
COLLAPSE_PATIENCE = 3


def expert_load(
  rows: list[dict], split: str = "train"
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Per MoE layer, the expert shares f_e over a run's logged steps.

  Args:
    rows: the rows of a run's metrics.jsonl (`writers.read_metrics`).
    split: "train" (every logged step) or "eval".

  Returns:
    {"layer_01": (steps [T], fraction [T, E])} from the rows holding
    "<split>/moe/<layer>/expert_fraction", in row order.
  """
  prefix, suffix = f"{split}/moe/", "/expert_fraction"
  load: dict[str, tuple[list, list]] = {}
  for row in rows:
    for key, value in row.items():
      if key.startswith(prefix) and key.endswith(suffix):
        layer = key[len(prefix) : -len(suffix)]
        steps, fractions = load.setdefault(layer, ([], []))
        steps.append(row["step"])
        fractions.append(value)
  return {
    layer: (np.asarray(steps), np.asarray(fractions, np.float64))
    for layer, (steps, fractions) in sorted(load.items())
  }


def collapse_threshold(num_experts: int, top_k: int = 1) -> float:
  """The largest-share line of `detect_collapse`: 1/E + COLLAPSE_EXCESS *
  (1/K - 1/E), between the even share 1/E and total collapse 1/K (each
  token's K choices are distinct experts, so no expert takes more than 1/K
  of the choices)."""
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"top_k={top_k} must be in 1 .. E={num_experts}.")
  even = 1.0 / num_experts
  return even + COLLAPSE_EXCESS * (1.0 / top_k - even)


def detect_collapse(
  rows: list[dict], *, top_k: int = 1, split: str = "train"
) -> dict[str, dict]:
  """Flags MoE layers whose routing collapsed onto few experts.

  The rule: a layer has collapsed at step t when its largest expert share
  max_e f_e (the share of the batch's routed choices, `expert_fraction`)
  is above `collapse_threshold(E, K)` (0.5 for E = 8, K = 1) in
  COLLAPSE_PATIENCE consecutive logged rows, t the first of them. The
  same line in MaxVio terms (Wang 2024 Eq. 4, MaxVio = E max_e f_e - 1 for
  shares): MaxVio > E threshold - 1 (3.0 at E = 8, K = 1).

  Args:
    rows: the rows of a run's metrics.jsonl (`writers.read_metrics`).
    top_k: the run's K (config.model.moe.top_k).
    split: "train" or "eval".

  Returns:
    Per layer: {"steps", "max_share" [T], "threshold", "collapsed" (bool),
    "collapse_step" (first step of the first run of COLLAPSE_PATIENCE rows
    above the line, or None), "final_max_share", "dominant_expert" (the
    expert of the largest share at the last step)}.
  """
  out = {}
  for layer, (steps, fraction_TE) in expert_load(rows, split).items():
    threshold = collapse_threshold(fraction_TE.shape[1], top_k)
    max_share_T = fraction_TE.max(axis=1)
    above_T = max_share_T > threshold
    collapse_step, streak = None, 0
    for t, above in enumerate(above_T):
      streak = streak + 1 if above else 0
      if streak == COLLAPSE_PATIENCE:
        collapse_step = int(steps[t - COLLAPSE_PATIENCE + 1])
        break
    out[layer] = {
      "steps": steps,
      "max_share": max_share_T,
      "threshold": threshold,
      "collapsed": collapse_step is not None,
      "collapse_step": collapse_step,
      "final_max_share": float(max_share_T[-1]),
      "dominant_expert": int(fraction_TE[-1].argmax()),
    }
  return out
