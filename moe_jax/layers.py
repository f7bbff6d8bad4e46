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

The router is chosen by name (`MoeConfig.router`, see
`routing.ROUTING_SCHEMES`); `_ROUTE_FAMILIES` maps each family to the one
pure routing function it calls, and every family returns a `routing.Routing`,
so dispatch, experts and combine are shared.

The layer returns y only. Its auxiliary losses are sown into the `aux_loss`
collection, unweighted, under names the trainer looks up as
`config.loss.<name>_weight`: `load_balancing_loss` (learned tokens-choose
routers), `router_z_loss` (every learned router), `importance_loss`,
`load_loss` (the noisy routers) and `sequence_balance_loss` (DeepSeek).
Non-learned routers sow none. Routing
metrics go to `moe_metrics` (learned routers add `router_logit_max_abs` and
`router_logsumexp` of their logits); the routing decisions (`expert_index`,
`gates`, `kept` as `[B, L, K]`) and the router's logits (`router_logits`;
for noisy routers also `noisy_logits` and `noise_std`, `[B, L, E]`) to
`intermediates` for analysis.

The DeepSeek router keeps its balancing bias b `[E]` in the variable
collection `router_state` (not `params`: no gradient, no optimizer). A
training call with `router_state` mutable moves b by `bias_update_rate`
against the batch's load (`deepseek.bias_update`); the routing of that
call used the old b.

`num_shared_experts` > 0 adds always-active experts beside the routed ones,
for any router (DeepSeek-V3 Eq. 12): the layer returns
sum_s FFN_s(x) + sum_e g_e FFN_e(x).

