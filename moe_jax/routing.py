"""Tokens-choose routing as pure functions: gates, capacity, drop priority.

Shapes (see `moe_jax.shapes`): logits `[G, S, E]`, choices `[G, S, K]`.

Routing a group of S tokens to E experts, K experts per token, happens in
four steps, each a function here:

1. `router_probabilities`: p_t = softmax(z_t) over all E experts, in float32
   whatever the model dtype (Switch §2.4, "selective precision"), unless a
   caller asks for a bfloat16 softmax to emulate a router without it.
2. `top_k_gates`: each token's K chosen experts in rank order and their
   combine weights g (the named gate conventions are in `ROUTERS`).
3. `second_choice_mask`: GShard's policy for keeping choices after the first.
4. `assign_slots`: walks the (token, choice) pairs in a drop-priority order
   and gives each a slot in its expert's buffer of `capacity` slots; a pair
   that finds its expert full is dropped (weight 0, output exactly 0; the
   residual connection carries the token). Whether a choice the policy of
   step 3 rejected still uses up a slot number is `SECOND_CHOICE_COUNTINGS`.

`route_tokens` chains them into a `Routing`. `compute_capacity` turns a
capacity factor into slots per expert under the conventions of `CAPACITY_RULES`.

Other routers end in the same `Routing`, so both dispatch backends serve all:
noisy top-k gating (`noisy_logits`, Shazeer 2017; V-MoE), expert choice
(`expert_choice_route`, K = E), the dense soft mixture (`soft_mixture_route`),
S-BASE (`sinkhorn_route`), and the non-learned `hash_route` and
`random_route`; DeepSeek-V3's router is in `moe_jax.deepseek`.
`ROUTING_SCHEMES` names them all for the MoE layer.
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


SOFTMAX_DTYPES = (jnp.float32, jnp.bfloat16)


def router_probabilities(
  logits_GSE: jax.Array, softmax_dtype=jnp.float32
) -> jax.Array:
  """p = softmax(z) over experts (Switch Eq. 1), returned as float32.

  The softmax runs in float32 by default, whatever the logits' dtype (Switch
  §2.4, "selective precision"). `softmax_dtype=jnp.bfloat16` runs it in
  bfloat16 instead, so p is rounded to bfloat16 before it is widened back:
  the router without selective precision that Switch Table 2 compares
  against (and flaxformer's default bfloat16 `RouterWeights`).
  """
  if softmax_dtype not in SOFTMAX_DTYPES:
    raise ValueError(
      f"softmax_dtype={softmax_dtype!r}; allowed: jnp.float32, jnp.bfloat16."
    )
  probs_GSE = jax.nn.softmax(logits_GSE.astype(softmax_dtype), axis=-1)
  return probs_GSE.astype(jnp.float32)


def top_k_indices(x_GSE: jax.Array, k: int) -> jax.Array:
  """The indices of `jax.lax.top_k(x_GSE, k)`, by k passes of argmax.

  Same order and ties (the lower index first, also among -inf). XLA's SPMD
  partitioner keeps argmax local to the devices that hold each group, but
  all-gathers the group axis of a top_k; for the K of routing (1, 2, up to
  8) the passes cost about as much as top_k.
  """
  E = x_GSE.shape[-1]
  # The first pass has nothing taken: a constant all-False `taken` there
  # made XLA constant-fold argmax(~taken) over the whole [G, S, E] at
  # compile time (seconds at eval size, a slow_operation_alarm).
  index_GS = jnp.argmax(x_GSE, axis=-1)
  index_K_GS = [index_GS]
  taken_GSE = jnp.arange(E) == index_GS[..., None]
  for _ in range(k - 1):
    index_GS = jnp.argmax(jnp.where(taken_GSE, -jnp.inf, x_GSE), axis=-1)
    # Only when every free entry is -inf can argmax land on a taken one.
    first_free_GS = jnp.argmax(~taken_GSE, axis=-1)
    landed_on_taken_GS = jnp.take_along_axis(
      taken_GSE, index_GS[..., None], axis=-1
    )[..., 0]
    index_GS = jnp.where(landed_on_taken_GS, first_free_GS, index_GS)
    index_K_GS.append(index_GS)
    taken_GSE = taken_GSE | (jnp.arange(E) == index_GS[..., None])
  return jnp.stack(index_K_GS, axis=-1)


def top_k_gates(
  logits_GSE: jax.Array,
  top_k: int,
  convention: GateConvention,
  softmax_dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array]:
  """Chosen experts in rank order and their combine weights.

  Args:
    logits_GSE: router logits z.
    top_k: K.
    convention: see `GateConvention`.
    softmax_dtype: dtype of the softmax (see `router_probabilities`); the
      renormalisation that follows is float32.

  Returns:
    expert_index_GSK (int32, rank 0 = largest logit; ties go to the lower
    expert index) and gates_GSK (float32).
  """
  chex.assert_rank(logits_GSE, 3)
  logits_GSE = logits_GSE.astype(jnp.float32)
  expert_index_GSK = top_k_indices(logits_GSE, top_k)
  top_logits_GSK = jnp.take_along_axis(logits_GSE, expert_index_GSK, axis=-1)
  if convention.softmax_order == "after":
    gates_GSK = router_probabilities(top_logits_GSK, softmax_dtype)
  elif convention.softmax_order == "before":
    probs_GSE = router_probabilities(logits_GSE, softmax_dtype)
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
  Whether a rejected choice still takes a slot number is decided later, by
  the `second_choice_counting` of `route_tokens` (`SECOND_CHOICE_COUNTINGS`).

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


# How a later choice that `second_choice_mask` rejected counts in its
# expert's slot counter (REFERENCE §i, "GShard Alg. 1 counting"):
SECOND_CHOICE_COUNTINGS = (
  # Lingvo `gshard_layers.Top2GatingOnLogits`, Mesh-TensorFlow, praxis
  # `gshard_utils.top2_gating_on_logits` (mask_2 is multiplied by the draw
  # before its cumsum): a rejected choice takes no slot.
  "kept_only",
  # GShard (Lepikhin 2020) Alg. 1, second loop over tokens: `c_{e2} += 1`
  # after the `if c < C and 2 g2 > rnd` test, so a rejected second choice
  # still advances its expert's counter and later second choices queue
  # behind it.
  "gshard_alg1",
)


def _check_second_choice_counting(counting: str):
  if counting not in SECOND_CHOICE_COUNTINGS:
    raise ValueError(
      f"unknown second_choice_counting={counting!r}; allowed: "
      f"{list(SECOND_CHOICE_COUNTINGS)}."
    )


# ---------------------------------------------------------------------------
# Capacity.


@dataclasses.dataclass(frozen=True)
class CapacityRule:
  """One codebase's formula for slots per expert per group.

  formula "share" (every rule but two):
    C = round_up_to_multiple(rounding(CF * S * (K if times_k else 1) / E)),
    then C = max(C, min_capacity).
  formula "maxtext": C = int(max(ceil(S * K / E) * CF, CF)), then
    C = max(C, min_capacity) (see `_maxtext_capacity`).
  formula "praxis": C = int(S * CF / E) rounded up to a multiple of 4 when
    it exceeds min_capacity, else min_capacity (see `_praxis_capacity`).
  Every formula ends with C = min(C, S).
  """

  times_k: bool
  rounding: str  # "ceil" | "round" | "floor"
  multiple_of: int = 1
  formula: str = "share"  # "share" | "maxtext" | "praxis"


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
  # MaxText MaxText/layers/moe.py `RoutedMoE.generate_masks`:
  # int(max(ceil(S K / E) CF, CF)), S = one sequence (set group_size to the
  # sequence length to match it); ceil(S K / E) rounds up before the factor
  # CF, int() truncates.
  "maxtext": CapacityRule(times_k=True, rounding="floor", formula="maxtext"),
  # praxis praxis/gshard_utils.py `top2_gating_on_logits` and
  # `topk_gating_on_logits`: int(S CF / E) up to a multiple of 4, no K (its
  # CF is "unadjusted": 2.0 for top-2 means the 2S/E of GShard).
  "praxis": CapacityRule(
    times_k=False, rounding="floor", multiple_of=4, formula="praxis"
  ),
}

_ROUNDINGS = {"ceil": math.ceil, "round": round, "floor": math.floor}


def _maxtext_capacity(S: int, E: int, K: int, capacity_factor: float) -> int:
  """MaxText's expert capacity per batch, as coded in
  AI-Hypercomputer/maxtext MaxText/layers/moe.py (`generate_masks`):

    tokens_per_batch = seq_len * num_experts_per_tok
    expert_capacity_per_batch = int(max(
        math.ceil(tokens_per_batch / num_experts) * capacity_factor,
        capacity_factor))

  i.e. C = int(max(ceil(S K / E) CF, CF)) with int() truncation, evaluated
  with the same float operations (no noise rounding, so the same C as
  MaxText, float noise included). For S, K >= 1, ceil(S K / E) >= 1 and the
  max(., CF) never binds; it only keeps C > 0 when S K = 0.
  """
  tokens_per_batch = S * K
  return int(
    max(math.ceil(tokens_per_batch / E) * capacity_factor, capacity_factor)
  )


def _praxis_capacity(
  S: int, E: int, capacity_factor: float, min_capacity: int
) -> int:
  """praxis's expert capacity, as coded in google/praxis
  praxis/gshard_utils.py (`top2_gating_on_logits`, `topk_gating_on_logits`):

    auto_expert_capacity = int(group_size_dim * capacity_factor / experts_dim)
    if expert_capacity_dim < auto_expert_capacity:
      expert_capacity_dim = auto_expert_capacity
      while expert_capacity_dim % 4: expert_capacity_dim += 1

  with praxis's `expert_capacity_dim` in the role of `min_capacity`: C =
  int(S CF / E) (truncation, no factor K) rounded up to a multiple of 4 when
  it exceeds min_capacity; otherwise min_capacity, not rounded.
  """
  auto_capacity = int(S * capacity_factor / E)
  if min_capacity >= auto_capacity:
    return min_capacity
  return -(-auto_capacity // 4) * 4


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
  if spec.formula == "maxtext":
    capacity = _maxtext_capacity(
      group_size, num_experts, top_k, capacity_factor
    )
  elif spec.formula == "praxis":
    capacity = _praxis_capacity(
      group_size, num_experts, capacity_factor, min_capacity
    )
  else:
    share = capacity_factor * group_size * (top_k if spec.times_k else 1)
    # Round away float noise (1.1 * 400 / 8 = 55.000000000000007) first.
    capacity = _ROUNDINGS[spec.rounding](round(share / num_experts, 9))
    capacity = -(-capacity // spec.multiple_of) * spec.multiple_of
  # Clamping to S changes no drop: an expert gets at most S pairs per group.
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
  counted_GSK: jax.Array | None = None,
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
  The slot counter advances for pairs dropped by capacity too (GShard Alg.
  1, in both loops over tokens): a pair is dropped iff at least `capacity`
  earlier counted pairs chose its expert.

  `counted_GSK` (default: `eligible_GSK`) marks the pairs that advance the
  counter (an eligible pair always does). By default an ineligible
  pair (padding, or a later choice a policy rejected) takes no slot
  (Lingvo, Mesh-TensorFlow: "kept_only" in `SECOND_CHOICE_COUNTINGS`).
  GShard Alg. 1 counts a rejected second choice too ("gshard_alg1"): pass
  the policy-rejected pairs as counted but not eligible. Such a pair gets
  the slot number it used up in position_GSK and is never kept.

  Returns:
    position_GSK (int32) and kept_GSK (bool).
  """
  chex.assert_equal_shape([expert_index_GSK, eligible_GSK])
  G, S, K = expert_index_GSK.shape
  if counted_GSK is None:
    counted_GSK = eligible_GSK
  chex.assert_equal_shape([expert_index_GSK, counted_GSK])
  onehot_GSKE = jax.nn.one_hot(expert_index_GSK, num_experts, dtype=jnp.int32)
  onehot_GSKE = onehot_GSKE * (counted_GSK | eligible_GSK)[..., None]
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
  # Slot of each pair in its expert's buffer = counted pairs before it.
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
  counted_GSK: jax.Array | None = None,
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
    eligible_GSK: pairs allowed to be dispatched (default: all).
    renormalize_after_drop: see `route_tokens`.
    padding_mask_GS: 1/True for real tokens; padded tokens take no slot.
    counted_GSK: pairs that advance their expert's slot counter (default:
      the eligible ones); see `assign_slots`.

  Returns:
    A `Routing`; dropped pairs have gate exactly 0.
  """
  chex.assert_equal_shape([expert_index_GSK, gates_GSK])
  num_experts = probs_GSE.shape[-1]
  if eligible_GSK is None:
    eligible_GSK = jnp.ones(expert_index_GSK.shape, bool)
  if counted_GSK is None:
    counted_GSK = eligible_GSK
  if padding_mask_GS is not None:
    chex.assert_shape(padding_mask_GS, probs_GSE.shape[:2])
    real_GS1 = padding_mask_GS.astype(bool)[..., None]
    eligible_GSK = eligible_GSK & real_GS1
    counted_GSK = counted_GSK & real_GS1
  position_GSK, kept_GSK = assign_slots(
    expert_index_GSK,
    eligible_GSK,
    num_experts,
    capacity,
    priority,
    priority_score_GS=jnp.max(probs_GSE, axis=-1),
    counted_GSK=counted_GSK,
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
  second_choice_counting: str = "kept_only",
  renormalize_after_drop: bool = False,
  padding_mask_GS: jax.Array | None = None,
  rng: jax.Array | None = None,
  softmax_dtype=jnp.float32,
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
    second_choice_counting: whether a choice the policy rejected still
      advances its expert's slot counter: "kept_only" (no; Lingvo,
      Mesh-TensorFlow) or "gshard_alg1" (yes; GShard Alg. 1). See
      `SECOND_CHOICE_COUNTINGS`; the two agree under policy "all".
    renormalize_after_drop: divide the surviving gates by their sum after
      capacity, so a token that lost its second expert gets weight 1 on the
      first (fairseq, DeepSpeed). False keeps the weights as gated before
      dropping (GShard Alg. 1, Mesh-TensorFlow).
    padding_mask_GS: 1/True for real tokens; padded tokens take no slot and
      get no expert.
    rng: key for the "random" second policy.
    softmax_dtype: dtype of the router softmax (`router_probabilities`).

  Returns:
    A `Routing`.
  """
  chex.assert_rank(logits_GSE, 3)
  num_experts = logits_GSE.shape[-1]
  convention = gate_convention(router, top_k, num_experts)
  _check_second_choice_counting(second_choice_counting)
  probs_GSE = router_probabilities(logits_GSE, softmax_dtype)
  expert_index_GSK, gates_GSK = top_k_gates(
    logits_GSE, top_k, convention, softmax_dtype
  )
  eligible_GSK = second_choice_mask(
    gates_GSK, second_policy, threshold=second_threshold, rng=rng
  )
  counted_GSK = None  # "kept_only": the eligible pairs
  if second_choice_counting == "gshard_alg1":
    counted_GSK = jnp.ones(eligible_GSK.shape, bool)
  return route_choices(
    expert_index_GSK,
    gates_GSK,
    probs_GSE,
    capacity=capacity,
    priority=priority,
    eligible_GSK=eligible_GSK,
    renormalize_after_drop=renormalize_after_drop,
    padding_mask_GS=padding_mask_GS,
    counted_GSK=counted_GSK,
  )


