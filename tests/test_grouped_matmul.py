"""Tests for `moe_jax.grouped_matmul` against a float64 NumPy loop.

out[n] = lhs[n] @ rhs[e(n)] for the rows n of group e (MegaBlocks, Gale et
al. 2023; `jax.lax.ragged_dot`), 0 past the last group. Its gradients:
d lhs[n] = d out[n] @ rhs[e(n)]^T and d rhs[e] = sum_{n in e} lhs[n]^T d out[n].
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import grouped_matmul as grouped_matmul_lib
from moe_jax.grouped_matmul import (
  computed_rows,
  default_tile_size,
  grouped_matmul,
  resolve_implementation,
)

N, D, F = 12, 3, 5
# (E, tile size) pairs; each compiles once. Tile 1 is a row loop; tiles 16
# and 32 exceed N = 12, so groups are covered by their tail tiles (16, 8).
CONFIGS = ((1, 4), (4, 1), (4, 2), (5, 16), (2, 32))


@functools.cache
def _value_and_grads(implementation, tile_size):
  def loss(lhs, rhs, group_sizes, cot):
    out = grouped_matmul(
      lhs,
      rhs,
      group_sizes,
      implementation=implementation,
      tile_size=tile_size,
    )
    return jnp.sum(out * cot), out

  grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  return jax.jit(grad_fn)


def _run(case, implementation):
  """((loss, out), (d lhs, d rhs)) of `case` through `implementation`."""
  fn = _value_and_grads(implementation, case["tile_size"])
  return fn(case["lhs"], case["rhs"], case["group_sizes"], case["cot"])


def _reference(case):
  """out, d lhs, d rhs in float64, one row at a time."""
  lhs, rhs, cot = (
    np.asarray(case[k], np.float64) for k in ("lhs", "rhs", "cot")
  )
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  dlhs = np.zeros_like(lhs)
  drhs = np.zeros_like(rhs)
  n = 0
  for e, size in enumerate(np.asarray(case["group_sizes"])):
    for _ in range(size):
      out[n] = lhs[n] @ rhs[e]
      dlhs[n] = rhs[e] @ cot[n]
      drhs[e] += np.outer(lhs[n], cot[n])
      n += 1
  return out, dlhs, drhs


@st.composite
def cases(draw):
  E, tile_size = draw(st.sampled_from(CONFIGS))
  # Cut [0, N] at E - 1 points and keep up to `total` rows: empty groups and
  # rows past the last group both occur.
  total = draw(st.integers(0, N))
  cuts = sorted(
    draw(st.lists(st.integers(0, total), min_size=E - 1, max_size=E - 1))
  )
  group_sizes = np.diff([0, *cuts, total])
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  return dict(
    lhs=jnp.asarray(rng.normal(size=(N, D)), jnp.float32),
    rhs=jnp.asarray(rng.normal(size=(E, D, F)), jnp.float32),
    group_sizes=jnp.asarray(group_sizes, jnp.int32),
    cot=jnp.asarray(rng.normal(size=(N, F)), jnp.float32),
    tile_size=tile_size,
  )


@hypothesis.given(cases(), st.sampled_from(["tiles", "ragged_dot"]))
def test_matches_float64_reference(case, implementation):
  (_, out), (dlhs, drhs) = _run(case, implementation)
  out_ref, dlhs_ref, drhs_ref = _reference(case)
  np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dlhs, dlhs_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(drhs, drhs_ref, rtol=1e-5, atol=1e-5)
  # Rows past the last group: output exactly 0 and no gradient.
  total = int(np.sum(case["group_sizes"]))
  assert np.all(np.asarray(out)[total:] == 0.0)
  assert np.all(np.asarray(dlhs)[total:] == 0.0)


@hypothesis.given(cases())
def test_tiles_and_ragged_dot_agree(case):
  """The CPU tile loop and `jax.lax.ragged_dot` (here its dense CPU
  lowering) give the same outputs and gradients."""
  tiles = _run(case, "tiles")
  ragged = _run(case, "ragged_dot")
  for a, b in zip(jax.tree.leaves(tiles), jax.tree.leaves(ragged)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _visited_tiles(start, size, tile_size):
  """(row, rows) of each tile `_visit_tiles` runs over one group."""

  def visit(carry, row, tile):
    rows_V, tiles_V, count = carry
    return rows_V.at[count].set(row), tiles_V.at[count].set(tile), count + 1

  empty = jnp.zeros(8, jnp.int32)
  rows_V, tiles_V, count = jax.jit(
    functools.partial(
      grouped_matmul_lib._visit_tiles,
      tile_size=tile_size,
      visit=visit,
      carry=(empty, empty, 0),
    )
  )(start, size)
  return list(zip(rows_V[:count].tolist(), tiles_V[:count].tolist()))


def test_tiles_of_one_group_by_hand():
  """floor(n / T) full tiles, then the rest rounded up to a multiple of
  m = 8 as binary digits, largest first:
    n = 45, T = 16: 2 full (rows 3, 19); rest 13 -> 16 = one tile of 16.
    n = 45, T = 32: 1 full (row 3); rest 13 -> 16: a tile of 16 at row 35.
    n = 21, T = 32: no full tile; rest 21 -> 24 = 16 + 8.
    n = 0: no tile. n = 5, T = 4 (m = 4): one full tile, rest 1 -> 4."""
  assert _visited_tiles(3, 45, 16) == [(3, 16), (19, 16), (35, 16)]
  assert _visited_tiles(3, 45, 32) == [(3, 32), (35, 16)]
  assert _visited_tiles(0, 21, 32) == [(0, 16), (16, 8)]
  assert _visited_tiles(7, 0, 32) == []
  assert _visited_tiles(1, 5, 4) == [(1, 4), (5, 4)]
  # At most m - 1 = 7 rows computed beyond each group, whatever T and E.
  np.testing.assert_array_equal(
    computed_rows(jnp.array([45, 21, 0, 8]), 32), [48, 24, 0, 8]
  )


def test_bit_deterministic():
  """The weight gradient sums each expert's tiles in a fixed order, so two
  runs are bit-identical (REFERENCE (i), determinism)."""
  rng = np.random.default_rng(3)
  case = dict(
    lhs=jnp.asarray(rng.normal(size=(N, D)), jnp.float32),
    rhs=jnp.asarray(rng.normal(size=(4, D, F)), jnp.float32),
    group_sizes=jnp.array([5, 0, 6, 1], jnp.int32),
    cot=jnp.asarray(rng.normal(size=(N, F)), jnp.float32),
    tile_size=1,
  )
  first, second = _run(case, "tiles"), _run(case, "tiles")
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(a, b)


def test_bfloat16_rows_give_bfloat16_output():
  lhs = jnp.ones((N, D), jnp.bfloat16)
  rhs = jnp.ones((2, D, F), jnp.bfloat16)
  sizes = jnp.array([4, 8])
  out = grouped_matmul(lhs, rhs, sizes, implementation="tiles", tile_size=4)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.full((N, F), D))
  drhs = jax.grad(
    lambda w: jnp.sum(grouped_matmul(lhs, w, sizes, implementation="tiles"))
  )(rhs)
  assert drhs.dtype == jnp.bfloat16
  # d rhs[e] = sum over e's rows of lhs^T 1 = n_e.
  np.testing.assert_array_equal(np.asarray(drhs[:, 0, 0], np.float32), [4, 8])


def test_default_tile_size():
  """The power of two at or below the mean group size N / E, in [8, 128]."""
  assert default_tile_size(4096, 8) == 128  # 512, capped
  assert default_tile_size(4096, 128) == 32  # 32
  assert default_tile_size(3000, 64) == 32  # 46 -> 32
  assert default_tile_size(100, 32) == 8  # 3, raised to 8


def test_auto_implementation_follows_backend():
  expected = "tiles" if jax.default_backend() == "cpu" else "ragged_dot"
  assert resolve_implementation("auto") == expected
  assert resolve_implementation("ragged_dot") == "ragged_dot"


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(implementation="megablocks"), "grouped_matmul='megablocks'"),
    (dict(tile_size=0), "tile_size=0 must be a power of two"),
    (dict(tile_size=12), "tile_size=12 must be a power of two"),
  ],
)
def test_bad_arguments_name_the_value(kwargs, message):
  with pytest.raises(ValueError, match=message):
    grouped_matmul(jnp.ones((4, D)), jnp.ones((2, D, F)), jnp.ones(2), **kwargs)


def test_shape_mismatches_name_the_shapes():
  with pytest.raises(ValueError, match="D=4"):
    grouped_matmul(jnp.ones((4, 4)), jnp.ones((2, D, F)), jnp.ones(2))
  with pytest.raises(ValueError, match="3 group sizes for E=2"):
    grouped_matmul(jnp.ones((4, D)), jnp.ones((2, D, F)), jnp.ones(3))
