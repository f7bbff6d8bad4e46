"""Flax linen modules of an MoE layer: parameters, RNG streams, one call each
into the pure math of `routing`, `dispatch` and `losses`.

Shapes (see `moe_jax.shapes`): tokens `[B, L, D]`, groups `[G, S, D]`, router
logits `[G, S, E]`, expert buffers `[E, G, C, D]`, expert weights `[E, D, F]`.

An `MoeLayer` replaces a transformer's feed-forward block:
  y_t = sum_e g_{t,e} FFN_e(x_t)
over the experts that token t was dispatched to (GShard §2.2, Switch Eq. 2);
the caller adds y to the residual stream, so a token whose experts are all
full passes through unchanged.

The layer returns y only. Its auxiliary losses are sown into the `aux_loss`
collection (`load_balancing_loss`, `router_z_loss`, unweighted) and its
routing metrics into `moe_metrics`; the trainer weights and logs them.
The routing decisions (`expert_index`, `gates`, `kept` as `[B, L, K]`) are
sown into `intermediates` for analysis.

RNG streams: `jitter` (router input noise), `routing` (GShard's random
second-choice policy), `dropout`.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import dispatch as dispatch_lib
from moe_jax import expert_parallel, losses, metrics, routing, shapes, sharding

ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _choice(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"unknown {name}={value!r}; allowed: {sorted(allowed)}.")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Everything an `MoeLayer` needs; see configs/base.py for the meanings."""

  num_experts: int = 8
  top_k: int = 1
  router: str = "switch"
  expert_dim: int = 512
  group_size: int = 512
  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  capacity_rule: str = "switch"
  min_capacity: int = 4
  priority: str = "k_major"
  second_policy: str = "all"
  second_threshold: float = 0.2
  renormalize_after_drop: bool = False
  dispatch: str = "indices"
  router_init_scale: float = 0.1
  router_jitter: float = 0.0
  router_bias: bool = False
  load_balancing: str = "switch"
  activation: str = "gelu"
  gated: bool = False
  dtype: str = "float32"
  # Used only under a device mesh; see moe_jax.expert_parallel.
  expert_parallel: str = "shard_map"

  def __post_init__(self):
    if self.num_experts < 1:
      raise ValueError(f"num_experts={self.num_experts} must be >= 1.")
    routing.gate_convention(self.router, self.top_k, self.num_experts)
    for factor in ("capacity_factor", "eval_capacity_factor"):
      if not getattr(self, factor) > 0:
        raise ValueError(
          f"{factor}={getattr(self, factor)} must be > 0 (1.0 = even share)."
        )
    _choice("capacity_rule", self.capacity_rule, routing.CAPACITY_RULES)
    _choice("priority", self.priority, routing.PRIORITIES)
    _choice("second_policy", self.second_policy, routing.SECOND_POLICIES)
    _choice("dispatch", self.dispatch, dispatch_lib.DISPATCHERS)
    _choice("load_balancing", self.load_balancing, losses.LOAD_BALANCING_LOSSES)
    _choice("activation", self.activation, ACTIVATIONS)
    _choice("dtype", self.dtype, DTYPES)
    _choice(
      "expert_parallel", self.expert_parallel, expert_parallel.IMPLEMENTATIONS
    )
    if self.router_jitter < 0 or self.router_jitter >= 1:
      raise ValueError(f"router_jitter={self.router_jitter} must be in [0, 1).")
    if self.expert_dim < 1 or self.group_size < 1 or self.min_capacity < 0:
      raise ValueError(
        f"expert_dim={self.expert_dim}, group_size={self.group_size} must be "
        f">= 1 and min_capacity={self.min_capacity} >= 0."
      )