# ---------------------------------------------------------------------------
# Noisy gating (Shazeer 2017; V-MoE).


def noisy_logits(
  logits_GSE: jax.Array,
  noise_std_GSE: jax.Array,
  normal_GSE: jax.Array | None,
) -> jax.Array:
  """H = z + eps * sigma: the noisy logits that noisy routers select with.

  Shazeer et al. 2017 Eq. 4: H(x)_i = (x W_g)_i + StandardNormal() *
  Softplus((x W_noise)_i), so sigma = `shazeer_noise_std`. V-MoE (Riquelme
  2021; as coded in google-research/vmoe `vmoe/nn/routing.py`) adds noise of
  a fixed sigma = `vmoe_noise_std`. Noise belongs to training: pass
  `normal_GSE=None` at evaluation to get H = z.

  Args:
    logits_GSE: clean logits z = x W_g.
    noise_std_GSE: sigma, broadcastable to `[G, S, E]`.
    normal_GSE: eps ~ N(0, 1) of the logits' shape, or None.

  Returns:
    float32 noisy logits H `[G, S, E]`.
  """
  logits_GSE = logits_GSE.astype(jnp.float32)
  if normal_GSE is None:
    return logits_GSE
  chex.assert_equal_shape([logits_GSE, normal_GSE])
  return logits_GSE + normal_GSE * noise_std_GSE  # Shazeer 2017 Eq. 4


