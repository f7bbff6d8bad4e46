"""Moving tokens to expert buffers and back, as pure functions.

Shapes (see `moe_jax.shapes`): tokens `[G, S, D]`, expert buffers
`[E, G, C, D]` (GShard Alg. 2: "dispatched_expert_inputs[E, G, C, M]").

Two backends give the same result from the same `routing.Routing`:

- einsum (GShard §2.2, Switch): build one-hot `dispatch_GSEC` and weighted
  `combine_GSEC` tensors and contract them with the tokens. Faithful to the
  papers and friendly to TPUs, but O(G*S*E*C) memory and time: C grows with
  S, so this is quadratic in the group size.
- indices: scatter each kept (token, choice) pair into its slot
  e*C + position and gather it back. Memory O(G*S*K*D); no `[.., E, C]`
  one-hots. Every slot receives at most one pair, so the scatter is a set,
  and the combine is a gather followed by a sum over K in a fixed order:
  both are deterministic, forward and backward.

In both, a dropped pair contributes exactly zero, and an empty slot holds a
zero vector.
"""

import chex
import jax
import jax.numpy as jnp

from moe_jax.routing import Routing

DISPATCHERS = ("einsum", "indices")


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


def _slot_index_GSK(routing: Routing, num_experts: int, capacity: int):
  """Flat slot e*C + position of each pair; E*C (past the end) if dropped."""
  slot_GSK = routing.expert_index_GSK * capacity + routing.position_GSK
  return jnp.where(routing.kept_GSK, slot_GSK, num_experts * capacity)


def index_dispatch(
  x_GSD: jax.Array, routing: Routing, num_experts: int, capacity: int
) -> jax.Array:
  """Scatters each kept pair's token into its slot; returns x_EGCD."""
  chex.assert_rank(x_GSD, 3)
  G, S, D = x_GSD.shape
  K = routing.expert_index_GSK.shape[-1]
  slot_GN = _slot_index_GSK(routing, num_experts, capacity).reshape(G, S * K)
  x_GND = jnp.broadcast_to(x_GSD[:, :, None], (G, S, K, D)).reshape(G, S * K, D)
  # Buffer with one spare row that collects the dropped pairs, then cut off.
  buffer_GXD = jnp.zeros((G, num_experts * capacity + 1, D), x_GSD.dtype)
  buffer_GXD = jax.vmap(lambda b, i, x: b.at[i].set(x))(
    buffer_GXD, slot_GN, x_GND
  )
  x_GECD = buffer_GXD[:, :-1].reshape(G, num_experts, capacity, D)
  return x_GECD.transpose(1, 0, 2, 3)


def index_combine(
  y_EGCD: jax.Array, routing: Routing, num_experts: int, capacity: int
) -> jax.Array:
  """Gathers each pair's expert output, weights it by its gate, sums over K."""
  chex.assert_rank(y_EGCD, 4)
  E, G, C, D = y_EGCD.shape
  chex.assert_equal((E, C), (num_experts, capacity))
  y_GXD = y_EGCD.transpose(1, 0, 2, 3).reshape(G, E * C, D)
  y_GXD = jnp.concatenate([y_GXD, jnp.zeros((G, 1, D), y_GXD.dtype)], axis=1)
  slot_GSK = _slot_index_GSK(routing, num_experts, capacity)
  y_GSKD = jax.vmap(lambda y, i: y[i])(y_GXD, slot_GSK)
  gates_GSK = routing.gates_GSK.astype(y_GSKD.dtype)
  return jnp.sum(y_GSKD * gates_GSK[..., None], axis=2)


def dispatch(x_GSD, routing, num_experts, capacity, backend):
  """x_EGCD through `backend` ("einsum" or "indices"); also returns what
  `combine` needs (the combine tensor for einsum, None for indices)."""
  if backend == "einsum":
    dispatch_GSEC, combine_GSEC = dispatch_and_combine_tensors(
      routing, num_experts, capacity
    )
    return einsum_dispatch(x_GSD, dispatch_GSEC), combine_GSEC
  if backend == "indices":
    return index_dispatch(x_GSD, routing, num_experts, capacity), None
  raise ValueError(
    f"unknown dispatch={backend!r}; allowed: {list(DISPATCHERS)}."
  )


def combine(y_EGCD, routing, num_experts, capacity, backend, combine_GSEC=None):
  """y_GSD from the expert outputs, the inverse of `dispatch`."""
  if backend == "einsum":
    return einsum_combine(y_EGCD, combine_GSEC)
  if backend == "indices":
    return index_combine(y_EGCD, routing, num_experts, capacity)
  raise ValueError(
    f"unknown dispatch={backend!r}; allowed: {list(DISPATCHERS)}."
  )
