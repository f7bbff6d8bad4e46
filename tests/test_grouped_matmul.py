"""Tests for `moe_jax.grouped_matmul` against a float64 NumPy loop.

out[n] = lhs[n] @ rhs[e(n)] for the rows n of group e (MegaBlocks, Gale et
al. 2023 §5; `jax.lax.ragged_dot`), 0 past the last group. Its gradients:
d lhs[n] = d out[n] @ rhs[e(n)]^T and d rhs[e] = sum_{n in e} lhs[n]^T d out[n].
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.grouped_matmul import (
  default_tile_size,
  grouped_matmul,
  resolve_implementation,
  tile_schedule,
)

N, D, F = 12, 3, 5
# (E, tile size) pairs; each compiles once. Tile 1 is a row loop, tile 16 is
# larger than N, tile 5 does not divide N.
CONFIGS = ((1, 4), (4, 1), (4, 5), (5, 16))


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


def test_tile_schedule_by_hand():
  """Group sizes [3, 0, 7, 2] with tiles of 4 rows (N = 12):
  ceil(3/4) + 0 + ceil(7/4) + ceil(2/4) = 1 + 0 + 2 + 1 = 4 tiles:
    tile 0: expert 0, rows 0..3  (rows 3 belongs to expert 2: overwritten)
    tile 1: expert 2, rows 3..6
    tile 2: expert 2, rows 7..10 (row 10 belongs to expert 3: overwritten)
    tile 3: expert 3, rows 10..13 (rows 12, 13 are the zero padding)
  At most ceil(12 / 4) + 4 = 7 tiles for any sizes summing to <= 12."""
  schedule = tile_schedule(jnp.array([3, 0, 7, 2]), 12, 4)
  assert int(schedule.num_tiles) == 4
  assert int(schedule.num_grouped) == 12
  assert schedule.expert_I.shape == (7,)
  np.testing.assert_array_equal(schedule.expert_I[:4], [0, 2, 2, 3])
  np.testing.assert_array_equal(schedule.start_I[:4], [0, 3, 7, 10])
  np.testing.assert_array_equal(schedule.end_I[:4], [3, 10, 10, 12])


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
  """About 1/8 of the mean group size, a power of two in [8, 128]."""
  assert default_tile_size(4096, 8) == 64  # 4096 / 64 = 64
  assert default_tile_size(65536, 8) == 128  # capped
  assert default_tile_size(4096, 128) == 8  # 4096 / 1024 = 4, floor 8
  assert default_tile_size(3000, 4) == 64  # 3000 / 32 = 93 -> 64


def test_auto_implementation_follows_backend():
  expected = "tiles" if jax.default_backend() == "cpu" else "ragged_dot"
  assert resolve_implementation("auto") == expected
  assert resolve_implementation("ragged_dot") == "ragged_dot"


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(implementation="megablocks"), "grouped_matmul='megablocks'"),
    (dict(tile_size=0), "tile_size=0"),
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
