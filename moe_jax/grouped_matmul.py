"""Grouped matrix multiplication: the expert FFNs of a dropless MoE layer.

Shapes (see `moe_jax.shapes`): rows `[N, D]` sorted by expert, weights
`[E, D, F]`, group sizes `[E]`, row tiles `[I]`. D and F stand for whatever
the matmul contracts and produces (D -> F for the first layer, F -> D for
the second).

out[n] = lhs[n] @ rhs[e(n)], where rows group_starts[e] .. group_ends[e] - 1
belong to expert e (group_ends = cumsum(group_sizes)); rows past
sum(group_sizes) get 0. This is `jax.lax.ragged_dot`, the grouped GEMM of
MegaBlocks (Gale et al. 2023, §5) and of MaxText's and Megatron-LM's
dropless MoE layers. Two implementations give the same result:

- "ragged_dot": `jax.lax.ragged_dot`. GPUs and TPUs lower it to a native
  grouped kernel. The CPU lowering builds a dense `[E, N, D]` masked copy of
  the rows and contracts it with every expert, so it costs E times the dense
  work: fine on an accelerator, slow on a CPU.
- "tiles": the rows are cut into tiles of `tile_size` rows that never mix
  experts (each expert's last tile runs past its group end), and one
  `fori_loop` runs exactly the tiles in use, each a `[tile, D] @ [D, F]`
  matmul with its expert's weights. The work is the useful work plus at most
  `tile_size - 1` rows per expert, whatever E; no Python loop over experts.
  The backward pass is the same loop: d lhs = grouped_matmul(d out, rhs^T),
  and d rhs[e] = sum over e's tiles of lhs_tile^T d out_tile, accumulated in
  float32 in tile order (deterministic).

`implementation="auto"` picks "ragged_dot" on GPU and TPU and "tiles" on CPU.
"""

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ("auto", "tiles", "ragged_dot")