def shazeer_noise_std(noise_logits_GSE: jax.Array) -> jax.Array:
  """sigma = Softplus(x W_noise), the learned noise scale (Shazeer Eq. 4)."""
  return jax.nn.softplus(noise_logits_GSE.astype(jnp.float32))  # Eq. 4


def vmoe_noise_std(noise_std: float, num_experts: int) -> float:
  """sigma = noise_std / E, V-MoE's fixed noise scale (as coded in vmoe
  `NoisyTopExpertsPerItemRouter`, default noise_std 1.0)."""
  return noise_std / num_experts


# Gate conventions of the noisy routers, applied to the noisy logits H.
NOISY_GATES = {
  # Shazeer 2017 Eq. 3: G(x) = Softmax(KeepTopK(H(x), k)), the softmax over
  # the k kept noisy logits (Eq. 5 sets the others to -inf): the "mixtral"
  # convention applied to H.
  "noisy_top_k": "mixtral",
  # V-MoE: the combine weight is the noisy softmax over all E experts at the
  # chosen expert (vmoe `gates_softmax_noisy`): the "top_k" convention.
  "vmoe": "top_k",
}


# ---------------------------------------------------------------------------
# Expert choice (Zhou et al. 2022).


def expert_choice_route(
  logits_GSE: jax.Array,
  capacity: int,
  padding_mask_GS: jax.Array | None = None,
  softmax_dtype=jnp.float32,
) -> Routing:
  """Experts choose tokens (Zhou et al. 2022; paper details unverified, as
  coded in google/flaxformer `ExpertsChooseMaskedRouter` and vmoe
  `NoisyTopItemsPerExpertRouter`).

    scores S = softmax(x W_g) over experts, per token      ([S, E] per group)
    each expert e takes the C tokens of the group with the highest S[:, e]
    y_t = sum over the experts e that took t of S[t, e] * FFN_e(x_t)

  with C = S * c / E (c, the paper's capacity factor, is 2 in most of its
  experiments; `compute_capacity(..., rule="switch")` gives ceil(c S / E)).
  Every expert processes exactly C tokens (perfect load by construction, no
  balancing loss); a token gets 0 to E experts. Ties go to the earlier token.

  The result is a `Routing` with K = E: rank e is expert e
  (expert_index[g, s, e] = e), kept iff expert e chose the token, position =
  the token's rank in expert e's choice (so the einsum and index dispatchers
  need no change), gate = the score S[t, e] where kept, else 0. Padded
  tokens are never chosen.

  NOT CAUSAL: whether expert e takes token t depends on the scores of every
  token of the group, later ones included (see `ROUTING_SCHEMES`).

  Args:
    logits_GSE: router logits z.
    capacity: C tokens per expert per group, 0 <= C <= S.
    padding_mask_GS: 1/True for real tokens.
    softmax_dtype: dtype of the score softmax (`router_probabilities`).

  Returns:
    A `Routing` with K = E.
  """
  chex.assert_rank(logits_GSE, 3)
  G, S, E = logits_GSE.shape
  if not 0 <= capacity <= S:
    raise ValueError(
      f"expert choice capacity={capacity} must be in [0, S={S}]: an expert "
      "cannot take more tokens than its group holds."
    )
  # Zhou 2022: S = softmax(X W_g)
  probs_GSE = router_probabilities(logits_GSE, softmax_dtype)
  if padding_mask_GS is None:
    real_GS = jnp.ones((G, S), bool)
  else:
    chex.assert_shape(padding_mask_GS, (G, S))
    real_GS = padding_mask_GS.astype(bool)
  # A padded token scores -1, below every probability, and is never kept.
  scores_GES = jnp.where(real_GS[:, None, :], probs_GSE.transpose(0, 2, 1), -1)
  _, token_index_GEC = jax.lax.top_k(scores_GES, capacity)  # Zhou: TopK(S^T)
  # position[g, e, s]: rank of token s in expert e's choice; C if not chosen.
  rank_GEC = jnp.broadcast_to(jnp.arange(capacity), token_index_GEC.shape)
  position_GES = (
    jnp.full((G, E, S), capacity, jnp.int32)
    .at[
      jnp.arange(G)[:, None, None],
      jnp.arange(E)[None, :, None],
      token_index_GEC,
    ]
    .set(rank_GEC.astype(jnp.int32))
  )
  position_GSE = position_GES.transpose(0, 2, 1)
  kept_GSE = (position_GSE < capacity) & real_GS[..., None]
  expert_index_GSE = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), (G, S, E))
  gates_GSE = jnp.where(kept_GSE, probs_GSE, 0.0)  # Zhou 2022: gate = score
  return Routing(expert_index_GSE, gates_GSE, position_GSE, kept_GSE, probs_GSE)


