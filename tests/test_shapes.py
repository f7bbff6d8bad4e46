"""Tests for `moe_jax.shapes`: grouping tokens into [G, S, ...] and back.

GShard §2.2 "local groups": the B*L tokens are cut into G groups of S
consecutive tokens; the grouping depends only on token order and group_size.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.shapes import from_groups, group_size_for, to_groups


@pytest.mark.parametrize(
  "num_tokens, group_size, expected",
  [
    (12, 4, 4),  # 3 groups of 4
    (12, 12, 12),  # 1 group
    (12, 100, 12),  # fewer tokens than group_size: one group of all 12
    (1, 8, 1),  # single-token decode
  ],
)
def test_group_size_for(num_tokens, group_size, expected):
  assert group_size_for(num_tokens, group_size) == expected


@pytest.mark.parametrize("group_size", [0, -3])
def test_group_size_must_be_positive(group_size):
  with pytest.raises(ValueError, match=f"group_size={group_size}"):
    group_size_for(12, group_size)


def test_group_size_must_divide_tokens():
  """STYLE rule 13: the error names the value and the token count."""
  with pytest.raises(ValueError, match=r"group_size=5.*B\*L=12"):
    group_size_for(12, 5)


@pytest.mark.parametrize("shape", [(2, 6), (2, 6, 3)])
@pytest.mark.parametrize("group_size", [3, 4, 12, 64])
def test_round_trip(shape, group_size):
  """from_groups(to_groups(x)) == x, and groups are consecutive tokens in
  batch-major order: token (b, l) lands in group (b*L + l) // S."""
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  B, L = shape[:2]
  S = min(group_size, B * L)
  x_GS_ = to_groups(x, group_size)
  assert x_GS_.shape == (B * L // S, S) + shape[2:]
  flat = np.asarray(x).reshape((B * L,) + shape[2:])
  for g in range(x_GS_.shape[0]):
    np.testing.assert_array_equal(x_GS_[g], flat[g * S : (g + 1) * S])
  np.testing.assert_array_equal(from_groups(x_GS_, B, L), x)


def test_to_groups_rejects_non_divisor():
  with pytest.raises(ValueError, match="group_size=5"):
    to_groups(jnp.zeros((2, 6, 3)), 5)


def test_from_groups_rejects_wrong_batch():
  with pytest.raises(ValueError, match=r"batch=3, length=6"):
    from_groups(jnp.zeros((3, 4, 2)), 3, 6)
