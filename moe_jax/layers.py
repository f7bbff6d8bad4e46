"""Flax linen modules of an MoE layer: parameters, RNG streams, one call each
into the pure math of `routing`, `dispatch` and `losses`.

Shapes (see `moe_jax.shapes`): tokens `[B, L, D]`, groups `[G, S, D]`, router
logits `[G, S, E]`, expert buffers `[E, G, C, D]` or rows sorted by expert
`[N, D]` (dropless), expert weights `[E, D, F]`.

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
from moe_jax import grouped_matmul as grouped_matmul_lib
from moe_jax import losses, metrics, routing, shapes

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
  grouped_matmul: str = "auto"
  tile_size: int = 0
  router_init_scale: float = 0.1
  router_jitter: float = 0.0
  router_bias: bool = False
  load_balancing: str = "switch"
  activation: str = "gelu"
  gated: bool = False
  dtype: str = "float32"

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
    _choice(
      "grouped_matmul", self.grouped_matmul, grouped_matmul_lib.IMPLEMENTATIONS
    )
    if self.tile_size < 0:
      raise ValueError(
        f"tile_size={self.tile_size} must be >= 0 (0 = chosen from N and E)."
      )
    _choice("load_balancing", self.load_balancing, losses.LOAD_BALANCING_LOSSES)
    _choice("activation", self.activation, ACTIVATIONS)
    _choice("dtype", self.dtype, DTYPES)
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


class Experts(nn.Module):
  """E feed-forward networks, stacked weights wi `[E, D, F]`, wo `[E, F, D]`.

  FFN_e(x) = act(x wi_e) wo_e, or (act(x wi_e) * (x wi_gate_e)) wo_e when
  gated (GLU variants, Shazeer 2020).

  Two layouts of the same parameters, so a checkpoint serves every dispatch
  backend: expert buffers x_EGCD (each expert's slots, einsum over E), or,
  given `group_sizes_E`, rows x_ND sorted by expert, each row through its
  own expert by a grouped matmul (`moe_jax.grouped_matmul`).
  """

  num_experts: int
  expert_dim: int
  activation: str = "gelu"
  gated: bool = False
  dtype: jnp.dtype = jnp.float32
  grouped_matmul: str = "auto"
  tile_size: int = 0  # 0: grouped_matmul.default_tile_size

  @nn.compact
  def __call__(
    self, x: jax.Array, group_sizes_E: jax.Array | None = None
  ) -> jax.Array:
    """y_EGCD from x_EGCD, or y_ND from x_ND and group_sizes_E."""
    E, D, F = self.num_experts, x.shape[-1], self.expert_dim
    if group_sizes_E is None:

      def matmul(h, w_EDF):  # h_EGCD @ w_EDF -> EGCF
        return jnp.einsum("egcd,edf->egcf", h, w_EDF.astype(self.dtype))

    else:
      implementation = grouped_matmul_lib.resolve_implementation(
        self.grouped_matmul
      )

      def matmul(h, w_EDF):  # row n of h_ND times w of its expert
        # The CPU tiles multiply in float32 whatever the dtype: casting the
        # [E, D, F] weights down and their gradients back would only add
        # passes over E times the dense weights.
        if implementation == "ragged_dot":
          w_EDF = w_EDF.astype(self.dtype)
        return grouped_matmul_lib.grouped_matmul(
          h,
          w_EDF,
          group_sizes_E,
          implementation=implementation,
          tile_size=self.tile_size or None,
        )

    wi_EDF = self.param("wi", _ffn_init((0,)), (E, D, F), jnp.float32)
    h = ACTIVATIONS[self.activation](matmul(x, wi_EDF))
    if self.gated:
      gate_EDF = self.param("wi_gate", _ffn_init((0,)), (E, D, F), jnp.float32)
      h = h * matmul(x, gate_EDF)
    wo_EFD = self.param("wo", _ffn_init((0,)), (E, F, D), jnp.float32)
    return matmul(h, wo_EFD)


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
  """Router + dispatch + experts + combine.

  With `dispatch="dropless"` the routing has no capacity limit (C = S, so
  no pair is dropped, in training and evaluation alike; the capacity
  factors are unused) and the experts run as one grouped matmul over the
  pairs sorted by expert. "einsum" and "indices" drop the pairs past C.
  """

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
    if cfg.dispatch == "dropless":
      capacity = S  # an expert gets at most one pair per token: no drops
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
    x_expert, context = dispatch_lib.dispatch(
      x_GSD.astype(dtype), route, E, capacity, cfg.dispatch
    )
    experts = Experts(
      E,
      cfg.expert_dim,
      cfg.activation,
      cfg.gated,
      dtype,
      cfg.grouped_matmul,
      cfg.tile_size,
      name="experts",
    )
    if cfg.dispatch == "dropless":
      y_expert = experts(x_expert, context.group_sizes_E)
    else:
      y_expert = experts(x_expert)
    y_GSD = dispatch_lib.combine(
      y_expert, route, E, capacity, cfg.dispatch, context
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