# ---------------------------------------------------------------------------
# Dense soft mixture (Jacobs et al. 1991).


def soft_mixture_route(
  logits_GSE: jax.Array,
  padding_mask_GS: jax.Array | None = None,
  softmax_dtype=jnp.float32,
) -> Routing:
  """The dense mixture of experts (Jacobs et al. 1991; equation numbers
  unverified), in the notation of Shazeer et al. 2017 Eqs. 1-2:

    y = sum_{e=1}^{E} G(x)_e FFN_e(x),   G(x) = Softmax(x W_g)

  Every expert processes every token (K = E, capacity C = S: nothing is
  dropped), weighted by the full softmax. It is the historical baseline of
  sparse MoE and the K = E limit of `ROUTERS["top_k"]`.
  """
  chex.assert_rank(logits_GSE, 3)
  _, S, E = logits_GSE.shape
  return route_tokens(
    logits_GSE,
    router="top_k",
    top_k=E,
    capacity=S,
    padding_mask_GS=padding_mask_GS,
    softmax_dtype=softmax_dtype,
  )


# ---------------------------------------------------------------------------
# Balanced assignment: S-BASE (Clark et al. 2022).


def sinkhorn(
  logits_GSE: jax.Array,
  padding_mask_GS: jax.Array | None = None,
  *,
  tolerance: float = 1e-4,
  max_iterations: int = 100,
) -> jax.Array:
  """Sinkhorn-normalises exp(z) to uniform marginals, per group (Clark et al.
  2022 S-BASE; paper details unverified, as coded in NVIDIA/Megatron-LM
  `megatron/core/transformer/moe/moe_utils.py` `sinkhorn`).

    cost = exp(z); d1 = 1; repeat
      d0_t = (1/T) / (sum_e cost_{t,e} d1_e + 1e-8)        (rows)
      d1_e = (1/E) / (sum_t d0_t cost_{t,e} + 1e-8)        (columns)
    until mean_e |d1 - d1_previous| < tolerance
    P_{t,e} = d0_t cost_{t,e} d1_e

  so every expert's column of P sums to 1/E exactly and every real token's
  row to 1/T up to the tolerance (T = real tokens of the group). Computed in
  float32 with no gradient (Megatron runs it under `torch.no_grad` on fp32
  logits). Two departures from Megatron: z - max_e z is exponentiated
  instead of z (a per-token scale that d0 absorbs, so the balanced P is the
  same, but exp cannot overflow and the 1e-8 guards stay negligible next to
  row sums >= 1), and the loop stops after `max_iterations` if the
  tolerance is not reached (Megatron loops until it is). Padded tokens get a
  zero row.

  Returns:
    float32 P `[G, S, E]`.
  """
  chex.assert_rank(logits_GSE, 3)
  G, S, E = logits_GSE.shape
  z_GSE = jax.lax.stop_gradient(logits_GSE.astype(jnp.float32))
  if padding_mask_GS is None:
    real_GS = jnp.ones((G, S), jnp.float32)
  else:
    chex.assert_shape(padding_mask_GS, (G, S))
    real_GS = padding_mask_GS.astype(jnp.float32)
  z_GSE = jnp.where(real_GS[..., None] > 0, z_GSE, 0.0)
  cost_GSE = jnp.exp(z_GSE - jnp.max(z_GSE, -1, keepdims=True))
  cost_GSE = cost_GSE * real_GS[..., None]
  num_real_G = jnp.sum(real_GS, axis=1)
  has_tokens_G = num_real_G > 0
  row_target_G1 = 1.0 / jnp.maximum(num_real_G, 1.0)[:, None]
  eps = 1e-8

  def scale(d1_GE):
    row_GS = jnp.einsum("gse,ge->gs", cost_GSE, d1_GE)
    d0_GS = row_target_G1 / (row_GS + eps)  # Megatron sinkhorn: d0
    col_GE = jnp.einsum("gs,gse->ge", d0_GS, cost_GSE)
    return d0_GS, (1.0 / E) / (col_GE + eps)  # Megatron sinkhorn: d1

  def not_done(state):
    i, _, _, error = state
    return (i < max_iterations) & (error > tolerance)

  def step(state):
    i, _, d1_GE, _ = state
    d0_GS, new_d1_GE = scale(d1_GE)
    error_G = jnp.mean(jnp.abs(new_d1_GE - d1_GE), axis=-1)
    error = jnp.max(jnp.where(has_tokens_G, error_G, 0.0))
    return i + 1, d0_GS, new_d1_GE, error

  init = (
    jnp.zeros((), jnp.int32),
    jnp.ones((G, S), jnp.float32),
    jnp.ones((G, E), jnp.float32),
    jnp.asarray(jnp.inf, jnp.float32),
  )
  _, d0_GS, d1_GE, _ = jax.lax.while_loop(not_done, step, init)
  return d0_GS[..., None] * cost_GSE * d1_GE[:, None, :]  # d1 * cost * d0