def resolve_implementation(implementation: str) -> str:
  """ "auto" -> "ragged_dot" where the backend has a native kernel, else
  "tiles"; any other allowed name is returned unchanged."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"unknown grouped_matmul={implementation!r}; allowed: "
      f"{list(IMPLEMENTATIONS)}."
    )
  if implementation == "auto":
    native = jax.default_backend() in ("gpu", "tpu")
    return "ragged_dot" if native else "tiles"
  return implementation


def default_tile_size(num_rows: int, num_experts: int) -> int:
  """Rows per tile: a power of two near 1/8 of the mean group size, in
  [8, 128].

  Each expert's last tile is on average half empty, so the padded work is
  about E * tile / 2 rows, here about 1/16 of the N rows; 128 rows already
  keep a CPU matmul efficient, and below 8 the loop overhead dominates.
  """
  target = max(num_rows // (8 * max(num_experts, 1)), 1)
  return int(min(max(1 << (target.bit_length() - 1), 8), 128))


class TileSchedule(NamedTuple):
  """Which rows each tile covers, for tiles i < num_tiles (the rest unused).

  Attributes:
    expert_I: int32, the expert whose weights tile i uses.
    start_I: int32, the tile's first row.
    end_I: int32, one past the last row of the tile's expert.
    num_tiles: int32 scalar, the tiles in use, sum_e ceil(n_e / tile).
    num_grouped: int32 scalar, the rows in some group, sum_e n_e.
  """

  expert_I: jax.Array
  start_I: jax.Array
  end_I: jax.Array
  num_tiles: jax.Array
  num_grouped: jax.Array


def tile_schedule(group_sizes_E, num_rows: int, tile_size: int) -> TileSchedule:
  """Cuts each expert's rows into tiles; a static I = ceil(N / tile) + E
  tiles bounds sum_e ceil(n_e / tile) for any group sizes summing to <= N."""
  chex.assert_rank(group_sizes_E, 1)
  E = group_sizes_E.shape[0]
  group_sizes_E = group_sizes_E.astype(jnp.int32)
  tiles_E = (group_sizes_E + tile_size - 1) // tile_size
  tile_end_E = jnp.cumsum(tiles_E)
  group_end_E = jnp.cumsum(group_sizes_E)
  num_tiles_max = -(-num_rows // tile_size) + E
  tile_I = jnp.arange(num_tiles_max, dtype=jnp.int32)
  # Tile i belongs to the first expert whose tiles end after i.
  expert_I = jnp.searchsorted(tile_end_E, tile_I, side="right")
  expert_I = jnp.minimum(expert_I, E - 1).astype(jnp.int32)
  first_tile_I = tile_end_E[expert_I] - tiles_E[expert_I]
  group_start_I = group_end_E[expert_I] - group_sizes_E[expert_I]
  start_I = group_start_I + (tile_I - first_tile_I) * tile_size
  return TileSchedule(
    expert_I, start_I, group_end_E[expert_I], tile_end_E[-1], group_end_E[-1]
  )


def _tiles_matmul(lhs_ND, rhs_EDF, schedule, tile_size, transpose_rhs):
  """out[n] = lhs[n] @ rhs[e(n)] (or @ rhs[e(n)]^T), tile by tile.

  A tile may run past its expert's rows into the next expert's; those rows
  get values computed with the wrong weights, but the tiles run in row order
  and the next expert's own tiles overwrite them. Rows past the last group
  are set to zero at the end.
  """
  N, D = lhs_ND.shape
  F = rhs_EDF.shape[1] if transpose_rhs else rhs_EDF.shape[2]
  contract = (1,) if transpose_rhs else (0,)
  # T spare zero rows, so that a tile starting at row N - 1 fits.
  lhs_ND = jnp.pad(lhs_ND, ((0, tile_size), (0, 0)))

  def run_tile(i, out_NF):
    rows_TD = lax.dynamic_slice_in_dim(lhs_ND, schedule.start_I[i], tile_size)
    w_DF = rhs_EDF[schedule.expert_I[i]]
    out_TF = lax.dot_general(rows_TD, w_DF, (((1,), contract), ((), ())))
    return lax.dynamic_update_slice_in_dim(
      out_NF, out_TF.astype(out_NF.dtype), schedule.start_I[i], 0
    )

  out_NF = jnp.zeros((N + tile_size, F), lhs_ND.dtype)
  out_NF = lax.fori_loop(0, schedule.num_tiles, run_tile, out_NF)[:N]
  in_group_N = jnp.arange(N) < schedule.num_grouped
  return jnp.where(in_group_N[:, None], out_NF, 0)


def _tiles_weight_gradient(lhs_ND, dout_NF, schedule, num_experts, tile_size):
  """d rhs[e] = sum_{n in group e} lhs[n]^T dout[n], in float32, tile by
  tile in row order (deterministic); rows past the group end are masked."""
  N, D = lhs_ND.shape
  F = dout_NF.shape[1]
  lhs_ND = jnp.pad(lhs_ND, ((0, tile_size), (0, 0)))
  dout_NF = jnp.pad(dout_NF, ((0, tile_size), (0, 0)))

  def run_tile(i, drhs_EDF):
    start = schedule.start_I[i]
    in_group_T = start + jnp.arange(tile_size) < schedule.end_I[i]
    rows_TD = lax.dynamic_slice_in_dim(lhs_ND, start, tile_size)
    rows_TD = jnp.where(in_group_T[:, None], rows_TD, 0)
    dout_TF = lax.dynamic_slice_in_dim(dout_NF, start, tile_size)
    drhs_DF = lax.dot_general(
      rows_TD,
      dout_TF,
      (((0,), (0,)), ((), ())),
      preferred_element_type=jnp.float32,
    )
    return drhs_EDF.at[schedule.expert_I[i]].add(drhs_DF)

  drhs_EDF = jnp.zeros((num_experts, D, F), jnp.float32)
  return lax.fori_loop(0, schedule.num_tiles, run_tile, drhs_EDF)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiles_grouped_matmul(lhs_ND, rhs_EDF, group_sizes_E, tile_size):
  schedule = tile_schedule(group_sizes_E, lhs_ND.shape[0], tile_size)
  return _tiles_matmul(lhs_ND, rhs_EDF, schedule, tile_size, False)


def _tiles_forward(lhs_ND, rhs_EDF, group_sizes_E, tile_size):
  out_NF = _tiles_grouped_matmul(lhs_ND, rhs_EDF, group_sizes_E, tile_size)
  return out_NF, (lhs_ND, rhs_EDF, group_sizes_E)


def _tiles_backward(tile_size, residuals, dout_NF):
  lhs_ND, rhs_EDF, group_sizes_E = residuals
  schedule = tile_schedule(group_sizes_E, lhs_ND.shape[0], tile_size)
  dout_NF = dout_NF.astype(lhs_ND.dtype)
  dlhs_ND = _tiles_matmul(dout_NF, rhs_EDF, schedule, tile_size, True)
  drhs_EDF = _tiles_weight_gradient(
    lhs_ND, dout_NF, schedule, rhs_EDF.shape[0], tile_size
  )
  return dlhs_ND, drhs_EDF.astype(rhs_EDF.dtype), None


_tiles_grouped_matmul.defvjp(_tiles_forward, _tiles_backward)


def grouped_matmul(
  lhs_ND: jax.Array,
  rhs_EDF: jax.Array,
  group_sizes_E: jax.Array,
  *,
  implementation: str = "auto",
  tile_size: int | None = None,
) -> jax.Array:
  """out_NF[n] = lhs_ND[n] @ rhs_EDF[e] for the rows n of group e.

  Args:
    lhs_ND: rows sorted by group: the first group_sizes[0] rows belong to
      expert 0, the next group_sizes[1] to expert 1, and so on.
    rhs_EDF: one `[D, F]` matrix per expert.
    group_sizes_E: int, rows per expert, summing to at most N; rows past the
      sum get output 0 and no gradient.
    implementation: "auto", "tiles" or "ragged_dot" (see the module doc).
    tile_size: rows per tile of "tiles"; None: `default_tile_size`.

  Returns:
    out_NF in the dtype of lhs_ND.
  """
  chex.assert_rank([lhs_ND, rhs_EDF, group_sizes_E], [2, 3, 1])
  if lhs_ND.shape[1] != rhs_EDF.shape[1]:
    raise ValueError(
      f"lhs width D={lhs_ND.shape[1]} does not match rhs {rhs_EDF.shape} "
      "[E, D, F]."
    )
  if group_sizes_E.shape[0] != rhs_EDF.shape[0]:
    raise ValueError(
      f"{group_sizes_E.shape[0]} group sizes for E={rhs_EDF.shape[0]} "
      "experts; need one per expert."
    )
  implementation = resolve_implementation(implementation)
  if implementation == "ragged_dot":
    out_NF = lax.ragged_dot(lhs_ND, rhs_EDF, group_sizes_E.astype(jnp.int32))
    return out_NF.astype(lhs_ND.dtype)
  if tile_size is None:
    tile_size = default_tile_size(lhs_ND.shape[0], rhs_EDF.shape[0])
  if tile_size < 1:
    raise ValueError(f"tile_size={tile_size} must be a positive integer.")
  return _tiles_grouped_matmul(lhs_ND, rhs_EDF, group_sizes_E, tile_size)
