"""Moving tokens to the experts and back, as pure functions.

Shapes (see `moe_jax.shapes`): tokens `[G, S, D]`, expert buffers
`[E, G, C, D]` (GShard Alg. 2: "dispatched_expert_inputs[E, G, C, M]"),
rows sorted by expert `[N, D]` with N = G*S*K.

Three backends give the same result from the same `routing.Routing`:

- einsum (GShard §2.2, Switch): build one-hot `dispatch_GSEC` and weighted
  `combine_GSEC` tensors and contract them with the tokens. Faithful to the
  papers and friendly to TPUs, but O(G*S*E*C) memory and time: C grows with
  S, so this is quadratic in the group size.
- indices: copy each kept (token, choice) pair's token into its slot
  (e, g, position) of the expert buffers and read it back. Memory
  O(G*S*K*D) besides the buffers; no `[.., E, C]` one-hots.
- dropless: sort the kept pairs by expert (MegaBlocks, Gale et al.
  2023; "dropless" in MaxText and Megatron-LM) into rows `[N, D]` for a
  grouped matmul (`moe_jax.grouped_matmul`), and read them back. No
  capacity and no buffers: with a routing of capacity S nothing is dropped.

The index and sorted backends move rows with `gather_rows`, whose gradient
is again a gather: no floating-point scatter-add, so forward and backward
passes are deterministic. The combine is a gather followed by a weighted
sum over K in a fixed order. In every backend a dropped pair contributes
exactly zero, and an empty slot holds a zero vector.
"""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from moe_jax.routing import Routing

DISPATCHERS = ("einsum", "indices", "dropless")


def dispatch_and_combine_tensors(
  routing: Routing, num_experts: int, capacity: int
) -> tuple[jax.Array, jax.Array]:
  """One-hot dispatch_GSEC (0/1) and combine_GSEC (gate at the pair's slot).

  dispatch[g, s, e, c] = 1 iff token s of group g sits in slot c of expert e;
  combine = dispatch * g (GShard Alg. 1, lines 14-16).
  """
  kept_GSK = routing.kept_GSK.astype(jnp.float32)
  expert_GSKE = jax.nn.one_hot(routing.expert_index_GSK, num_experts)
  # A dropped pair's position may be >= C; one_hot maps it to all zeros.
  slot_GSKC = (
    jax.nn.one_hot(routing.position_GSK, capacity) * kept_GSK[..., None]
  )
  dispatch_GSEC = jnp.einsum("gske,gskc->gsec", expert_GSKE, slot_GSKC)
  combine_GSEC = jnp.einsum(
    "gske,gskc,gsk->gsec", expert_GSKE, slot_GSKC, routing.gates_GSK
  )
  return dispatch_GSEC, combine_GSEC


def einsum_dispatch(x_GSD: jax.Array, dispatch_GSEC: jax.Array) -> jax.Array:
  """x_EGCD[e, g, c] = the token in slot c of expert e (GShard Alg. 2)."""
  return jnp.einsum("gsec,gsd->egcd", dispatch_GSEC.astype(x_GSD.dtype), x_GSD)


def einsum_combine(y_EGCD: jax.Array, combine_GSEC: jax.Array) -> jax.Array:
  """y_GSD[g, s] = sum_{e,c} combine[g, s, e, c] * y_EGCD[e, g, c]."""
  return jnp.einsum("gsec,egcd->gsd", combine_GSEC.astype(y_EGCD.dtype), y_EGCD)


# ---------------------------------------------------------------------------
# Row gathers whose gradient is a gather.