class Router(nn.Module):
  """Router logits z = x W_r in float32, whatever the model dtype.

  Selective precision (Switch §2.4): the input is cast to float32 and the
  kernel is kept in float32. The kernel is drawn from a truncated normal with
  std sqrt(init_scale / D) (Switch §2.4: init_scale 0.1, a tenth of the
  usual). Multiplicative jitter x * U(1 - eps, 1 + eps) is applied to the
  router input in training only (Switch App. C, eps = 1e-2).
  """

  num_experts: int
  init_scale: float = 0.1
  jitter: float = 0.0
  use_bias: bool = False

  @nn.compact
  def __call__(self, x_GSD: jax.Array, *, deterministic: bool) -> jax.Array:
    x_GSD = x_GSD.astype(jnp.float32)
    if self.jitter > 0 and not deterministic:
      noise_GSD = jax.random.uniform(
        self.make_rng("jitter"),
        x_GSD.shape,
        jnp.float32,
        1.0 - self.jitter,
        1.0 + self.jitter,
      )
      x_GSD = x_GSD * noise_GSD
    init = nn.initializers.variance_scaling(
      self.init_scale, "fan_in", "truncated_normal"
    )
    kernel_DE = self.param(
      "kernel", init, (x_GSD.shape[-1], self.num_experts), jnp.float32
    )
    logits_GSE = jnp.einsum(
      "gsd,de->gse", x_GSD, kernel_DE, preferred_element_type=jnp.float32
    )
    if self.use_bias:
      bias_E = self.param(
        "bias", nn.initializers.zeros, (self.num_experts,), jnp.float32
      )
      logits_GSE = logits_GSE + bias_E
    return logits_GSE


def _ffn_init(batch_axis=()):
  return nn.initializers.variance_scaling(
    1.0,
    "fan_in",
    "truncated_normal",
    in_axis=-2,
    out_axis=-1,
    batch_axis=batch_axis,
  )


_EDF_INIT = nn.with_logical_partitioning(
  _ffn_init((0,)), ("expert", "embed", "mlp")
)
_EFD_INIT = nn.with_logical_partitioning(
  _ffn_init((0,)), ("expert", "mlp", "embed")
)


class Experts(nn.Module):
  """E feed-forward networks, stacked weights wi `[E, D, F]`, wo `[E, F, D]`.

  FFN_e(x) = act(x wi_e) wo_e, or (act(x wi_e) * (x wi_gate_e)) wo_e when
  gated (GLU variants, Shazeer 2020). The weights carry the logical axis
  names of `moe_jax.sharding`: E "expert", D "embed", F "mlp".
  """

  num_experts: int
  expert_dim: int
  activation: str = "gelu"
  gated: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_EGCD: jax.Array) -> jax.Array:
    E, D, F = self.num_experts, x_EGCD.shape[-1], self.expert_dim
    wi_EDF = self.param("wi", _EDF_INIT, (E, D, F), jnp.float32)
    h_EGCF = jnp.einsum("egcd,edf->egcf", x_EGCD, wi_EDF.astype(self.dtype))
    h_EGCF = ACTIVATIONS[self.activation](h_EGCF)
    if self.gated:
      gate_EDF = self.param("wi_gate", _EDF_INIT, (E, D, F), jnp.float32)
      h_EGCF = h_EGCF * jnp.einsum(
        "egcd,edf->egcf", x_EGCD, gate_EDF.astype(self.dtype)
      )
    wo_EFD = self.param("wo", _EFD_INIT, (E, F, D), jnp.float32)
    return jnp.einsum("egcf,efd->egcd", h_EGCF, wo_EFD.astype(self.dtype))


class MlpBlock(nn.Module):
  """The dense feed-forward block: act(x wi) wo, optionally gated."""

  mlp_dim: int
  activation: str = "gelu"
  gated: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    D, F = x_BLD.shape[-1], self.mlp_dim
    wi_DF = self.param("wi", _ffn_init(), (D, F), jnp.float32)
    h_BLF = ACTIVATIONS[self.activation](x_BLD @ wi_DF.astype(self.dtype))
    if self.gated:
      gate_DF = self.param("wi_gate", _ffn_init(), (D, F), jnp.float32)
      h_BLF = h_BLF * (x_BLD @ gate_DF.astype(self.dtype))
    wo_FD = self.param("wo", _ffn_init(), (F, D), jnp.float32)
    return h_BLF @ wo_FD.astype(self.dtype)