RNG streams: `jitter` (router input noise), `routing` (GShard's random
second-choice policy, the noise of noisy routers, random routing), `dropout`.
"""

import dataclasses
import functools
import warnings
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import (
  deepseek,
  errors,
  expert_parallel,
  losses,
  metrics,
  routing,
  shapes,
  sharding,
)
from moe_jax import dispatch as dispatch_lib
from moe_jax import grouped_matmul as grouped_matmul_lib

ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _choice(name, value, allowed):
  if value not in allowed:
    raise errors.ConfigError(
      f"unknown {name}={value!r}; allowed: {sorted(allowed)}."
    )


_NONCAUSAL_ERRORS = {
  "expert_choice": (
    "router='expert_choice' is not causal: each expert takes the top-C "
    "tokens of a whole group, so whether token t is processed depends on the "
    "scores of later tokens, and a decoder can read the future through its "
    "routing (flaxformer: expert choice 'should not be used in decoder "
    "blocks'; Wang et al. 2024 §5.2 measure the leak). Set "
    "model.moe.allow_noncausal=True to train with it anyway, and evaluate "
    "causally with model.moe.eval_router='top_k' (tokens choose on the same "
    "scores)."
  ),
  "sinkhorn": (
    "router='sinkhorn' is not causal in training: Sinkhorn balancing scales "
    "each expert's column over the whole group, so a token's expert depends "
    "on later tokens' logits and a decoder can read the future through its "
    "routing. Evaluation is greedy and causal (Megatron-LM). Set "
    "model.moe.allow_noncausal=True to train with it anyway."
  ),
}


# Learned routers whose scores are not the softmax of `router_dtype`.
_FLOAT32_SCORES = ("sinkhorn", "deepseek")


class NoncausalRoutingWarning(UserWarning):
  """A capacity drop order that lets later tokens decide earlier drops."""


# Families whose drops follow `MoeConfig.priority`.
_PRIORITY_FAMILIES = ("tokens_choose", "noisy_top_k", "vmoe", "sinkhorn")
_PRIORITY_FAMILIES += ("hash", "random")


def _drop_order_leak(key: str, priority: str, top_k: int) -> str:
  """Why drop order `priority` (config key `key`) is not causal, or ''."""
  if priority == "batch_priority":
    return (
      f"{key}='batch_priority' ranks the tokens of a group by their top "
      "gate (V-MoE), so whether token t keeps its expert depends on later "
      "tokens' scores"
    )
  if priority == "k_major" and top_k >= 2:
    return (
      f"{key}='k_major' at top_k={top_k} places every first choice of a "
      "group before any second choice, so later tokens' first choices "
      "decide whether an earlier token keeps its second expert"
    )
  return ""


def _noncausal_priority(config) -> tuple[str, str]:
  """Why `config`'s drop order is not causal in a decoder, in training and
  at evaluation (where `eval_router` and `eval_priority` apply); '' where
  it is."""
  if config.dispatch == "dropless":
    return "", ""  # nothing is dropped
  family = routing.ROUTING_SCHEMES[config.router].family
  train_reason = eval_reason = ""
  if family in _PRIORITY_FAMILIES:
    train_reason = _drop_order_leak("priority", config.priority, config.top_k)
  if config.eval_router or family in _PRIORITY_FAMILIES:
    key = "eval_priority" if config.eval_priority else "priority"
    eval_priority = config.eval_priority or config.priority
    eval_reason = _drop_order_leak(key, eval_priority, config.top_k)
    if eval_reason and key == "priority":
      eval_reason += " (priority applies at evaluation too: eval_priority='')"
  return train_reason, eval_reason


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
  eval_priority: str = ""  # "": priority
  second_policy: str = "all"
  second_threshold: float = 0.2
  second_choice_counting: str = "kept_only"
  renormalize_after_drop: bool = False
  dispatch: str = "indices"
  grouped_matmul: str = "auto"
  tile_size: int = 0
  router_init_scale: float = 0.1
  router_jitter: float = 0.0
  router_bias: bool = False
  router_dtype: str = "float32"
  load_balancing: str = "switch"
  activation: str = "gelu"
  gated: bool = False
  dtype: str = "float32"
  # Used only under a device mesh; see moe_jax.expert_parallel.
  expert_parallel: str = "shard_map"
  eval_router: str = ""
  allow_noncausal: bool = False
  router_noise_std: float = 1.0
  routing_seed: int = 0
  # DeepSeek-V3 (router="deepseek"); see moe_jax.deepseek.
  bias_update_rate: float = 1e-3
  num_expert_groups: int = 1
  top_expert_groups: int = 1
  expert_group_score_k: int = 2
  routed_scaling_factor: float = 1.0
  # P of the sequence-wise balance loss: losses.SEQUENCE_BALANCE_FORMS.
  sequence_balance_form: str = "deepseek_v3"
  # Always-active shared experts, for any router (0: none; width 0:
  # expert_dim).
  num_shared_experts: int = 0
  shared_expert_dim: int = 0
  # Dropout on the experts' hidden activations in training (Switch §4).
  expert_dropout_rate: float = 0.0

  def __post_init__(self):
    # Every ValueError of the checks (also those of routing and deepseek)
    # is a mistake in the configuration.
    with errors.config_errors():
      self._validate()

  def _validate(self):
    errors.check_field_types(self)
    if self.num_experts < 1:
      raise ValueError(f"num_experts={self.num_experts} must be >= 1.")
    scheme = routing.routing_scheme(self.router, self.top_k, self.num_experts)
    self._check_deepseek()
    if self.eval_router:
      if self.eval_router not in routing.ROUTERS or not scheme.learned:
        raise ValueError(
          f"eval_router={self.eval_router!r} (with router={self.router!r}): "
          "use '' to route as in training or, for a learned router, a "
          "tokens-choose rule applied to its logits: "
          f"{sorted(routing.ROUTERS)}."
        )
      routing.gate_convention(self.eval_router, self.top_k, self.num_experts)
    if self.dispatch == "dropless" and scheme.family == "expert_choice":
      raise ValueError(
        "dispatch='dropless' with router='expert_choice': expert choice has "
        "no drops to remove (each expert takes exactly C tokens) and with "
        "C = S every expert would take every token. Use dispatch='indices' "
        "or 'einsum' with expert choice."
      )
    if not scheme.causal and not self.allow_noncausal:
      raise ValueError(_NONCAUSAL_ERRORS[self.router])
    if self.eval_priority:
      _choice("eval_priority", self.eval_priority, routing.PRIORITIES)
    train_reason, eval_reason = _noncausal_priority(self)
    if (train_reason or eval_reason) and not self.allow_noncausal:
      warnings.warn(
        f"{train_reason or eval_reason}: a decoder can read the future "
        "through its drops (a second-order leak beside expert choice's). "
        "Use priority='token_major' (eval_priority='token_major' at "
        "evaluation only) or dispatch='dropless' for a causal decoder, or "
        "set allow_noncausal=True to keep this order (the paper's) and "
        "silence this warning.",
        NoncausalRoutingWarning,
        stacklevel=3,
      )
    elif eval_reason and self.eval_router:
      # allow_noncausal accepts a leaking training router; the eval router
      # is there for a causal evaluation, so its drop order still warns.
      warnings.warn(
        f"eval_router={self.eval_router!r} routes tokens-choose for a "
        f"causal evaluation, but {eval_reason}: the evaluation reads the "
        "future through its drops. Set eval_priority='token_major'.",
        NoncausalRoutingWarning,
        stacklevel=3,
      )
    if self.router_init_scale < 0 or not self.router_noise_std > 0:
      raise ValueError(
        f"router_init_scale={self.router_init_scale} must be >= 0 (0: zero "
        f"init) and router_noise_std={self.router_noise_std} > 0."
      )
    for factor in ("capacity_factor", "eval_capacity_factor"):
      if not getattr(self, factor) > 0:
        raise ValueError(
          f"{factor}={getattr(self, factor)} must be > 0 (1.0 = even share)."
        )
    _choice("capacity_rule", self.capacity_rule, routing.CAPACITY_RULES)
    _choice("priority", self.priority, routing.PRIORITIES)
    _choice("second_policy", self.second_policy, routing.SECOND_POLICIES)
    _choice(
      "second_choice_counting",
      self.second_choice_counting,
      routing.SECOND_CHOICE_COUNTINGS,
    )
    _choice("router_dtype", self.router_dtype, DTYPES)
    if self.router_dtype != "float32" and scheme.family in _FLOAT32_SCORES:
      raise ValueError(
        f"router_dtype={self.router_dtype!r} with router={self.router!r}: "
        "the bfloat16 router emulates a softmax router without selective "
        f"precision; {self.router!r} scores with its own float32 function "
        "(Sinkhorn, sigmoid). Use router_dtype='float32' or a softmax "
        "router."
      )
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
    _choice(
      "expert_parallel", self.expert_parallel, expert_parallel.IMPLEMENTATIONS
    )
    if not 0.0 <= self.expert_dropout_rate < 1.0:
      raise ValueError(
        f"expert_dropout_rate={self.expert_dropout_rate} must be in [0, 1) "
        "(0: no dropout inside the experts)."
      )
    if self.router_jitter < 0 or self.router_jitter >= 1:
      raise ValueError(f"router_jitter={self.router_jitter} must be in [0, 1).")
    if self.expert_dim < 1 or self.group_size < 1 or self.min_capacity < 0:
      raise ValueError(
        f"expert_dim={self.expert_dim}, group_size={self.group_size} must be "
        f">= 1 and min_capacity={self.min_capacity} >= 0."
      )

  def _check_deepseek(self):
    if self.router == "deepseek":
      deepseek.check_expert_groups(
        self.num_experts,
        self.top_k,
        self.num_expert_groups,
        self.top_expert_groups,
        self.expert_group_score_k,
      )
    elif (self.num_expert_groups, self.top_expert_groups) != (1, 1):
      raise ValueError(
        f"num_expert_groups={self.num_expert_groups}, top_expert_groups="
        f"{self.top_expert_groups}: group-limited routing needs "
        f"router='deepseek' (got router={self.router!r}); use 1 and 1."
      )
    _choice(
      "sequence_balance_form",
      self.sequence_balance_form,
      losses.SEQUENCE_BALANCE_FORMS,
    )
    if self.router != "deepseek" and self.sequence_balance_form != (
      "deepseek_v3"
    ):
      raise ValueError(
        f"sequence_balance_form={self.sequence_balance_form!r} chooses the "
        "sequence-wise balance loss of router='deepseek', which router="
        f"{self.router!r} does not sow; leave it at 'deepseek_v3'."
      )
    if not self.routed_scaling_factor > 0 or self.bias_update_rate < 0:
      raise ValueError(
        f"routed_scaling_factor={self.routed_scaling_factor} must be > 0 "
        f"and bias_update_rate={self.bias_update_rate} >= 0 (0: no bias "
        "balancing)."
      )
    if self.num_shared_experts < 0 or self.shared_expert_dim < 0:
      raise ValueError(
        f"num_shared_experts={self.num_shared_experts} and "
        f"shared_expert_dim={self.shared_expert_dim} must be >= 0 "
        "(shared_expert_dim 0: expert_dim)."
      )


class Router(nn.Module):
  """Router logits z = x W_r (Switch Eq. 1), in float32 by default, whatever
  the model dtype.

  Selective precision (Switch §2.4): the input is cast to float32 and the
  kernel is kept in float32. `dtype=jnp.bfloat16` turns it off, as in the
  bfloat16 row of Switch Table 2 and flaxformer's default `RouterWeights`:
  the input and the kernel are cast to bfloat16 and the dot returns bfloat16
  logits (the parameters stay float32). The kernel is drawn from a truncated
  normal with std sqrt(init_scale / D) (Switch §2.4: init_scale 0.1, a tenth
  of the usual); init_scale 0 gives a zero kernel (Shazeer 2017 App. A).
  Multiplicative jitter x * U(1 - eps, 1 + eps) is applied to the float32
  router input in training only (Switch App. C, eps = 1e-2).
  """

  num_experts: int
  init_scale: float = 0.1
  jitter: float = 0.0
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_GSD: jax.Array, *, deterministic: bool) -> jax.Array:
    if self.dtype not in routing.SOFTMAX_DTYPES:
      raise ValueError(
        f"Router dtype={self.dtype!r}; allowed: jnp.float32, jnp.bfloat16."
      )
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
      "gsd,de->gse",
      x_GSD.astype(self.dtype),
      kernel_DE.astype(self.dtype),
      preferred_element_type=self.dtype,
    )
    if self.use_bias:
      bias_E = self.param(
        "bias", nn.initializers.zeros, (self.num_experts,), jnp.float32
      )
      logits_GSE = logits_GSE + bias_E.astype(self.dtype)
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

  Two layouts of the same parameters, so a checkpoint serves every dispatch
  backend: expert buffers x_EGCD (each expert's slots, einsum over E), or,
  given `group_sizes_E`, rows x_ND sorted by expert, each row through its
  own expert by a grouped matmul (`moe_jax.grouped_matmul`).

  Expert dropout (Switch §4, Table 4: rate 0.4 inside the experts, 0.1
  elsewhere, for fine-tuning): with `dropout_rate` > 0 and
  `deterministic=False`, the hidden activations h (after the activation and
  the gate product, before wo) are dropped elementwise, each kept one scaled
  by 1 / (1 - rate) (inverted dropout, `nn.Dropout`, rng stream "dropout").
  The same code serves both layouts, so every dispatch backend ("einsum",
  "indices", "dropless" and the expert-parallel mesh, which calls this module
  on the global buffers) applies it; an empty slot stays zero.
  """

  num_experts: int
  expert_dim: int
  activation: str = "gelu"
  gated: bool = False
  dtype: jnp.dtype = jnp.float32
  grouped_matmul: str = "auto"
  tile_size: int = 0  # 0: grouped_matmul.default_tile_size
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    group_sizes_E: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> jax.Array:
    """y_EGCD from x_EGCD, or y_ND from x_ND and group_sizes_E; dropout
    on the hidden units only when `deterministic` is False."""
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

    wi_EDF = self.param("wi", _EDF_INIT, (E, D, F), jnp.float32)
    h = ACTIVATIONS[self.activation](matmul(x, wi_EDF))
    if self.gated:
      gate_EDF = self.param("wi_gate", _EDF_INIT, (E, D, F), jnp.float32)
      h = h * matmul(x, gate_EDF)
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    wo_EFD = self.param("wo", _EFD_INIT, (E, F, D), jnp.float32)
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


