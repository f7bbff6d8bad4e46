"""Expert parallelism: tokens travel by all-to-all to the devices of their
experts, and back.

Shapes (see `moe_jax.shapes`): tokens `[G, S, D]`, expert buffers
`[E, G, C, D]`, expert weights `[E, D, F]`. On a mesh (`moe_jax.sharding`)
with n_d `data`, n_e `expert` and n_m `model` devices:

  tokens  [G, S, D]     G split over data x expert: each device holds
                        g = G / (n_d n_e) whole groups
  buffers [E, G, C, D]  E split over expert, G over data
  weights [E, D, F]     E split over expert, F over model

One MoE layer (GShard §3.2 and Alg. 2; Switch §2.2 "expert parallelism"):

1. each device routes its own g groups and dispatches them into slots for
   all E experts, x_EgCD (capacity C per expert per group);
2. all-to-all over `expert`: device j of a data row receives, from each of
   the n_e devices of that row, the slots of its E / n_e experts, so it holds
   x_eG'CD with G' = n_e g = G / n_d groups;
3. it runs its experts (F split over `model`, outputs summed over it);
4. the reverse all-to-all returns the slots, and each device combines its
   own groups.

Routing and capacity are per group and every group stays on one device, so
the same global batch routes the same way, with the same drops, on one
device or many: only the placement of the groups changes.

Two implementations (`IMPLEMENTATIONS`), tested against each other:

  shard_map  steps 1, 2 and 4 written per device in `jax.shard_map`, with
             explicit `jax.lax.all_to_all` (the default). The buffers reach
             step 3 already split like the expert weights, so the expert
             einsums are local: weights never move.
  gspmd      only sharding constraints: x_GSD with groups split, x_EGCD
             first with groups split and then with experts split; XLA's
             partitioner inserts the all-to-all between the two.
"""

import jax

from moe_jax import dispatch as dispatch_lib
from moe_jax import sharding

IMPLEMENTATIONS = ("shard_map", "gspmd")
# Supported dispatch backends: those that fill `[E, G, C, D]` buffers.
BACKENDS = ("einsum", "indices")

TOKENS = ("group", "tokens", "embed")  # [G, S, D]
LOCAL_BUFFER = (None, "group", "capacity", "embed")  # [E, G, C, D] by group
EXPERT_BUFFER = ("expert", "expert_group", "capacity", "embed")  # by expert
ROUTING = ("group",)  # every `Routing` array is [G, ...]


def check(
  num_groups: int,
  num_experts: int,
  expert_dim: int,
  backend: str,
  implementation: str,
) -> None:
  """Raises ValueError unless the active mesh divides the groups, experts
  and expert width, and the backend and implementation are supported."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"unknown expert_parallel={implementation!r}; allowed: "
      f"{list(IMPLEMENTATIONS)}."
    )
  if backend not in BACKENDS:
    raise ValueError(
      f"expert parallelism needs dispatch in {list(BACKENDS)} (buffers "
      f"[E, G, C, D]); got dispatch={backend!r}."
    )
  mesh = sharding.active_mesh()
  for what, value, logical, why in (
    ("num_experts", num_experts, "expert", "each device holds whole experts"),
    ("expert_dim", expert_dim, "mlp", "each device holds F/n of an expert"),
    ("groups G", num_groups, "group", "groups never span devices"),
  ):
    n = sharding.axis_size(mesh, logical)
    if value % n:
      raise ValueError(
        f"{what}={value} is not divisible by the {n} devices of mesh axes "
        f"{sharding.mesh_axes(logical)} ({why}); change it or mesh.shape."
      )
  expected = sharding.mesh_axes("expert_group") + sharding.mesh_axes("expert")
  if implementation == "shard_map" and sharding.mesh_axes("group") != expected:
    raise ValueError(
      f"expert_parallel='shard_map' needs the logical axis 'group' split over "
      f"{expected} ('expert_group' then 'expert'), got "
      f"{sharding.mesh_axes('group')}; fix mesh.logical_axis_rules."
    )


def _all_to_all(x, split_axis: int, concat_axis: int):
  axes = sharding.mesh_axes("expert")
  if not axes:
    return x
  return jax.lax.all_to_all(x, axes, split_axis, concat_axis, tiled=True)


def dispatch(x_GSD, route, num_experts, capacity, backend, implementation):
  """Tokens -> expert buffers on the experts' devices (steps 1-2).

  Returns:
    x_EGCD, E split over `expert` and G over `data`, and what `combine`
    needs (the combine tensor `[G, S, E, C]` for einsum, else None).
  """
  if implementation == "gspmd":
    x_GSD = sharding.constrain(x_GSD, TOKENS)
    x_EGCD, combine_GSEC = dispatch_lib.dispatch(
      x_GSD, route, num_experts, capacity, backend
    )
    x_EGCD = sharding.constrain(x_EGCD, LOCAL_BUFFER)
    return sharding.constrain(x_EGCD, EXPERT_BUFFER), combine_GSEC

  def local(x_gSD, route_g):
    x_EgCD, combine_gSEC = dispatch_lib.dispatch(
      x_gSD, route_g, num_experts, capacity, backend
    )
    # Expert block j goes to device j; received groups are concatenated.
    return _all_to_all(x_EgCD, 0, 1), combine_gSEC

  return sharding.shard_map(
    local, in_names=(TOKENS, ROUTING), out_names=(EXPERT_BUFFER, ROUTING)
  )(x_GSD, route)


def combine(
  y_EGCD, route, combine_GSEC, num_experts, capacity, backend, implementation
):
  """Expert outputs -> tokens on their own devices (steps 4), y_GSD."""
  if implementation == "gspmd":
    y_EGCD = sharding.constrain(y_EGCD, EXPERT_BUFFER)
    y_EGCD = sharding.constrain(y_EGCD, LOCAL_BUFFER)
    y_GSD = dispatch_lib.combine(
      y_EGCD, route, num_experts, capacity, backend, combine_GSEC
    )
    return sharding.constrain(y_GSD, TOKENS)

  def local(y_eGCD, route_g, combine_gSEC):
    # The inverse all-to-all: group block j goes back to device j.
    y_EgCD = _all_to_all(y_eGCD, 1, 0)
    return dispatch_lib.combine(
      y_EgCD, route_g, num_experts, capacity, backend, combine_gSEC
    )

  return sharding.shard_map(
    local, in_names=(EXPERT_BUFFER, ROUTING, ROUTING), out_names=TOKENS
  )(y_EGCD, route, combine_GSEC)


def moe_ffn(
  x_GSD,
  route,
  experts,
  *,
  num_experts: int,
  expert_dim: int,
  capacity: int,
  backend: str,
  implementation: str,
):
  """y_GSD = combine(experts(dispatch(x_GSD))) across the active mesh.

  Args:
    x_GSD: tokens, in the dispatch dtype.
    route: the `routing.Routing` of the groups.
    experts: `[E, G, C, D] -> [E, G, C, D]`, the expert FFNs (an `Experts`
      module); it sees buffers split like its weights, so runs locally.
    num_experts, expert_dim, capacity: E, F, C.
    backend: "einsum" or "indices" (see `moe_jax.dispatch`).
    implementation: "shard_map" or "gspmd".
  """
  check(x_GSD.shape[0], num_experts, expert_dim, backend, implementation)
  x_EGCD, combine_GSEC = dispatch(
    x_GSD, route, num_experts, capacity, backend, implementation
  )
  y_EGCD = sharding.constrain(experts(x_EGCD), EXPERT_BUFFER)
  return combine(
    y_EGCD, route, combine_GSEC, num_experts, capacity, backend, implementation
  )