def sinkhorn_route(
  logits_GSE: jax.Array,
  *,
  top_k: int,
  capacity: int,
  balanced: bool,
  priority: str = "k_major",
  padding_mask_GS: jax.Array | None = None,
  tolerance: float = 1e-4,
  max_iterations: int = 100,
) -> Routing:
  """S-BASE routing (Clark et al. 2022; as coded in Megatron-LM
  `TopKRouter.sinkhorn_load_balancing`).

  Training (`balanced=True`): each token's K experts are the top K of the
  Sinkhorn-balanced `sinkhorn(z)`, which has no gradient. Evaluation
  (`balanced=False`): the top K of the unbalanced scores, greedily. Either
  way the gates are the unbalanced scores at the chosen experts:

    g = sigmoid(z_e)                   at K = 1
    g = softmax(z)_e over all E        at K > 1 (not renormalised over the K)

  which carry the router's only gradient. Capacity then applies as for any
  tokens-choose router (`route_choices`; Megatron is dropless by default, so
  use a large capacity factor to match it). Training is NOT CAUSAL: the
  balancing couples all tokens of the group, later ones included.
  """
  chex.assert_rank(logits_GSE, 3)
  num_experts = logits_GSE.shape[-1]
  if not 1 <= top_k <= num_experts:
    raise ValueError(
      f"top_k={top_k} must be between 1 and num_experts={num_experts}."
    )
  z_GSE = logits_GSE.astype(jnp.float32)
  if top_k == 1:
    scores_GSE = jax.nn.sigmoid(z_GSE)  # Megatron: sigmoid at k = 1
  else:
    scores_GSE = jax.nn.softmax(z_GSE, axis=-1)  # Megatron: softmax at k > 1
  if balanced:
    select_GSE = sinkhorn(
      z_GSE,
      padding_mask_GS,
      tolerance=tolerance,
      max_iterations=max_iterations,
    )
  else:
    select_GSE = scores_GSE
  _, expert_index_GSK = jax.lax.top_k(select_GSE, top_k)  # Megatron: topk
  gates_GSK = jnp.take_along_axis(scores_GSE, expert_index_GSK, axis=-1)
  return route_choices(
    expert_index_GSK,
    gates_GSK,
    router_probabilities(z_GSE),
    capacity=capacity,
    priority=priority,
    padding_mask_GS=padding_mask_GS,
  )