class _Inputs(NamedTuple):
  """What every routing family sees."""

  x_GSD: jax.Array
  mask_GS: jax.Array
  token_ids_GS: jax.Array | None
  capacity: int
  deterministic: bool
  priority: str  # drop order of this call: eval_priority or priority
  batch_length: tuple[int, int]  # (B, L), to sow intermediates as [B, L, E]


def _sow_BLE(layer, inputs, name, value_GSE):
  value_BLE = shapes.from_groups(value_GSE, *inputs.batch_length)
  layer.sow("intermediates", name, value_BLE)


def _tokens_choose(layer, inputs, logits_GSE, router=None):
  """Tokens choose top-K under a gate convention of `routing.ROUTERS`."""
  cfg = layer.config
  policy = cfg.second_policy
  if inputs.deterministic and policy == "random":
    policy = "all"  # GShard's random policy is a training-time regulariser.
  route = routing.route_tokens(
    logits_GSE,
    router=router or cfg.router,
    top_k=cfg.top_k,
    capacity=inputs.capacity,
    priority=inputs.priority,
    second_policy=policy,
    second_threshold=cfg.second_threshold,
    second_choice_counting=cfg.second_choice_counting,
    renormalize_after_drop=cfg.renormalize_after_drop,
    padding_mask_GS=inputs.mask_GS,
    rng=layer.make_rng("routing") if policy == "random" else None,
    softmax_dtype=DTYPES[cfg.router_dtype],
  )
  balance_fn = losses.LOAD_BALANCING_LOSSES[cfg.load_balancing]
  loss = balance_fn(route.probs_GSE, route.expert_index_GSK, inputs.mask_GS)
  return route, {"load_balancing_loss": loss}


