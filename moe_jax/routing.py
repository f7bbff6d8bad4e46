"""Tokens-choose routing as pure functions: gates, capacity, drop priority.

Shapes (see `moe_jax.shapes`): logits `[G, S, E]`, choices `[G, S, K]`.

Routing a group of S tokens to E experts, K experts per token, happens in
four steps, each a function here:

1. `router_probabilities`: p_t = softmax(z_t) over all E experts, in float32
   whatever the model dtype (Switch §2.4, "selective precision").
2. `top_k_gates`: each token's K chosen experts in rank order and their
   combine weights g (the named gate conventions are in `ROUTERS`).
3. `second_choice_mask`: GShard's policy for keeping choices after the first.
4. `assign_slots`: walks the (token, choice) pairs in a drop-priority order
   and gives each a slot in its expert's buffer of `capacity` slots; a pair
   that finds its expert full is dropped (weight 0, output exactly 0; the
   residual connection carries the token).

`route_tokens` chains them into a `Routing`. `compute_capacity` turns a
capacity factor into slots per expert under the conventions of `CAPACITY_RULES`.
"""

import dataclasses
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp


class Routing(NamedTuple):
  """Where each (token, choice) pair of a group goes.

  Attributes:
    expert_index_GSK: int32, the chosen expert of each rank (before capacity).
    gates_GSK: float32 combine weight g; exactly 0 where the pair was dropped.
    position_GSK: int32 slot in the expert's buffer; valid only where kept.
    kept_GSK: bool, the pair was dispatched (eligible and within capacity).
    probs_GSE: float32 router probabilities over all experts (for the losses).
  """

  expert_index_GSK: jax.Array
  gates_GSK: jax.Array
  position_GSK: jax.Array
  kept_GSK: jax.Array
  probs_GSE: jax.Array


# ---------------------------------------------------------------------------
# Gates.


@dataclasses.dataclass(frozen=True)
class GateConvention:
  """How a tokens-choose router turns logits into K combine weights.

  Attributes:
    softmax_order: "before": g = p_e from the softmax over all E experts, then
      top-K of p. "after": top-K of the logits z, then g = softmax over the K
      selected logits (Mixtral).
    renormalize: with "before", divide the K gates by their sum,
      g_e = p_e / sum_{j in TopK} p_j (GShard Alg. 1, line 5).
    top_k: the K the convention is defined for (None: any K).
  """

  softmax_order: str
  renormalize: bool
  top_k: int | None


ROUTERS = {
  # Switch (Fedus 2021, Eq. 2): y = p_{e*}(x) E_{e*}(x); the raw probability
  # is the router's only task-loss gradient.
  "switch": GateConvention("before", renormalize=False, top_k=1),
  # GShard (Lepikhin 2020, Alg. 1): g1, g2 <- g / (g1 + g2).
  "gshard": GateConvention("before", renormalize=True, top_k=2),
  # Raw softmax probabilities at any K (flaxformer, vmoe).
  "top_k": GateConvention("before", renormalize=False, top_k=None),
  # Renormalised top-K at any K (MaxText, Megatron-LM default).
  "top_k_renormalized": GateConvention("before", renormalize=True, top_k=None),
  # Mixtral (Jiang 2024): softmax over the K largest logits.
  "mixtral": GateConvention("after", renormalize=False, top_k=None),
}


def gate_convention(router: str, top_k: int, num_experts: int):
  """Looks up `router` in `ROUTERS` and checks `top_k` against it."""
  if router not in ROUTERS:
    raise ValueError(f"unknown router={router!r}; allowed: {sorted(ROUTERS)}.")
  convention = ROUTERS[router]
  if convention.top_k is not None and top_k != convention.top_k:
    raise ValueError(
      f"router={router!r} is defined for top_k={convention.top_k}, got "
      f"top_k={top_k}; use router='top_k' for other values."
    )
  if not 1 <= top_k <= num_experts:
    raise ValueError(
      f"top_k={top_k} must be between 1 and num_experts={num_experts}."
    )
  return convention


def router_probabilities(logits_GSE: jax.Array) -> jax.Array:
  """p = softmax(z) over experts, computed in float32 (Switch §2.4)."""
  return jax.nn.softmax(logits_GSE.astype(jnp.float32), axis=-1)


