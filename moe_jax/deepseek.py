"""DeepSeek-V3 routing as pure functions: sigmoid affinities, selection by
biased scores within the best expert groups, normalised gates, and the
auxiliary-loss-free bias update.

Shapes (see `moe_jax.shapes`): logits `[G, S, E]`, choices `[G, S, K]`,
the bias `[E]`. DeepSeek-V3 (DeepSeek-AI 2024, arXiv 2412.19437) §2.1.2,
with N_r = E routed experts and K_r = K chosen per token:

  s_{i,t}  = Sigmoid(u_t^T e_i)                                     (Eq. 15)
  chosen_t = TopK({s_{j,t} + b_j}, K_r) within the kept expert groups (16)
  g_{i,t}  = s_{i,t} / sum_{j in chosen_t} s_{j,t}          (Eqs. 13-14, 16)
             times `routed_scaling_factor` (DeepSeek-V3's released config:
             2.5 for its 256 experts; 1.0 here by default)

The bias b only selects, it never weights: the gate uses the unbiased s, so
b gets no task gradient. It is not a parameter either: after each training
step every MoE layer moves its own b by a fixed step u against the load of
that step's batch (`bias_update`; Wang et al. 2024, "Auxiliary-Loss-Free
Load Balancing Strategy for Mixture-of-Experts", Alg. 1). The trainer keeps
b outside the optimizer, in `TrainState.router_state`.

Group-limited ("node-limited", §2.1.2) routing: the E experts form
`num_groups` equal groups of consecutive experts; a group scores the sum of
its `group_score_k` largest biased scores s + b; each token keeps its
`top_groups` best groups and chooses its K experts among theirs only. The
paper's text scores a node by "the sum of the highest K_r/M affinity
scores" (M = top_groups); DeepSeek-V3's code uses the top 2, the same for
its K_r = 8, M = 4. `group_score_k` defaults to 2 (the code); set it to
K / top_groups for the text's rule.

Routing is per token (causal): no token's choice depends on another's,
except through capacity, as for every tokens-choose router. DeepSeek-V3 is
dropless, and so are its configs here (`dispatch="dropless"`); with a
capacity backend (`"indices"`, `"einsum"`, needed on a device mesh) the
usual capacity and drop order apply (`routing.route_choices`).
"""

import chex
import jax
import jax.numpy as jnp

from moe_jax import routing


def sigmoid_scores(logits_GSE: jax.Array) -> jax.Array:
  """s = Sigmoid(z), the token-to-expert affinities, in float32 (Eq. 15)."""
  return jax.nn.sigmoid(logits_GSE.astype(jnp.float32))  # V3 Eq. 15


def normalized_scores(scores_GSE: jax.Array) -> jax.Array:
  """s'_{i,t} = s_{i,t} / sum_j s_{j,t} (DeepSeek-V3 Eq. 19): a distribution
  over the experts, used for the balance loss and the routing metrics."""
  return scores_GSE / jnp.sum(scores_GSE, axis=-1, keepdims=True)  # Eq. 19


def check_expert_groups(
  num_experts: int,
  top_k: int,
  num_groups: int,
  top_groups: int,
  group_score_k: int,
) -> None:
  """Raises ValueError unless the group-limited routing is well defined:
  `num_groups` divides E, 1 <= top_groups <= num_groups, the kept groups
  hold at least K experts, and 1 <= group_score_k <= experts per group."""
  if num_groups < 1 or num_experts % num_groups:
    raise ValueError(
      f"num_expert_groups={num_groups} must be >= 1 and divide "
      f"num_experts={num_experts}."
    )
  if not 1 <= top_groups <= num_groups:
    raise ValueError(
      f"top_expert_groups={top_groups} must be between 1 and "
      f"num_expert_groups={num_groups}."
    )
  per_group = num_experts // num_groups
  if top_groups * per_group < top_k:
    raise ValueError(
      f"top_k={top_k} exceeds the {top_groups * per_group} experts of the "
      f"top_expert_groups={top_groups} kept groups of {per_group} experts; "
      "keep more groups or lower top_k."
    )
  if num_groups > 1 and not 1 <= group_score_k <= per_group:
    raise ValueError(
      f"expert_group_score_k={group_score_k} must be between 1 and the "
      f"{per_group} experts per group."
    )


