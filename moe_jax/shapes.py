"""The dimension alphabet of moe_jax, and the reshapes between its layouts.

Every array in the package carries its shape in its name (`logits_GSE`,
`combine_GSEC`), spelled with these letters:

  B  batch (sequences)                 G  groups of tokens routed together
  L  sequence length                   S  tokens per group (group size)
  D  model width                       E  experts per MoE layer
  F  expert hidden width               K  experts chosen per token (top-k)
  H  attention heads                   C  capacity: slots per expert per group
  V  vocabulary size                   N  rows of a grouped matmul: the G*S*K
                                          (token, choice) pairs by expert
                                       T  rows of one tile of a grouped matmul

Routing happens per group: the B*L tokens of a batch are cut into G groups of
S consecutive tokens (GShard §2.2, "local groups"), and capacity, dropping and
the balancing losses are all defined within a group. The grouping depends only
on the token order and `group_size`, never on the device count, so the same
batch routes the same way on one device or many.
"""

import chex
import jax


def group_size_for(num_tokens: int, group_size: int) -> int:
  """The group size S actually used for `num_tokens` tokens.

  S = `group_size`, or all tokens in one group when there are fewer tokens
  than that. S must divide the number of tokens.

  Raises:
    ValueError: if `group_size` is not positive or does not divide the tokens.
  """
  if group_size <= 0:
    raise ValueError(f"group_size={group_size} must be a positive integer.")
  if num_tokens <= 0:
    raise ValueError(f"cannot group num_tokens={num_tokens}; need >= 1.")
  size = min(group_size, num_tokens)
  if num_tokens % size:
    raise ValueError(
      f"group_size={group_size} does not divide the number of tokens "
      f"B*L={num_tokens}; choose a group_size that divides it."
    )
  return size


def to_groups(x_BL_, group_size: int) -> jax.Array:
  """Reshapes `[B, L, ...]` to `[G, S, ...]` with S = group_size_for(B*L)."""
  chex.assert_rank(x_BL_, {2, 3})
  num_tokens = x_BL_.shape[0] * x_BL_.shape[1]
  size = group_size_for(num_tokens, group_size)
  return x_BL_.reshape(num_tokens // size, size, *x_BL_.shape[2:])


def from_groups(x_GS_, batch: int, length: int) -> jax.Array:
  """Reshapes `[G, S, ...]` back to `[B, L, ...]`."""
  chex.assert_axis_dimension_gteq(x_GS_, 0, 1)
  if x_GS_.shape[0] * x_GS_.shape[1] != batch * length:
    raise ValueError(
      f"cannot ungroup {x_GS_.shape[:2]} into batch={batch}, length={length}"
    )
  return x_GS_.reshape(batch, length, *x_GS_.shape[2:])