def _noisy_route(layer, inputs, logits_GSE, noise_std_GSE):
  """Tokens choose on the noisy logits H (noise in training only)."""
  normal_GSE = None
  if not inputs.deterministic:
    normal_GSE = jax.random.normal(layer.make_rng("routing"), logits_GSE.shape)
  noisy_GSE = routing.noisy_logits(logits_GSE, noise_std_GSE, normal_GSE)
  _sow_BLE(layer, inputs, "noisy_logits", noisy_GSE)
  std_GSE = jnp.broadcast_to(noise_std_GSE, logits_GSE.shape)
  _sow_BLE(layer, inputs, "noise_std", std_GSE)
  gate = routing.NOISY_GATES[layer.config.router]
  route, aux = _tokens_choose(layer, inputs, noisy_GSE, router=gate)
  return route, aux, noisy_GSE


def _noisy_top_k(layer, inputs, logits_GSE):
  """Shazeer 2017 Eqs. 3-5 gating with Eqs. 6-11 losses."""
  cfg = layer.config
  # Shazeer App. A: W_noise starts at zero. It sees the un-jittered input.
  noise_logits_GSE = Router(
    cfg.num_experts,
    init_scale=0.0,
    dtype=DTYPES[cfg.router_dtype],
    name="noise",
  )(inputs.x_GSD, deterministic=inputs.deterministic)
  std_GSE = routing.shazeer_noise_std(noise_logits_GSE)
  route, aux, noisy_GSE = _noisy_route(layer, inputs, logits_GSE, std_GSE)
  K, mask_GS = cfg.top_k, inputs.mask_GS
  aux["importance_loss"] = losses.shazeer_importance_loss(noisy_GSE, K, mask_GS)
  aux["load_loss"] = losses.shazeer_load_loss(
    logits_GSE, noisy_GSE, std_GSE, K, mask_GS
  )
  return route, aux


