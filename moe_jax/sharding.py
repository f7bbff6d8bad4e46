"""Device meshes and logical axis names: the only place that builds shardings.

Devices form a mesh with three axes (`MESH_AXES`):

  data    data parallelism: each slice of the batch has its own devices
  expert  expert parallelism: experts are split over these devices, and the
          tokens travel to them by all-to-all (GShard §3.2, Switch §2.2)
  model   tensor parallelism inside each expert: its hidden width F is split
          (Megatron-LM), all other layers are replicated over this axis

Modules name the axes of their parameters and activations with logical names
(`nn.with_logical_partitioning(init, ("expert", "embed", "mlp"))` for the
stacked expert weights `[E, D, F]`); `LOGICAL_AXIS_RULES` maps each logical
name to the mesh axes it is split over. A config may override entries of
the table (`config.mesh.logical_axis_rules`). No other file builds a
`PartitionSpec`.

Tokens are split over `data` x `expert` together: every device holds whole
groups of tokens (`[G, S, D]`, G split over data x expert), routes them
locally, and sends each expert's slots to the device that holds the expert.
Groups never span devices, so the same global batch routes the same way on
one device or many (see `moe_jax.expert_parallel`).

A `Layout` places the train state and the batches: `Layout()` is the single
device (plain `jax.jit`, unchanged behaviour), `Layout(mesh)` initialises
the state already sharded (`eval_shape`, then shardings, then a jitted init
with `out_shardings`) and jits steps with in/out shardings and donated state.
Leaves without logical names are replicated: the train state's
`router_state` (the DeepSeek balancing bias `[E]`, which every device needs
whole to route its groups, and which every device updates identically from
the global batch's load).
"""

import contextlib
import contextvars
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from moe_jax import shapes

MESH_AXES = ("data", "expert", "model")

# Logical axis name -> mesh axes it is split over (None: replicated). Every
# logical name a module uses must appear here.
LOGICAL_AXIS_RULES = (
  # Tokens, [B, L, ...] and [G, S, ...]: split over every device that holds
  # its own data, i.e. data x expert (GShard: experts share devices with data).
  ("batch", ("data", "expert")),
  ("group", ("data", "expert")),
  ("length", None),
  ("tokens", None),  # S, the tokens of one group
  # Dispatched expert buffers [E, G, C, D]: each device holds its experts'
  # slots from the groups of its data row. `group` must equal `expert_group`
  # followed by `expert`: the all-to-all over `expert` turns one into the other.
  ("expert", "expert"),
  ("expert_group", "data"),
  ("capacity", None),
  # Widths.
  ("embed", None),
  ("mlp", "model"),  # F of the experts: tensor parallelism inside experts
)

_RULES = contextvars.ContextVar("moe_jax_logical_axis_rules", default=None)


# ---------------------------------------------------------------------------
# Meshes.


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """`shape` with its one -1 (if any) replaced by the remaining devices.

  Raises:
    ValueError: if `shape` has not one size per axis of `MESH_AXES`, has a
      size < 1 other than a single -1, or does not use `num_devices` devices.
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(
      f"mesh.shape={shape} must give {len(MESH_AXES)} sizes, one per mesh "
      f"axis {MESH_AXES}."
    )
  if any(s < 1 and s != -1 for s in shape) or shape.count(-1) > 1:
    raise ValueError(
      f"mesh.shape={shape}: sizes must be >= 1, with at most one -1 "
      f"(= all remaining devices)."
    )
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(
        f"mesh.shape={shape}: the other axes use {known} devices, which does "
        f"not divide the {num_devices} devices available."
      )
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(
      f"mesh.shape={shape} needs {math.prod(shape)} devices but "
      f"jax.device_count()={num_devices}; the sizes must multiply to the "
      f"number of devices (or use -1 for one axis)."
    )
  return shape


def make_mesh(shape: Sequence[int], devices=None) -> jax.sharding.Mesh:
  """A mesh over all (or the given) devices with axes `MESH_AXES`.

  The axis types are given explicitly and are all `Auto`: the model is
  partitioned by GSPMD from the shardings of its inputs, parameters and a
  few constraints, with `shard_map` regions (manual axes) for the expert
  all-to-all. (Flax linen's embedding lookup is ambiguous under `Explicit`
  axes, whose sharding-in-types would need an output sharding on every
  gather.)
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(shape, len(devices))
  return jax.make_mesh(
    shape,
    MESH_AXES,
    axis_types=(AxisType.Auto,) * len(MESH_AXES),
    devices=devices,
  )


def mesh_from_config(mesh_config) -> jax.sharding.Mesh | None:
  """The mesh of `config.mesh`, or None (one device, no mesh) when it has a
  single device: all sizes 1 (whatever the devices available), or -1 on a
  machine with one device."""
  if all(int(s) == 1 for s in mesh_config.shape):
    mesh_shape(mesh_config.shape, 1)  # still checks the number of sizes
    return None
  if math.prod(mesh_shape(mesh_config.shape, jax.device_count())) == 1:
    return None
  return make_mesh(mesh_config.shape)


