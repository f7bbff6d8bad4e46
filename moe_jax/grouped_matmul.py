"""Grouped matrix multiplication: the expert FFNs of a dropless MoE layer.

Shapes (see `moe_jax.shapes`): rows `[N, D]` sorted by expert, weights
`[E, D, F]`, group sizes `[E]`, one tile of rows `[T, D]`. D and F stand
for whatever the matmul contracts and produces (D -> F for the first layer,
F -> D for the second).

out[n] = lhs[n] @ rhs[e(n)], where rows group_starts[e] .. group_ends[e] - 1
belong to expert e (group_ends = cumsum(group_sizes)); rows past
sum(group_sizes) get 0. This is `jax.lax.ragged_dot`, the grouped GEMM of
MegaBlocks (Gale et al. 2023) and of MaxText's and Megatron-LM's
dropless MoE layers. Two implementations give the same result:

- "ragged_dot": `jax.lax.ragged_dot`. GPUs and TPUs lower it to a native
  grouped kernel. The CPU lowering builds a dense `[E, N, D]` masked copy of
  the rows and contracts it with every expert, so it costs E times the dense
  work: fine on an accelerator, slow on a CPU.
- "tiles": a `fori_loop` over the experts reads each expert's weights once
  and runs a `[t, D] @ [D, F]` matmul per tile of its rows: full tiles of
  T = `tile_size` rows, then the rest rounded up to a multiple of 8 as at
  most one tile each of T/2, T/4, ..., 8 rows. The work is the useful work
  plus at most 7 rows per expert, whatever E and the routing; no Python
  loop over experts, and no dense `[E, ...]` intermediate. The backward
  pass walks the same tiles: d lhs = grouped_matmul(d out, rhs^T), and
  d rhs[e] = sum over e's tiles of lhs_tile^T d out_tile, accumulated in
  float32 in row order (deterministic).

`implementation="auto"` picks "ragged_dot" on GPU and TPU and "tiles" on CPU.
"""

import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ("auto", "tiles", "ragged_dot")