def group_limited_scores(
  select_GSE: jax.Array, num_groups: int, top_groups: int, group_score_k: int
) -> jax.Array:
  """`select_GSE` with the experts outside each token's `top_groups` best
  expert groups set to -inf (DeepSeek-V3 §2.1.2, node-limited routing).

  Group score = sum of the group's `group_score_k` largest entries of
  `select_GSE` (the biased scores s + b); ties between groups go to the
  lower group index. With num_groups = 1 nothing is masked.
  """
  chex.assert_rank(select_GSE, 3)
  G, S, E = select_GSE.shape
  if num_groups == 1:
    return select_GSE
  select_GSNM = select_GSE.reshape(G, S, num_groups, E // num_groups)
  best_GSNk, _ = jax.lax.top_k(select_GSNM, group_score_k)
  group_score_GSN = jnp.sum(best_GSNk, axis=-1)  # V3 §2.1.2: top scores
  kept_group_GSk = routing.top_k_indices(group_score_GSN, top_groups)
  kept_GSN = jnp.any(
    kept_group_GSk[..., None] == jnp.arange(num_groups), axis=-2
  )
  kept_GSE = jnp.repeat(kept_GSN, E // num_groups, axis=-1)
  return jnp.where(kept_GSE, select_GSE, -jnp.inf)


def select_experts(
  scores_GSE: jax.Array,
  bias_E: jax.Array,
  top_k: int,
  *,
  num_groups: int = 1,
  top_groups: int = 1,
  group_score_k: int = 2,
) -> jax.Array:
  """The K experts of each token: TopK(s + b) within its kept expert groups
  (DeepSeek-V3 Eq. 16), in rank order of s + b (ties: lower index first).

  Returns:
    int32 expert_index_GSK.
  """
  chex.assert_rank(scores_GSE, 3)
  chex.assert_shape(bias_E, scores_GSE.shape[-1:])
  select_GSE = scores_GSE + jax.lax.stop_gradient(bias_E)  # V3 Eq. 16: s + b
  select_GSE = group_limited_scores(
    select_GSE, num_groups, top_groups, group_score_k
  )
  return routing.top_k_indices(select_GSE, top_k).astype(jnp.int32)


def normalized_gates(
  scores_GSE: jax.Array,
  expert_index_GSK: jax.Array,
  routed_scaling_factor: float = 1.0,
) -> jax.Array:
  """g = scale * s_i / sum_{j chosen} s_j over the chosen experts, from the
  UNBIASED scores (DeepSeek-V3 Eqs. 13-14 and 16; scale: DeepSeek-V3's
  `routed_scaling_factor`). Sums to `routed_scaling_factor` per token."""
  chosen_GSK = jnp.take_along_axis(scores_GSE, expert_index_GSK, axis=-1)
  gates_GSK = chosen_GSK / jnp.sum(chosen_GSK, -1, keepdims=True)  # Eq. 13
  return routed_scaling_factor * gates_GSK  # V3 code: routed_scaling_factor


def deepseek_route(
  logits_GSE: jax.Array,
  bias_E: jax.Array,
  *,
  top_k: int,
  capacity: int,
  num_groups: int = 1,
  top_groups: int = 1,
  group_score_k: int = 2,
  routed_scaling_factor: float = 1.0,
  priority: str = "k_major",
  padding_mask_GS: jax.Array | None = None,
) -> tuple[routing.Routing, jax.Array]:
  """DeepSeek-V3 routing of groups of tokens, with capacity (see the module
  docstring for the equations).

  Args:
    logits_GSE: router logits z = u_t^T e_i.
    bias_E: the load-balancing bias b (selection only).
    top_k: K_r.
    capacity: C slots per expert per group (a large capacity factor is
      the closest to the paper's dropless routing).
    num_groups, top_groups, group_score_k: group-limited routing, see
      `group_limited_scores` (1 group: plain top-K).
    routed_scaling_factor: multiplies the normalised gates.
    priority: drop-priority order, see `routing.assign_slots`.
    padding_mask_GS: 1/True for real tokens.

  Returns:
    The `Routing` (its probs_GSE is s' of Eq. 19), and the choices that the
    same rule would make with b = 0 (int32 `[G, S, K]`, for MaxVio before
    the bias).
  """
  chex.assert_rank(logits_GSE, 3)
  check_expert_groups(
    logits_GSE.shape[-1], top_k, num_groups, top_groups, group_score_k
  )
  scores_GSE = sigmoid_scores(logits_GSE)
  groups = dict(
    num_groups=num_groups, top_groups=top_groups, group_score_k=group_score_k
  )
  expert_index_GSK = select_experts(scores_GSE, bias_E, top_k, **groups)
  unbiased_index_GSK = select_experts(
    scores_GSE, jnp.zeros_like(bias_E), top_k, **groups
  )
  gates_GSK = normalized_gates(
    scores_GSE, expert_index_GSK, routed_scaling_factor
  )
  route = routing.route_choices(
    expert_index_GSK,
    gates_GSK,
    normalized_scores(scores_GSE),
    capacity=capacity,
    priority=priority,
    padding_mask_GS=padding_mask_GS,
  )
  return route, unbiased_index_GSK


def expert_load(
  expert_index_GSK: jax.Array,
  num_experts: int,
  padding_mask_GS: jax.Array | None = None,
) -> jax.Array:
  """c_i: how many of the batch's real (token, choice) pairs chose expert i,
  over all groups, before capacity (float32 `[E]`)."""
  G, S, _ = expert_index_GSK.shape
  if padding_mask_GS is None:
    padding_mask_GS = jnp.ones((G, S), bool)
  onehot_GSKE = jax.nn.one_hot(expert_index_GSK, num_experts)
  return jnp.einsum(
    "gske,gs->e", onehot_GSKE, padding_mask_GS.astype(jnp.float32)
  )


def bias_update(bias_E: jax.Array, load_E: jax.Array, rate: float):
  """One step of loss-free balancing (Wang et al. 2024, Alg. 1; DeepSeek-V3
  §2.1.2, "bias update speed" gamma):

    e_i = mean_j c_j - c_i,     b_i <- b_i + u * sign(e_i)

  An overloaded expert's bias drops by u, an underloaded one's rises by u,
  one exactly at the mean keeps it. No gradient flows through the update.
  """
  chex.assert_equal_shape([bias_E, load_E])
  load_E = jax.lax.stop_gradient(load_E)
  error_E = jnp.mean(load_E) - load_E  # Wang 2024 Alg. 1: e_i
  return bias_E + rate * jnp.sign(error_E)  # Wang 2024 Alg. 1: b_i update


def max_violation(load_E: jax.Array) -> jax.Array:
  """MaxVio = (max_i c_i - mean_i c_i) / mean_i c_i (Wang et al. 2024,
  Eq. 4); 0 is perfect balance."""
  mean = jnp.mean(load_E)
  return (jnp.max(load_E) - mean) / jnp.maximum(mean, 1e-9)  # Wang Eq. 4