def axis_size(mesh, logical_name: str, rules=None) -> int:
  """How many devices the logical axis is split over in `mesh`."""
  return math.prod(mesh.shape[a] for a in mesh_axes(logical_name, rules))


# ---------------------------------------------------------------------------
# Logical axis rules.


def rules_from_config(mesh_config) -> tuple:
  """`LOGICAL_AXIS_RULES` with the entries of `mesh_config.logical_axis_rules`
  (pairs `(logical_name, mesh_axes)`) replacing those of the same name."""
  overrides = dict(mesh_config.get("logical_axis_rules", ()) or ())
  table = dict(LOGICAL_AXIS_RULES)
  unknown = sorted(set(overrides) - set(table))
  if unknown:
    raise ValueError(
      f"mesh.logical_axis_rules names unknown logical axes {unknown}; "
      f"allowed: {sorted(table)}."
    )
  table.update(overrides)
  rules = tuple(table.items())
  for name, _ in rules:
    mesh_axes(name, rules)  # checks the mesh axis names
  return rules


@contextlib.contextmanager
def axis_rules(rules):
  """Uses `rules` instead of `LOGICAL_AXIS_RULES` inside the context."""
  token = _RULES.set(tuple(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def mesh_axes(logical_name: str, rules=None) -> tuple[str, ...]:
  """The mesh axes `logical_name` is split over (empty: replicated)."""
  if rules is None:  # those of the innermost `axis_rules`, else the default
    rules = _RULES.get() or LOGICAL_AXIS_RULES
  table = dict(rules)
  if logical_name not in table:
    raise ValueError(
      f"unknown logical axis {logical_name!r}; allowed: {sorted(table)} "
      f"(moe_jax.sharding.LOGICAL_AXIS_RULES)."
    )
  axes = table[logical_name]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  bad = [a for a in axes if a not in MESH_AXES]
  if bad:
    raise ValueError(
      f"logical axis {logical_name!r} maps to mesh axes {bad}; allowed: "
      f"{MESH_AXES}."
    )
  return tuple(axes)


def logical_spec(names: Sequence[str | None], rules=None) -> PartitionSpec:
  """The PartitionSpec of an array whose axes have logical `names`.

  Raises:
    ValueError: for an unknown name, or a mesh axis used by two names.
  """
  entries, used = [], []
  for name in names:
    axes = () if name is None else mesh_axes(name, rules)
    if set(axes) & set(used):
      raise ValueError(
        f"logical axes {tuple(names)} use mesh axes {sorted(set(axes))} "
        f"twice; each mesh axis may split one array axis only."
      )
    used.extend(axes)
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*entries)


def active_mesh():
  """The mesh set for the code being traced (`jax.set_mesh`, or a `Layout`'s
  jitted functions), or None on a single device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  if tuple(mesh.axis_names) != MESH_AXES:
    raise ValueError(
      f"moe_jax needs a mesh with axes {MESH_AXES}; the active mesh has "
      f"{tuple(mesh.axis_names)} (build it with moe_jax.sharding.make_mesh)."
    )
  return mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Asks GSPMD to lay `x` out as its logical axis `names` say (a no-op
  without an active mesh)."""
  if active_mesh() is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(names))


def _is_names(x) -> bool:
  return isinstance(x, tuple) and all(
    n is None or isinstance(n, str) for n in x
  )


def shard_map(fn: Callable, in_names, out_names) -> Callable:
  """`jax.shard_map` over the active mesh, its specs given as logical names:
  pytree prefixes of the arguments / results whose leaves are tuples of
  names, e.g. `in_names=(("group", None, "embed"), ("group",))`."""

  def specs(tree):
    return jax.tree.map(logical_spec, tree, is_leaf=_is_names)

  return jax.shard_map(
    fn, mesh=active_mesh(), in_specs=specs(in_names), out_specs=specs(out_names)
  )


# ---------------------------------------------------------------------------
# Checks of a config against a mesh.


def check_config(config, mesh) -> None:
  """Raises ValueError unless `mesh` divides the experts, the expert width,
  the batches and the groups of the run config `config` (groups never span
  devices)."""
  moe, data = config.model.moe, config.data
  rules = rules_from_config(config.mesh)

  def check(value, logical, what, hint):
    n = axis_size(mesh, logical, rules)
    if value % n:
      raise ValueError(
        f"{what} is not divisible by the {n} devices of mesh axes "
        f"{mesh_axes(logical, rules)} (mesh.shape="
        f"{tuple(mesh.shape.values())}); {hint}."
      )

  for what in ("batch_size", "eval_batch_size"):
    B, L = data[what], data.seq_len
    check(B, "batch", f"data.{what}={B}", "use a multiple of the devices")
    if moe.num_experts > 0:
      S = shapes.group_size_for(B * L, moe.group_size)
      check(
        B * L // S,
        "group",
        f"G={B * L // S} groups (data.{what} x seq_len / group_size = "
        f"{B} x {L} / {S})",
        "groups never span devices: lower group_size or raise the batch",
      )
  if moe.num_experts > 0 and moe.get("dispatch") == "dropless":
    raise ValueError(
      "model.moe.dispatch='dropless' runs on one device only (its per-expert "
      "row counts change every step; expert parallelism moves fixed-size "
      f"buffers): with mesh.shape={tuple(mesh.shape.values())} use "
      "dispatch='indices' or 'einsum'."
    )
  if moe.num_experts > 0:
    E, F = moe.num_experts, moe.expert_dim
    check(E, "expert", f"model.moe.num_experts={E}", "change E or the mesh")
    check(F, "mlp", f"model.moe.expert_dim={F}", "change F or the mesh")