# ---------------------------------------------------------------------------
# Non-learned baselines: hash and random routing.


def hash_scores(token_ids_GS: jax.Array, num_experts: int, seed: int):
  """u[t, e] ~ U(0, 1) from a key fixed by (seed, token id): a fixed random
  table token id -> E scores, computed on the fly instead of stored (so no
  vocabulary size is needed). Same id, same scores, in every group and step.
  """
  key = jax.random.key(seed)
  ids_N = token_ids_GS.reshape(-1).astype(jnp.int32)
  scores_NE = jax.vmap(
    lambda i: jax.random.uniform(jax.random.fold_in(key, i), (num_experts,))
  )(ids_N)
  return scores_NE.reshape(*token_ids_GS.shape, num_experts)


def fixed_choice_route(
  scores_GSE: jax.Array,
  probs_GSE: jax.Array,
  *,
  top_k: int,
  capacity: int,
  priority: str = "k_major",
  padding_mask_GS: jax.Array | None = None,
) -> Routing:
  """Routing that no router learns: each token's K experts are the top K of
  `scores_GSE` (random numbers), each with gate 1/K (1 at K = 1, as in hash
  layers: y = FFN_{h(x)}(x)). Nothing here has a gradient and no balancing
  loss applies. `probs_GSE` is the distribution the experts were drawn from
  (for the metrics)."""
  chex.assert_equal_shape([scores_GSE, probs_GSE])
  _, expert_index_GSK = jax.lax.top_k(jax.lax.stop_gradient(scores_GSE), top_k)
  gates_GSK = jnp.full(expert_index_GSK.shape, 1.0 / top_k, jnp.float32)
  return route_choices(
    expert_index_GSK,
    gates_GSK,
    probs_GSE,
    capacity=capacity,
    priority=priority,
    padding_mask_GS=padding_mask_GS,
  )