def _vmoe(layer, inputs, logits_GSE):
  """V-MoE: fixed noise std noise_std / E, importance and load losses."""
  cfg = layer.config
  std = routing.vmoe_noise_std(cfg.router_noise_std, cfg.num_experts)
  route, aux, noisy_GSE = _noisy_route(layer, inputs, logits_GSE, std)
  K, mask_GS = cfg.top_k, inputs.mask_GS
  aux["importance_loss"] = losses.vmoe_importance_loss(logits_GSE, mask_GS)
  aux["load_loss"] = losses.vmoe_load_loss(
    logits_GSE, noisy_GSE, std, K, mask_GS
  )
  return route, aux


def _expert_choice(layer, inputs, logits_GSE):
  route = routing.expert_choice_route(
    logits_GSE,
    inputs.capacity,
    inputs.mask_GS,
    softmax_dtype=DTYPES[layer.config.router_dtype],
  )
  return route, {}


def _soft_mixture(layer, inputs, logits_GSE):
  route = routing.soft_mixture_route(
    logits_GSE,
    inputs.mask_GS,
    softmax_dtype=DTYPES[layer.config.router_dtype],
  )
  return route, {}


def _sinkhorn(layer, inputs, logits_GSE):
  cfg = layer.config
  route = routing.sinkhorn_route(
    logits_GSE,
    top_k=cfg.top_k,
    capacity=inputs.capacity,
    balanced=not inputs.deterministic,
    priority=inputs.priority,
    padding_mask_GS=inputs.mask_GS,
  )
  return route, {}