def _take_rows(x_XD, index_Y):
  """x[index], with a zero row wherever the index is out of range."""
  if x_XD.shape[0] == 0:  # capacity 0: every index is out of range
    return jnp.zeros(index_Y.shape + x_XD.shape[1:], x_XD.dtype)
  return jnp.take(x_XD, index_Y, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def gather_rows(x_XD, index_Y, copies_XJ):
  """y[i] = x[index[i]] (zero where index[i] is out of range).

  X, Y and J are any sizes: rows of x, entries of the index (which may have
  several axes; i counts them in row-major order), copies per row of x.
  `copies_XJ[r]` must list every i with index[i] = r (padded with out-of-
  range values); then the gradient dx[r] = sum_j dy[copies[r, j]] is a
  gather and a sum over J in a fixed order, where autodiff of a plain gather
  would scatter-add (order-dependent on GPUs when J > 1; REFERENCE (i)).
  """
  del copies_XJ
  return _take_rows(x_XD, index_Y)


def _gather_rows_forward(x_XD, index_Y, copies_XJ):
  return _take_rows(x_XD, index_Y), copies_XJ


def _gather_rows_backward(copies_XJ, dy_YD):
  dy_YD = dy_YD.reshape(-1, dy_YD.shape[-1])
  dx_XD = jnp.sum(_take_rows(dy_YD, copies_XJ), axis=1)
  return dx_XD, None, None


gather_rows.defvjp(_gather_rows_forward, _gather_rows_backward)


def _inverse(index_Y, num_rows: int):
  """r -> the i with index[i] = r, or Y; `index` is one-to-one where it is
  in range (the rest are dropped). A scatter of distinct integers."""
  (Y,) = index_Y.shape
  return (
    jnp.full((num_rows,), Y, jnp.int32)
    .at[index_Y]
    .set(jnp.arange(Y, dtype=jnp.int32), mode="drop")
  )


# ---------------------------------------------------------------------------
# Index dispatch: expert buffers filled by gathers.


def _slot_index_GSK(routing: Routing, num_experts: int, capacity: int):
  """Slot e*C + position of each pair in its group's `[E, C]` buffers;
  E*C (past the end) if dropped."""
  slot_GSK = routing.expert_index_GSK * capacity + routing.position_GSK
  return jnp.where(routing.kept_GSK, slot_GSK, num_experts * capacity)


# Both directions work group by group (vmap over G): no index crosses a
# group, so when G is split over devices GSPMD keeps the gathers local.


def index_dispatch(
  x_GSD: jax.Array, routing: Routing, num_experts: int, capacity: int
) -> jax.Array:
  """Copies each kept pair's token into its slot; returns x_EGCD."""
  chex.assert_rank(x_GSD, 3)
  G, S, D = x_GSD.shape
  E, C = num_experts, capacity
  slot_GSK = _slot_index_GSK(routing, E, C)
  K = slot_GSK.shape[-1]

  def one_group(x_SD, slot_SK):
    # The token s in each slot; S (a zero row) if the slot is empty.
    token_X = _inverse(slot_SK.reshape(-1), E * C) // K
    return gather_rows(x_SD, token_X, slot_SK)

  x_GXD = jax.vmap(one_group)(x_GSD, slot_GSK)
  return x_GXD.reshape(G, E, C, D).transpose(1, 0, 2, 3)


def index_combine(
  y_EGCD: jax.Array, routing: Routing, num_experts: int, capacity: int
) -> jax.Array:
  """Gathers each pair's expert output, weights it by its gate, sums over K."""
  chex.assert_rank(y_EGCD, 4)
  E, G, C, D = y_EGCD.shape
  chex.assert_equal((E, C), (num_experts, capacity))
  slot_GSK = _slot_index_GSK(routing, E, C)
  y_GXD = y_EGCD.transpose(1, 0, 2, 3).reshape(G, E * C, D)

  def one_group(y_XD, slot_SK):
    pair_X1 = _inverse(slot_SK.reshape(-1), E * C)[:, None]
    return gather_rows(y_XD, slot_SK, pair_X1)

  y_GSKD = jax.vmap(one_group)(y_GXD, slot_GSK)
  return _weighted_sum_over_choices(y_GSKD, routing.gates_GSK)


def _weighted_sum_over_choices(y_GSKD, gates_GSK):
  """y_GSD[g, s] = sum_k gates[g, s, k] y[g, s, k], k in a fixed order."""
  gates_GSK = gates_GSK.astype(y_GSKD.dtype)
  return jnp.sum(y_GSKD * gates_GSK[..., None], axis=2)


# ---------------------------------------------------------------------------
# Dropless dispatch: pairs sorted by expert, for a grouped matmul.


class SortedRouting(NamedTuple):
  """The kept (token, choice) pairs in expert order.

  Attributes:
    pair_N: int32, the flat pair (g*S + s)*K + k in row n, expert by expert
      (stable: pairs of one expert stay in token order); N = G*S*K (no row)
      for the rows past the kept pairs.
    row_GSK: int32, the row of each pair; N where the pair is not kept.
    group_sizes_E: int32, rows per expert.
  """

  pair_N: jax.Array
  row_GSK: jax.Array
  group_sizes_E: jax.Array


def sort_by_expert(routing: Routing, num_experts: int) -> SortedRouting:
  """Sorts the kept pairs by expert, the rest last (a stable argsort, so
  the order is deterministic)."""
  G, S, K = routing.expert_index_GSK.shape
  N = G * S * K
  kept_N = routing.kept_GSK.reshape(N)
  expert_N = jnp.where(kept_N, routing.expert_index_GSK.reshape(N), num_experts)
  pair_N = jnp.argsort(expert_N, stable=True).astype(jnp.int32)
  num_kept = jnp.sum(kept_N, dtype=jnp.int32)
  pair_N = jnp.where(jnp.arange(N) < num_kept, pair_N, N)
  row_GSK = _inverse(pair_N, N).reshape(G, S, K)
  group_sizes_E = jnp.bincount(expert_N, length=num_experts + 1)[:-1]
  return SortedRouting(pair_N, row_GSK, group_sizes_E.astype(jnp.int32))


def dropless_dispatch(x_GSD: jax.Array, sorted_: SortedRouting) -> jax.Array:
  """x_ND[n] = the token of the pair in row n (zero past the kept pairs)."""
  chex.assert_rank(x_GSD, 3)
  G, S, D = x_GSD.shape
  K = sorted_.row_GSK.shape[-1]
  token_N = sorted_.pair_N // K  # N // K = G*S: no token
  return gather_rows(
    x_GSD.reshape(G * S, D), token_N, sorted_.row_GSK.reshape(G * S, K)
  )


def dropless_combine(
  y_ND: jax.Array, routing: Routing, sorted_: SortedRouting
) -> jax.Array:
  """y_GSD[g, s] = sum_k gates[g, s, k] y_ND[row of (g, s, k)]."""
  chex.assert_rank(y_ND, 2)
  y_GSKD = gather_rows(y_ND, sorted_.row_GSK, sorted_.pair_N[:, None])
  return _weighted_sum_over_choices(y_GSKD, routing.gates_GSK)


# ---------------------------------------------------------------------------
# One entry point per direction.


def dispatch(x_GSD, routing, num_experts, capacity, backend):
  """Tokens to the experts through `backend` (one of `DISPATCHERS`).

  Returns:
    (x_EGCD, combine_GSEC) for "einsum", (x_EGCD, None) for "indices" and
    (x_ND, SortedRouting) for "dropless"; the second element is what
    `combine` needs besides the routing.
  """
  if backend == "einsum":
    dispatch_GSEC, combine_GSEC = dispatch_and_combine_tensors(
      routing, num_experts, capacity
    )
    return einsum_dispatch(x_GSD, dispatch_GSEC), combine_GSEC
  if backend == "indices":
    return index_dispatch(x_GSD, routing, num_experts, capacity), None
  if backend == "dropless":
    sorted_ = sort_by_expert(routing, num_experts)
    return dropless_dispatch(x_GSD, sorted_), sorted_
  raise ValueError(
    f"unknown dispatch={backend!r}; allowed: {list(DISPATCHERS)}."
  )


def combine(y, routing, num_experts, capacity, backend, context=None):
  """y_GSD from the expert outputs (y_EGCD, or y_ND for "dropless"), the
  inverse of `dispatch`; `context` is the second value it returned."""
  if backend == "einsum":
    return einsum_combine(y, context)
  if backend == "indices":
    return index_combine(y, routing, num_experts, capacity)
  if backend == "dropless":
    return dropless_combine(y, routing, context)
  raise ValueError(
    f"unknown dispatch={backend!r}; allowed: {list(DISPATCHERS)}."
  )