def resolve_implementation(implementation: str) -> str:
  """Maps "auto" to "ragged_dot" where the backend has a native kernel
  (GPU, TPU) and to "tiles" elsewhere; other allowed names pass through."""
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
  """Rows per full tile: the power of two at or below the mean group size
  N / E, in [8, 128]. 128 rows keep a CPU matmul near its dense speed;
  smaller groups are covered by their own smaller tiles anyway."""
  mean = max(num_rows // max(num_experts, 1), 1)
  return int(min(max(1 << (mean.bit_length() - 1), MIN_TILE), 128))


MIN_TILE = 8  # rows of the smallest tile (or tile_size, if smaller)


def _tile_sizes(tile_size: int) -> list[int]:
  """[T, T/2, ..., m]: the tile sizes, m = min(MIN_TILE, T)."""
  if tile_size < 1 or tile_size & (tile_size - 1):
    raise ValueError(f"tile_size={tile_size} must be a power of two >= 1.")
  sizes = [tile_size]
  while sizes[-1] > MIN_TILE:
    sizes.append(sizes[-1] // 2)
  return sizes


def computed_rows(group_sizes_E: jax.Array, tile_size: int) -> jax.Array:
  """Rows the tiles compute per expert: n_e rounded up to a multiple of m,
  so at most m - 1 rows more than n_e (m = min(MIN_TILE, T))."""
  m = _tile_sizes(tile_size)[-1]
  return (group_sizes_E + m - 1) // m * m


def _visit_tiles(start, size, tile_size, visit, carry):
  """Runs carry = visit(carry, row, tile) over one group's rows
  start .. start + size - 1, in row order: floor(size / T) full tiles of T
  rows, then the rest rounded up to a multiple of m, as at most one tile of
  each size T, T/2, ..., m (its binary digits; T only if the rounding
  reaches it). The last tile may run up to m - 1 rows past the group."""
  sizes = _tile_sizes(tile_size)
  full = size // tile_size
  carry = lax.fori_loop(
    0, full, lambda j, c: visit(c, start + j * tile_size, tile_size), carry
  )
  row = start + full * tile_size
  rest = computed_rows(size - full * tile_size, tile_size)  # <= T
  for tile in sizes:
    take = rest >= tile
    carry = lax.cond(
      take, lambda c, r=row, t=tile: visit(c, r, t), lambda c: c, carry
    )
    row = row + jnp.where(take, tile, 0)
    rest = rest - jnp.where(take, tile, 0)
  return carry


def _group_bounds(group_sizes_E):
  group_sizes_E = group_sizes_E.astype(jnp.int32)
  return jnp.cumsum(group_sizes_E) - group_sizes_E, group_sizes_E


def _tiles_matmul(lhs_ND, rhs_EDF, group_sizes_E, tile_size, transpose_rhs):
  """out[n] = lhs[n] @ rhs[e(n)] (or @ rhs[e(n)]^T), expert by expert,
  tile by tile; each expert's weights are read once. Rows, weights and the
  loop's buffers are float32 whatever the dtype (XLA's CPU bfloat16 matmuls
  and buffer updates are slower than float32 ones, most of all on small
  tiles); the output is cast back.

  A group's last tile may run past its rows into the next group's; those
  rows get values computed with the wrong weights, but the groups run in
  row order and the next group's own tiles overwrite them; the rows the
  last group spills into are zeroed at the end.
  """
  N, D = lhs_ND.shape
  E = rhs_EDF.shape[0]
  F = rhs_EDF.shape[1] if transpose_rhs else rhs_EDF.shape[2]
  contract = (1,) if transpose_rhs else (0,)
  start_E, size_E = _group_bounds(group_sizes_E)
  dtype = lhs_ND.dtype
  # T spare zero rows, so that a tile starting at row N - 1 fits.
  lhs_ND = jnp.pad(lhs_ND.astype(jnp.float32), ((0, tile_size), (0, 0)))

  def run_expert(e, out_NF):
    w_DF = rhs_EDF[e].astype(jnp.float32)

    def run_tile(out_NF, row, tile):
      rows_TD = lax.dynamic_slice_in_dim(lhs_ND, row, tile)
      out_TF = lax.dot_general(rows_TD, w_DF, (((1,), contract), ((), ())))
      return lax.dynamic_update_slice_in_dim(out_NF, out_TF, row, 0)

    return _visit_tiles(start_E[e], size_E[e], tile_size, run_tile, out_NF)

  def run_nonempty(e, out_NF):
    return lax.cond(size_E[e] > 0, run_expert, lambda e, o: o, e, out_NF)

  out_NF = jnp.zeros((N + tile_size, F), jnp.float32)
  out_NF = lax.fori_loop(0, E, run_nonempty, out_NF)
  # Only the last group's last tile can write past the groups (< m rows).
  spill_TF = jnp.zeros((_tile_sizes(tile_size)[-1], F), out_NF.dtype)
  out_NF = lax.dynamic_update_slice_in_dim(out_NF, spill_TF, jnp.sum(size_E), 0)
  return out_NF[:N].astype(dtype)


def _tiles_weight_gradient(lhs_ND, dout_NF, group_sizes_E, tile_size):
  """d rhs[e] = sum_{n in group e} lhs[n]^T dout[n], in float32, tile by
  tile in row order (deterministic). Rows past the group end are zeroed in
  both operands, so even a non-finite neighbour contributes exactly 0."""
  N, D = lhs_ND.shape
  F = dout_NF.shape[1]
  E = group_sizes_E.shape[0]
  start_E, size_E = _group_bounds(group_sizes_E)
  lhs_ND = jnp.pad(lhs_ND.astype(jnp.float32), ((0, tile_size), (0, 0)))
  dout_NF = jnp.pad(dout_NF.astype(jnp.float32), ((0, tile_size), (0, 0)))

  def run_expert(e, drhs_EDF):
    end = start_E[e] + size_E[e]

    def run_tile(drhs_EDF, row, tile):
      in_group_T = row + jnp.arange(tile) < end
      rows_TD = lax.dynamic_slice_in_dim(lhs_ND, row, tile)
      rows_TD = jnp.where(in_group_T[:, None], rows_TD, 0)
      dout_TF = lax.dynamic_slice_in_dim(dout_NF, row, tile)
      dout_TF = jnp.where(in_group_T[:, None], dout_TF, 0)
      drhs_DF = lax.dot_general(rows_TD, dout_TF, (((0,), (0,)), ((), ())))
      return drhs_EDF.at[e].add(drhs_DF)

    return _visit_tiles(start_E[e], size_E[e], tile_size, run_tile, drhs_EDF)

  drhs_EDF = jnp.zeros((E, D, F), jnp.float32)
  return lax.fori_loop(0, E, run_expert, drhs_EDF)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiles_grouped_matmul(lhs_ND, rhs_EDF, group_sizes_E, tile_size):
  return _tiles_matmul(lhs_ND, rhs_EDF, group_sizes_E, tile_size, False)


def _tiles_forward(lhs_ND, rhs_EDF, group_sizes_E, tile_size):
  out_NF = _tiles_grouped_matmul(lhs_ND, rhs_EDF, group_sizes_E, tile_size)
  return out_NF, (lhs_ND, rhs_EDF, group_sizes_E)


def _tiles_backward(tile_size, residuals, dout_NF):
  lhs_ND, rhs_EDF, group_sizes_E = residuals
  dout_NF = dout_NF.astype(lhs_ND.dtype)
  dlhs_ND = _tiles_matmul(dout_NF, rhs_EDF, group_sizes_E, tile_size, True)
  drhs_EDF = _tiles_weight_gradient(lhs_ND, dout_NF, group_sizes_E, tile_size)
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
  _tile_sizes(tile_size)  # checks it
  return _tiles_grouped_matmul(lhs_ND, rhs_EDF, group_sizes_E, tile_size)