def _hash(layer, inputs):
  cfg = layer.config
  if inputs.token_ids_GS is None:
    raise ValueError(
      "router='hash' routes by token id: call MoeLayer with token_ids_BL "
      "(TransformerLM passes its input tokens)."
    )
  route = routing.hash_route(
    inputs.token_ids_GS,
    cfg.num_experts,
    top_k=cfg.top_k,
    capacity=inputs.capacity,
    seed=cfg.routing_seed,
    priority=inputs.priority,
    padding_mask_GS=inputs.mask_GS,
  )
  return route, {}


def _random(layer, inputs):
  cfg = layer.config
  if inputs.deterministic:  # a fixed seeded choice at evaluation
    rng = jax.random.key(cfg.routing_seed)
  else:  # a fresh choice every training step
    rng = layer.make_rng("routing")
  route = routing.random_route(
    rng,
    cfg.num_experts,
    top_k=cfg.top_k,
    capacity=inputs.capacity,
    padding_mask_GS=inputs.mask_GS,
    priority=inputs.priority,
  )
  return route, {}


def _deepseek(layer, inputs, logits_GSE):
  """DeepSeek-V3: sigmoid scores, TopK(s + b) within the kept expert groups,
  normalised unbiased gates; b lives in `router_state` and moves after each
  training call; the sequence-wise balance loss in the form
  `sequence_balance_form`; the choice counts and MaxVio before and after b.
  """
  cfg = layer.config
  E, (B, L) = cfg.num_experts, inputs.batch_length
  if not (
    layer.is_initializing() or layer.has_variable("router_state", "bias")
  ):
    raise ValueError(
      "router='deepseek' keeps its balancing bias in the 'router_state' "
      "collection: apply the model with {'params': state.params, "
      "'router_state': state.router_state}."
    )
  bias = layer.variable("router_state", "bias", jnp.zeros, (E,), jnp.float32)
  route, unbiased_index_GSK = deepseek.deepseek_route(
    logits_GSE,
    bias.value,
    top_k=cfg.top_k,
    capacity=inputs.capacity,
    num_groups=cfg.num_expert_groups,
    top_groups=cfg.top_expert_groups,
    group_score_k=cfg.expert_group_score_k,
    routed_scaling_factor=cfg.routed_scaling_factor,
    priority=inputs.priority,
    padding_mask_GS=inputs.mask_GS,
  )
  load_E = deepseek.expert_load(route.expert_index_GSK, E, inputs.mask_GS)
  unbiased_load_E = deepseek.expert_load(unbiased_index_GSK, E, inputs.mask_GS)
  # The counts travel too, so evaluation can pool them over its batches
  # (MaxVio_global, `metrics.pool_batches`).
  for when, load in (("before", unbiased_load_E), ("after", load_E)):
    layer.sow("moe_metrics", f"expert_counts_{when}_bias", load)
    layer.sow(
      "moe_metrics",
      f"max_violation_{when}_bias",
      deepseek.max_violation(load),
    )
  updating = not inputs.deterministic and not layer.is_initializing()
  if updating and layer.is_mutable_collection("router_state"):
    bias.value = deepseek.bias_update(bias.value, load_E, cfg.bias_update_rate)
  # The loss's scope is a sequence: back from groups to [B, L] rows. It
  # reads the raw scores s; the "deepseek_v3" form normalises them.
  loss = losses.sequence_balance_loss(
    shapes.from_groups(deepseek.sigmoid_scores(logits_GSE), B, L),
    shapes.from_groups(route.expert_index_GSK, B, L),
    shapes.from_groups(inputs.mask_GS, B, L),
    form=cfg.sequence_balance_form,
  )
  return route, {"sequence_balance_loss": loss}