def hash_route(
  token_ids_GS: jax.Array,
  num_experts: int,
  *,
  top_k: int,
  capacity: int,
  seed: int = 0,
  priority: str = "k_major",
  padding_mask_GS: jax.Array | None = None,
) -> Routing:
  """Hash routing (Roller et al. 2021; unverified): expert = h(token id)
  from a fixed seeded random map (`hash_scores`; at K > 1, the K distinct
  experts with the largest hashed scores). No router parameters, no
  gradient, no auxiliary loss; probs_GSE is 1/K on the chosen experts."""
  scores_GSE = hash_scores(token_ids_GS, num_experts, seed)
  _, chosen_GSK = jax.lax.top_k(scores_GSE, top_k)
  probs_GSE = jnp.sum(jax.nn.one_hot(chosen_GSK, num_experts), axis=2) / top_k
  return fixed_choice_route(
    scores_GSE,
    probs_GSE,
    top_k=top_k,
    capacity=capacity,
    priority=priority,
    padding_mask_GS=padding_mask_GS,
  )


def random_route(
  rng: jax.Array,
  num_experts: int,
  *,
  top_k: int,
  capacity: int,
  padding_mask_GS: jax.Array,
  priority: str = "k_major",
) -> Routing:
  """Uniform random routing: each token's K distinct experts drawn
  uniformly from `rng` (the layer passes a fresh key each training step and
  a fixed seeded key at evaluation). probs_GSE is the uniform 1/E."""
  G, S = padding_mask_GS.shape
  scores_GSE = jax.random.uniform(rng, (G, S, num_experts))
  probs_GSE = jnp.full((G, S, num_experts), 1.0 / num_experts, jnp.float32)
  return fixed_choice_route(
    scores_GSE,
    probs_GSE,
    top_k=top_k,
    capacity=capacity,
    priority=priority,
    padding_mask_GS=padding_mask_GS,
  )