# ---------------------------------------------------------------------------
# Placing and jitting the train state.


def _is_boxed(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


class Layout:
  """Where the train state and the batches live: one device or a mesh.

  Attributes:
    mesh: the device mesh, or None for the default device (plain `jax.jit`,
      exactly as without this class).
    rules: the logical axis rules.
  """

  def __init__(self, mesh=None, rules=LOGICAL_AXIS_RULES):
    self.mesh = mesh
    self.rules = tuple(rules)

  @classmethod
  def from_config(cls, config) -> "Layout":
    """The layout of `config.mesh` (one device when absent or all 1s)."""
    if config.get("mesh") is None:
      return cls()
    mesh = mesh_from_config(config.mesh)
    if mesh is not None:
      check_config(config, mesh)
    return cls(mesh, rules_from_config(config.mesh))

  def describe(self) -> str:
    """E.g. "mesh data=2 expert=4 model=1 (8 cpu devices, 1 process)"."""
    if self.mesh is None:
      return f"one device ({jax.devices()[0].platform})"
    axes = " ".join(f"{k}={v}" for k, v in self.mesh.shape.items())
    processes = jax.process_count()
    return (
      f"mesh {axes} ({self.mesh.size} {jax.devices()[0].platform} devices, "
      f"{processes} process{'es' if processes > 1 else ''})"
    )

  def sharding(self, names: Sequence[str | None]) -> NamedSharding:
    """The NamedSharding of an array with logical axis `names`."""
    return NamedSharding(self.mesh, logical_spec(names, self.rules))

  def _in_mesh(self, fn: Callable) -> Callable:
    """`fn`, traced with this layout's mesh and rules active."""

    def traced(*args):
      with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
        with axis_rules(self.rules):
          return fn(*args)

    return traced

  def shardings(self, abstract_tree):
    """NamedShardings of a pytree whose leaves may be boxed with logical
    names (`nn.LogicallyPartitioned`); unboxed leaves are replicated."""
    return jax.tree.map(
      lambda x: self.sharding(tuple(x.names) if _is_boxed(x) else ()),
      abstract_tree,
      is_leaf=_is_boxed,
    )

  def init(self, init_fn: Callable):
    """Runs `init_fn()` (returning a pytree boxed with logical names) and
    returns it unboxed, each leaf already on its devices."""
    if self.mesh is None:
      return nn.unbox(jax.jit(init_fn)())
    abstract = jax.eval_shape(init_fn)
    return jax.jit(
      self._in_mesh(lambda: nn.unbox(init_fn())),
      out_shardings=self.shardings(abstract),
    )()

  def put_batch(self, batch: dict) -> dict:
    """Host NumPy batch (the same global batch in every process) -> arrays
    split over `batch`; unchanged on one device."""
    if self.mesh is None:
      return batch
    sharding = self.sharding(("batch",))
    return {
      k: jax.make_array_from_callback(
        np.shape(v), sharding, lambda index, v=v: np.asarray(v)[index]
      )
      for k, v in batch.items()
    }

  def jit_train_step(self, step_fn: Callable, state) -> Callable:
    """`step_fn(state, batch) -> (state, metrics)` jitted with the state
    donated; with a mesh, the state keeps the shardings it has, the batch is
    split over `batch` and the metrics are replicated."""
    if self.mesh is None:
      return jax.jit(step_fn, donate_argnums=0)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(
      self._in_mesh(step_fn),
      in_shardings=(state_shardings, self.sharding(("batch",))),
      out_shardings=(state_shardings, self.sharding(())),
      donate_argnums=0,
    )

  def jit_eval_step(self, eval_fn: Callable, variables) -> Callable:
    """`eval_fn(variables, batch) -> metrics`, jitted like `jit_train_step`
    (`variables`: any pytree of placed arrays, e.g. params and router
    state)."""
    if self.mesh is None:
      return jax.jit(eval_fn)
    return jax.jit(
      self._in_mesh(eval_fn),
      in_shardings=(
        jax.tree.map(lambda x: x.sharding, variables),
        self.sharding(("batch",)),
      ),
      out_shardings=self.sharding(()),
    )

  def abstract_init(self, init_fn: Callable):
    """ShapeDtypeStructs of what `init` would return, each with the sharding
    it would have: a restore template that allocates nothing."""
    abstract = jax.eval_shape(init_fn)
    if self.mesh is None:
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _: device, nn.unbox(abstract))
    else:
      shardings = self.shardings(abstract)
    return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nn.unbox(abstract),
      shardings,
    )