# family -> (layer, inputs[, logits]) -> (Routing, unweighted aux losses).
_ROUTE_FAMILIES = {
  "tokens_choose": _tokens_choose,
  "noisy_top_k": _noisy_top_k,
  "vmoe": _vmoe,
  "expert_choice": _expert_choice,
  "soft_mixture": _soft_mixture,
  "sinkhorn": _sinkhorn,
  "deepseek": _deepseek,
  "hash": _hash,
  "random": _random,
}


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
    token_ids_BL: jax.Array | None = None,
  ) -> jax.Array:
    cfg = self.config
    B, L, _ = x_BLD.shape
    E, K = cfg.num_experts, cfg.top_k
    if padding_mask_BL is None:
      padding_mask_BL = jnp.ones((B, L), bool)
    x_GSD = shapes.to_groups(x_BLD, cfg.group_size)
    mask_GS = shapes.to_groups(padding_mask_BL.astype(bool), cfg.group_size)
    token_ids_GS = None
    if token_ids_BL is not None:
      token_ids_GS = shapes.to_groups(token_ids_BL, cfg.group_size)
    S = x_GSD.shape[1]

    factor = cfg.eval_capacity_factor if deterministic else cfg.capacity_factor
    capacity = routing.compute_capacity(
      S, E, K, factor, cfg.capacity_rule, cfg.min_capacity
    )
    if cfg.router == "soft_mixture" or cfg.dispatch == "dropless":
      # soft mixture: every expert takes every token; dropless: an expert
      # gets at most one pair per token, so C = S drops nothing.
      capacity = S
    priority = cfg.priority
    if deterministic and cfg.eval_priority:
      priority = cfg.eval_priority
    inputs = _Inputs(
      x_GSD, mask_GS, token_ids_GS, capacity, deterministic, priority, (B, L)
    )
    route, aux_losses = self._route(inputs)

    dtype = DTYPES[cfg.dtype]
    experts = Experts(
      E,
      cfg.expert_dim,
      cfg.activation,
      cfg.gated,
      dtype,
      cfg.grouped_matmul,
      cfg.tile_size,
      cfg.expert_dropout_rate,
      name="experts",
    )
    if sharding.active_mesh() is None:
      x_expert, context = dispatch_lib.dispatch(
        x_GSD.astype(dtype), route, E, capacity, cfg.dispatch
      )
      if cfg.dispatch == "dropless":  # rows sorted by expert
        y_expert = experts(
          x_expert, context.group_sizes_E, deterministic=deterministic
        )
      else:  # expert buffers x_EGCD
        y_expert = experts(x_expert, deterministic=deterministic)
      y_GSD = dispatch_lib.combine(
        y_expert, route, E, capacity, cfg.dispatch, context
      )
    elif cfg.dispatch == "dropless":
      raise ValueError(
        "dispatch='dropless' runs on one device only: its per-expert row "
        "counts vary from step to step, which the fixed-size all-to-all of "
        "expert parallelism cannot carry. Under a device mesh use "
        "dispatch='indices' or 'einsum' (with capacity_factor), or run "
        "without a mesh."
      )
    else:  # experts split over the mesh's `expert` axis
      y_GSD = expert_parallel.moe_ffn(
        x_GSD.astype(dtype),
        route,
        functools.partial(experts, deterministic=deterministic),
        num_experts=E,
        expert_dim=cfg.expert_dim,
        capacity=capacity,
        backend=cfg.dispatch,
        implementation=cfg.expert_parallel,
      )

    y_BLD = shapes.from_groups(y_GSD, B, L)
    if cfg.num_shared_experts:
      y_BLD = y_BLD + self._shared_experts(x_BLD.astype(dtype))

    for name, value in aux_losses.items():
      self.sow("aux_loss", name, value)
    metrics_fn = metrics.routing_metrics
    if self._experts_choose(deterministic):
      metrics_fn = metrics.expert_choice_metrics
    for name, value in metrics_fn(route, mask_GS).items():
      self.sow("moe_metrics", name, value)
    self.sow("moe_metrics", "capacity", jnp.asarray(capacity, jnp.float32))
    for name in ("expert_index", "gates", "kept"):
      value_GSK = getattr(route, f"{name}_GSK")
      self.sow("intermediates", name, shapes.from_groups(value_GSK, B, L))
    return y_BLD.astype(x_BLD.dtype)

  def _shared_experts(self, x_BLD: jax.Array) -> jax.Array:
    """sum over the N_s shared experts of FFN_s(x), every token (DeepSeek-V3
    Eq. 12; DeepSeekMoE, Dai et al. 2024, §3.2).

    Computed as ONE feed-forward block of width N_s * F_s: splitting its
    hidden units into N_s blocks of F_s gives act(x [W_1 .. W_N]) [V_1; ..;
    V_N] = sum_s act(x W_s) V_s, exactly N_s separate FFNs summed (also
    gated: the product is per hidden unit). Only the initial scale differs:
    the output weights are drawn with fan-in N_s F_s instead of F_s.
    """
    cfg = self.config
    width = cfg.num_shared_experts * (cfg.shared_expert_dim or cfg.expert_dim)
    return MlpBlock(
      width,
      cfg.activation,
      cfg.gated,
      DTYPES[cfg.dtype],
      name="shared_experts",
    )(x_BLD)

  def _experts_choose(self, deterministic: bool) -> bool:
    """Whether this call routes by expert choice (not its eval_router)."""
    cfg = self.config
    family = routing.ROUTING_SCHEMES[cfg.router].family
    return family == "expert_choice" and not (deterministic and cfg.eval_router)

  def _route(self, inputs: _Inputs):
    """One call into the routing family of `config.router`."""
    cfg = self.config
    scheme = routing.ROUTING_SCHEMES[cfg.router]
    route_fn = _ROUTE_FAMILIES[scheme.family]
    if not scheme.learned:
      return route_fn(self, inputs)
    logits_GSE = Router(
      cfg.num_experts,
      cfg.router_init_scale,
      cfg.router_jitter,
      cfg.router_bias,
      DTYPES[cfg.router_dtype],
      name="router",
    )(inputs.x_GSD, deterministic=inputs.deterministic)
    _sow_BLE(self, inputs, "router_logits", logits_GSE)
    logit_metrics = metrics.router_logit_metrics(logits_GSE, inputs.mask_GS)
    for name, value in logit_metrics.items():
      self.sow("moe_metrics", name, value)
    route, aux_losses = route_fn(self, inputs, logits_GSE)
    if inputs.deterministic and cfg.eval_router:
      # Causal-safe evaluation of a non-causal router: tokens choose on the
      # same logits (the aux losses stay those of the training router).
      route, _ = _tokens_choose(self, inputs, logits_GSE, cfg.eval_router)
    aux_losses["router_z_loss"] = losses.router_z_loss(
      logits_GSE, inputs.mask_GS
    )
    return route, aux_losses