def top_k_gates(
  logits_GSE: jax.Array, top_k: int, convention: GateConvention
) -> tuple[jax.Array, jax.Array]:
  """Chosen experts in rank order and their combine weights.

  Args:
    logits_GSE: router logits z.
    top_k: K.
    convention: see `GateConvention`.

  Returns:
    expert_index_GSK (int32, rank 0 = largest logit; ties go to the lower
    expert index) and gates_GSK (float32).
  """
  chex.assert_rank(logits_GSE, 3)
  logits_GSE = logits_GSE.astype(jnp.float32)
  top_logits_GSK, expert_index_GSK = jax.lax.top_k(logits_GSE, top_k)
  if convention.softmax_order == "after":
    gates_GSK = jax.nn.softmax(top_logits_GSK, axis=-1)
  elif convention.softmax_order == "before":
    probs_GSE = router_probabilities(logits_GSE)
    gates_GSK = jnp.take_along_axis(probs_GSE, expert_index_GSK, axis=-1)
    if convention.renormalize:
      gates_GSK = gates_GSK / jnp.sum(gates_GSK, axis=-1, keepdims=True)
  else:
    raise ValueError(
      f"softmax_order={convention.softmax_order!r}; allowed: 'before', 'after'."
    )
  return expert_index_GSK.astype(jnp.int32), gates_GSK


SECOND_POLICIES = ("all", "random", "threshold")


def second_choice_mask(
  gates_GSK: jax.Array,
  policy: str,
  *,
  threshold: float = 0.2,
  rng: jax.Array | None = None,
) -> jax.Array:
  """Which choices a GShard-style policy keeps before capacity is applied.

  The first choice is always kept. For each later rank r the policy reads
  the (renormalised) gate g_r:
    "all":       kept.
    "random":    kept iff 2 * g_r > u, u ~ U(0, 1) (GShard Alg. 1, line 12:
                 a top-2 token keeps its second expert with probability 2 g2).
    "threshold": kept iff g_r > threshold (Mesh-TensorFlow's deterministic
                 policy).
  Randomness belongs to training; callers pass policy="all" at evaluation.

  Returns:
    bool `[G, S, K]`.
  """
  is_first_GSK = jnp.arange(gates_GSK.shape[-1]) == 0
  if policy == "all":
    later_kept_GSK = jnp.ones(gates_GSK.shape, bool)
  elif policy == "random":
    if rng is None:
      raise ValueError("second_policy='random' needs an rng.")
    u_GSK = jax.random.uniform(rng, gates_GSK.shape, jnp.float32)
    later_kept_GSK = 2.0 * gates_GSK > u_GSK  # GShard Alg. 1, line 12
  elif policy == "threshold":
    later_kept_GSK = gates_GSK > threshold
  else:
    raise ValueError(
      f"unknown second_policy={policy!r}; allowed: {list(SECOND_POLICIES)}."
    )
  return is_first_GSK | later_kept_GSK


# ---------------------------------------------------------------------------
# Capacity.


@dataclasses.dataclass(frozen=True)
class CapacityRule:
  """One codebase's formula for slots per expert per group.

  C = round_up_to_multiple(rounding(CF * S * (K if times_k else 1) / E)),
  then C = max(C, min_capacity) and C = min(C, S).
  """

  times_k: bool
  rounding: str  # "ceil" | "round" | "floor"
  multiple_of: int = 1


CAPACITY_RULES = {
  # Switch (Fedus 2021) Eq. 3: C = ceil(S / E * CF). No factor K; the paper
  # gives no rounding, ceil never leaves fewer slots than the even share.
  "switch": CapacityRule(times_k=False, rounding="ceil"),
  # GShard (Lepikhin 2020) §2.2: C = 2S/E for top-2, i.e. ceil(K * S * CF / E).
  "gshard": CapacityRule(times_k=True, rounding="ceil"),
  # flaxformer moe_layers.py: C = round(CF * S / E) (with min_capacity 4).
  "flaxformer": CapacityRule(times_k=False, rounding="round"),
  # vmoe moe.py compute_capacity: ceil(CF * S * K / E) up to a multiple of 4.
  "vmoe": CapacityRule(times_k=True, rounding="ceil", multiple_of=4),
  # Megatron-LM moe_utils.get_capacity: ceil(K * S / E * CF), the GShard
  # formula under another name, kept so configs can say which they follow.
  "megatron": CapacityRule(times_k=True, rounding="ceil"),
}

_ROUNDINGS = {"ceil": math.ceil, "round": round, "floor": math.floor}