class MoeLayer(nn.Module):
  """Router + capacity-limited dispatch + experts + combine."""

  config: MoeConfig

  @nn.compact
  def __call__(
    self,
    x_BLD: jax.Array,
    padding_mask_BL: jax.Array | None = None,
    *,
    deterministic: bool,
  ) -> jax.Array:
    cfg = self.config
    B, L, _ = x_BLD.shape
    E, K = cfg.num_experts, cfg.top_k
    if padding_mask_BL is None:
      padding_mask_BL = jnp.ones((B, L), bool)
    x_GSD = shapes.to_groups(x_BLD, cfg.group_size)
    mask_GS = shapes.to_groups(padding_mask_BL.astype(bool), cfg.group_size)
    S = x_GSD.shape[1]

    logits_GSE = Router(
      E,
      cfg.router_init_scale,
      cfg.router_jitter,
      cfg.router_bias,
      name="router",
    )(x_GSD, deterministic=deterministic)

    factor = cfg.eval_capacity_factor if deterministic else cfg.capacity_factor
    capacity = routing.compute_capacity(
      S, E, K, factor, cfg.capacity_rule, cfg.min_capacity
    )
    # GShard's random policy is a training-time regulariser.
    policy = cfg.second_policy
    if deterministic and policy == "random":
      policy = "all"
    route = routing.route_tokens(
      logits_GSE,
      router=cfg.router,
      top_k=K,
      capacity=capacity,
      priority=cfg.priority,
      second_policy=policy,
      second_threshold=cfg.second_threshold,
      renormalize_after_drop=cfg.renormalize_after_drop,
      padding_mask_GS=mask_GS,
      rng=self.make_rng("routing") if policy == "random" else None,
    )

    dtype = DTYPES[cfg.dtype]
    experts = Experts(
      E, cfg.expert_dim, cfg.activation, cfg.gated, dtype, name="experts"
    )
    if sharding.active_mesh() is None:
      x_EGCD, combine_GSEC = dispatch_lib.dispatch(
        x_GSD.astype(dtype), route, E, capacity, cfg.dispatch
      )
      y_EGCD = experts(x_EGCD)
      y_GSD = dispatch_lib.combine(
        y_EGCD, route, E, capacity, cfg.dispatch, combine_GSEC
      )
    else:  # experts split over the mesh's `expert` axis
      y_GSD = expert_parallel.moe_ffn(
        x_GSD.astype(dtype),
        route,
        experts,
        num_experts=E,
        expert_dim=cfg.expert_dim,
        capacity=capacity,
        backend=cfg.dispatch,
        implementation=cfg.expert_parallel,
      )

    balance_fn = losses.LOAD_BALANCING_LOSSES[cfg.load_balancing]
    self.sow(
      "aux_loss",
      "load_balancing_loss",
      balance_fn(route.probs_GSE, route.expert_index_GSK, mask_GS),
    )
    self.sow(
      "aux_loss", "router_z_loss", losses.router_z_loss(logits_GSE, mask_GS)
    )
    for name, value in metrics.routing_metrics(route, mask_GS).items():
      self.sow("moe_metrics", name, value)
    self.sow("moe_metrics", "capacity", jnp.asarray(capacity, jnp.float32))
    for name in ("expert_index", "gates", "kept"):
      value_GSK = getattr(route, f"{name}_GSK")
      self.sow("intermediates", name, shapes.from_groups(value_GSK, B, L))
    return shapes.from_groups(y_GSD, B, L).astype(x_BLD.dtype)