# ---------------------------------------------------------------------------
# Every router the MoE layer can use.


@dataclasses.dataclass(frozen=True)
class RoutingScheme:
  """What the MoE layer must know about a router besides its math.

  Attributes:
    family: which routing function the layer calls ("tokens_choose" for the
      gate conventions of `ROUTERS`).
    learned: has router weights W_g, so the router options (jitter, float32,
      init scale, bias) and the router z-loss apply.
    causal: usable in a decoder. False: a token's routing in training can
      depend on later tokens of its group, and `MoeConfig` refuses the
      router unless `allow_noncausal=True`.
  """

  family: str
  learned: bool = True
  causal: bool = True


ROUTING_SCHEMES = {
  **{name: RoutingScheme("tokens_choose") for name in ROUTERS},
  "noisy_top_k": RoutingScheme("noisy_top_k"),
  "vmoe": RoutingScheme("vmoe"),
  "expert_choice": RoutingScheme("expert_choice", causal=False),
  "soft_mixture": RoutingScheme("soft_mixture"),
  "sinkhorn": RoutingScheme("sinkhorn", causal=False),
  # DeepSeek-V3: sigmoid scores, bias-balanced selection (moe_jax.deepseek).
  "deepseek": RoutingScheme("deepseek"),
  "hash": RoutingScheme("hash", learned=False),
  "random": RoutingScheme("random", learned=False),
}


def routing_scheme(router: str, top_k: int, num_experts: int) -> RoutingScheme:
  """Looks up `router` in `ROUTING_SCHEMES` and checks `top_k` against it."""
  if router not in ROUTING_SCHEMES:
    raise ValueError(
      f"unknown router={router!r}; allowed: {sorted(ROUTING_SCHEMES)}."
    )
  scheme = ROUTING_SCHEMES[router]
  if scheme.family == "tokens_choose":
    gate_convention(router, top_k, num_experts)
  elif scheme.family == "soft_mixture" and top_k != num_experts:
    raise ValueError(
      f"router='soft_mixture' sends every token to every expert: set "
      f"top_k=num_experts={num_experts}, got top_k={top_k}."
    )
  elif not 1 <= top_k <= num_experts:
    raise ValueError(
      f"top_k={top_k} must be between 1 and num_experts={num_experts}."
    )
  return scheme