def compute_capacity(
  group_size: int,
  num_experts: int,
  top_k: int,
  capacity_factor: float,
  rule: str = "switch",
  min_capacity: int = 0,
) -> int:
  """Slots per expert per group of `group_size` tokens (see CAPACITY_RULES).

  The result is clamped to [min_capacity, group_size]: an expert can never
  receive more than S tokens of a group.
  """
  if rule not in CAPACITY_RULES:
    raise ValueError(
      f"unknown capacity_rule={rule!r}; allowed: {sorted(CAPACITY_RULES)}."
    )
  if not capacity_factor > 0:
    raise ValueError(
      f"capacity_factor={capacity_factor} must be > 0 (1.0 = the even share)."
    )
  if min_capacity < 0:
    raise ValueError(f"min_capacity={min_capacity} must be >= 0.")
  spec = CAPACITY_RULES[rule]
  share = capacity_factor * group_size * (top_k if spec.times_k else 1)
  # Round away float noise (1.1 * 400 / 8 = 55.000000000000007) first.
  capacity = _ROUNDINGS[spec.rounding](round(share / num_experts, 9))
  capacity = -(-capacity // spec.multiple_of) * spec.multiple_of
  return int(min(max(capacity, min_capacity), group_size))


# ---------------------------------------------------------------------------
# Drop priority.

PRIORITIES = ("k_major", "token_major", "batch_priority")


def assign_slots(
  expert_index_GSK: jax.Array,
  eligible_GSK: jax.Array,
  num_experts: int,
  capacity: int,
  priority: str = "k_major",
  priority_score_GS: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Gives every eligible (token, choice) pair a slot, in priority order.

  Pairs are visited in one of three orders; each takes the next slot of its
  expert, and is kept iff that slot is < capacity:
    "k_major":        all first choices in token order, then all second
                      choices, ... (GShard Alg. 1; Switch, flaxformer, vmoe).
    "token_major":    token 0's K choices, then token 1's, ... (MaxText).
    "batch_priority": k-major over the tokens sorted by descending
                      `priority_score_GS` (V-MoE BPR, Riquelme 2021 §3.1:
                      the score is the token's top-1 probability; the sort
                      is stable, so equal scores keep token order).
  The slot counter advances for dropped pairs too (GShard Alg. 1): a pair is
  dropped iff at least `capacity` earlier eligible pairs chose its expert.
  Ineligible pairs (padding, or a second choice a policy discarded) take no
  slot.

  Returns:
    position_GSK (int32) and kept_GSK (bool).
  """
  chex.assert_equal_shape([expert_index_GSK, eligible_GSK])
  G, S, K = expert_index_GSK.shape
  onehot_GSKE = jax.nn.one_hot(expert_index_GSK, num_experts, dtype=jnp.int32)
  onehot_GSKE = onehot_GSKE * eligible_GSK[..., None]
  if priority == "batch_priority":
    if priority_score_GS is None:
      raise ValueError("priority='batch_priority' needs priority_score_GS.")
    order_GS = jnp.argsort(-priority_score_GS, axis=1, stable=True)
    onehot_GSKE = jnp.take_along_axis(
      onehot_GSKE, order_GS[:, :, None, None], axis=1
    )
  if priority in ("k_major", "batch_priority"):
    ordered_GNE = onehot_GSKE.transpose(0, 2, 1, 3).reshape(G, K * S, -1)
  elif priority == "token_major":
    ordered_GNE = onehot_GSKE.reshape(G, S * K, -1)
  else:
    raise ValueError(
      f"unknown priority={priority!r}; allowed: {list(PRIORITIES)}."
    )
  # Slot of each pair in its expert's buffer = eligible pairs before it.
  slots_GNE = jnp.cumsum(ordered_GNE, axis=1) - ordered_GNE
  if priority == "token_major":
    slots_GSKE = slots_GNE.reshape(G, S, K, -1)
  else:
    slots_GSKE = slots_GNE.reshape(G, K, S, -1).transpose(0, 2, 1, 3)
  if priority == "batch_priority":
    inverse_GS = jnp.argsort(order_GS, axis=1)
    slots_GSKE = jnp.take_along_axis(
      slots_GSKE, inverse_GS[:, :, None, None], axis=1
    )
  position_GSK = jnp.take_along_axis(
    slots_GSKE, expert_index_GSK[..., None], axis=-1
  )[..., 0]
  kept_GSK = eligible_GSK & (position_GSK < capacity)
  return position_GSK.astype(jnp.int32), kept_GSK


# ---------------------------------------------------------------------------
# The whole tokens-choose router.


def route_choices(
  expert_index_GSK: jax.Array,
  gates_GSK: jax.Array,
  probs_GSE: jax.Array,
  *,
  capacity: int,
  priority: str = "k_major",
  eligible_GSK: jax.Array | None = None,
  renormalize_after_drop: bool = False,
  padding_mask_GS: jax.Array | None = None,
) -> Routing:
  """Applies capacity to choices already made; the last step of every
  tokens-choose router (learned or not).

  Args:
    expert_index_GSK: the chosen experts, in rank order.
    gates_GSK: their combine weights before capacity.
    probs_GSE: the router's distribution over all experts (for the losses,
      the metrics and the batch-priority score max_e p).
    capacity: C slots per expert per group.
    priority: drop-priority order, see `assign_slots`.
    eligible_GSK: pairs allowed to take a slot (default: all).
    renormalize_after_drop: see `route_tokens`.
    padding_mask_GS: 1/True for real tokens; padded tokens take no slot.

  Returns:
    A `Routing`; dropped pairs have gate exactly 0.
  """
  chex.assert_equal_shape([expert_index_GSK, gates_GSK])
  num_experts = probs_GSE.shape[-1]
  if eligible_GSK is None:
    eligible_GSK = jnp.ones(expert_index_GSK.shape, bool)
  if padding_mask_GS is not None:
    chex.assert_shape(padding_mask_GS, probs_GSE.shape[:2])
    eligible_GSK = eligible_GSK & padding_mask_GS.astype(bool)[..., None]
  position_GSK, kept_GSK = assign_slots(
    expert_index_GSK,
    eligible_GSK,
    num_experts,
    capacity,
    priority,
    priority_score_GS=jnp.max(probs_GSE, axis=-1),
  )
  gates_GSK = jnp.where(kept_GSK, gates_GSK, 0.0)
  if renormalize_after_drop:
    total_GS1 = jnp.sum(gates_GSK, axis=-1, keepdims=True)
    gates_GSK = gates_GSK / jnp.where(total_GS1 > 0, total_GS1, 1.0)
  return Routing(
    expert_index_GSK.astype(jnp.int32),
    gates_GSK,
    position_GSK,
    kept_GSK,
    probs_GSE,
  )


def route_tokens(
  logits_GSE: jax.Array,
  *,
  router: str,
  top_k: int,
  capacity: int,
  priority: str = "k_major",
  second_policy: str = "all",
  second_threshold: float = 0.2,
  renormalize_after_drop: bool = False,
  padding_mask_GS: jax.Array | None = None,
  rng: jax.Array | None = None,
) -> Routing:
  """Tokens-choose top-K routing of groups of tokens with capacity.

  Args:
    logits_GSE: router logits z (any float dtype; used in float32).
    router: a name in `ROUTERS` (its gate convention).
    top_k: K experts per token.
    capacity: C slots per expert per group (`compute_capacity`).
    priority: drop-priority order, see `assign_slots`.
    second_policy: see `second_choice_mask`.
    second_threshold: threshold of the "threshold" policy.
    renormalize_after_drop: divide the surviving gates by their sum after
      capacity, so a token that lost its second expert gets weight 1 on the
      first (fairseq, DeepSpeed). False keeps the weights as gated before
      dropping (GShard Alg. 1, Mesh-TensorFlow).
    padding_mask_GS: 1/True for real tokens; padded tokens take no slot and
      get no expert.
    rng: key for the "random" second policy.

  Returns:
    A `Routing`.
  """
  chex.assert_rank(logits_GSE, 3)
  num_experts = logits_GSE.shape[-1]
  convention = gate_convention(router, top_k, num_experts)
  probs_GSE = router_probabilities(logits_GSE)
  expert_index_GSK, gates_GSK = top_k_gates(logits_GSE, top_k, convention)
  eligible_GSK = second_choice_mask(
    gates_GSK, second_policy, threshold=second_threshold, rng=rng
  )
  return route_choices(
    expert_index_GSK,
    gates_GSK,
    probs_GSE,
    capacity=capacity,
    priority=priority,
    eligible_GSK=eligible_GSK,
    renormalize_after_drop=renormalize_after_drop,
    padding_mask_GS=padding_mask_GS,
  )
