"""A decoder-only transformer language model with MoE feed-forward blocks.

Shapes (see `moe_jax.shapes`): tokens `[B, L]`, activations `[B, L, D]`,
logits `[B, L, V]`.

Pre-LayerNorm blocks: x += Attention(LN(x)); x += FFN(LN(x)), where FFN is an
`MoeLayer` in every `moe_every`-th block (blocks moe_every-1, 2*moe_every-1,
...; 1 = every block, 2 = every other block as in Switch and GLaM) and a
dense `MlpBlock` of width `mlp_dim` elsewhere.

The dense baseline is the same code with `num_experts = 0` (any MoE config
becomes its own "dense twin"): the blocks that would hold an MoE layer get
a dense FFN of width `dense_twin_dim(config.model.moe)`, every hidden unit
the MoE layer runs per token, so the baseline does the same FLOPs per token
as the MoE model's active parameters (Switch §2: "FLOP-matched"), up to the
router's 2*D*E per token and the routing itself.

Blocks are named `layer_00`, `layer_01`, ...; their sown MoE losses and
metrics are found under those names.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moe_jax import errors, routing
from moe_jax.layers import (
  ACTIVATIONS,
  DTYPES,
  MlpBlock,
  MoeConfig,
  MoeLayer,
)


def dense_twin_dim(moe: ml_collections.ConfigDict) -> int:
  """Width of the dense FFN that replaces the MoE layer of `moe` (a run
  config's `config.model.moe`) in its dense twin (`num_experts=0`): every
  hidden unit the MoE layer runs per token.

    routed = K * F       tokens choose: each token runs its K experts of
                         width F (Switch §2, GShard §2.2; soft mixture:
                         K = E)
           = c' * F      expert choice (Zhou et al. 2022; paper details
                         unverified): each expert takes C = c S / E tokens
                         of a group of S, so a token runs E C / S = c
                         experts on average; c' = c, or c * K under a
                         capacity rule with times_k (C = c K S / E)
    shared = N_s * F_s   always-active shared experts (DeepSeek-V3 Eq. 12),
                         F_s = shared_expert_dim (0: F)
    width  = routed + shared

  An FFN of width W costs 2 * 2 D W FLOPs per token, 3 * 2 D W when gated
  (the GLU's third matrix, Shazeer 2020); the dense twin is gated exactly
  as the experts and the shared experts are (all follow
  `config.model.gated`), so equal widths give equal FFN FLOPs. Not counted:
  the router's D x E matmul (2 D E per token), the routing itself (softmax,
  top-k, slot counting, the gate-weighted combine), and capacity slack: a
  capacity backend runs its experts over all E*C slots of a group, CF * K
  * S of them, full or not, where this counts the K * S (token, expert)
  pairs a dropless layer computes.

  Exact for tokens choose. For expert choice only when C = c' S / E exactly
  (no rounding in `routing.compute_capacity`, C neither raised to
  min_capacity nor capped at S, the group really holding S tokens) and
  c' F is an integer; otherwise the width is round(c' F), the nearest
  match to the nominal c (e.g. c = 1.25, S = 512, E = 6: C = 107, so 1.254
  experts per token, against the twin's 1.25 F).
  """
  if moe.router not in routing.ROUTING_SCHEMES:
    raise ValueError(
      f"unknown router={moe.router!r}; allowed: "
      f"{sorted(routing.ROUTING_SCHEMES)}."
    )
  for key in ("top_k", "expert_dim", "num_shared_experts", "shared_expert_dim"):
    if isinstance(moe[key], bool) or not isinstance(moe[key], int):
      raise ValueError(f"{key}={moe[key]!r} must be an integer.")
  if routing.ROUTING_SCHEMES[moe.router].family == "expert_choice":
    if isinstance(moe.capacity_factor, bool) or not isinstance(
      moe.capacity_factor, (int, float)
    ):
      raise ValueError(
        f"capacity_factor={moe.capacity_factor!r} must be a number."
      )
    if moe.capacity_rule not in routing.CAPACITY_RULES:
      raise ValueError(
        f"unknown capacity_rule={moe.capacity_rule!r}; allowed: "
        f"{sorted(routing.CAPACITY_RULES)}."
      )
    times_k = routing.CAPACITY_RULES[moe.capacity_rule].times_k
    experts_per_token = moe.capacity_factor * (moe.top_k if times_k else 1)
  else:
    experts_per_token = moe.top_k
  routed = round(experts_per_token * moe.expert_dim)
  shared = moe.num_shared_experts * (moe.shared_expert_dim or moe.expert_dim)
  if routed < 1 or shared < 0:
    raise ValueError(
      f"the dense twin's width: routed {routed} must be >= 1 and shared "
      f"{shared} >= 0 (top_k={moe.top_k}, expert_dim={moe.expert_dim}, "
      f"capacity_factor={moe.capacity_factor}, num_shared_experts="
      f"{moe.num_shared_experts}, shared_expert_dim={moe.shared_expert_dim})."
    )
  return routed + shared


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """The model's hyperparameters; built from a config by `from_config`."""

  vocab_size: int
  max_len: int
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 512
  activation: str = "gelu"
  gated: bool = False
  dropout_rate: float = 0.0
  dtype: str = "float32"
  moe_every: int = 2
  moe: MoeConfig | None = None  # None: dense model
  # Dense FFN width in the MoE blocks of a dense model (`dense_twin_dim`).
  dense_moe_dim: int = 512

  def __post_init__(self):
    with errors.config_errors():
      self._validate()

  def _validate(self):
    errors.check_field_types(self)
    for name in ("vocab_size", "max_len", "d_model", "num_layers", "mlp_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
    if self.num_heads < 1 or self.d_model % self.num_heads:
      raise ValueError(
        f"num_heads={self.num_heads} must divide d_model={self.d_model}."
      )
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(
        f"dropout_rate={self.dropout_rate} must be in [0, 1) (0: none)."
      )
    if self.moe_every < 1:
      raise ValueError(f"moe_every={self.moe_every} must be >= 1.")
    if self.activation not in ACTIVATIONS or self.dtype not in DTYPES:
      raise ValueError(
        f"activation={self.activation!r} / dtype={self.dtype!r}; allowed: "
        f"{sorted(ACTIVATIONS)} / {sorted(DTYPES)}."
      )

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, vocab_size: int):
    """From a run config: `config.model`, `config.loss`, `config.data` and
    `config.mesh.expert_parallel` (when the config has a mesh). Raises
    `errors.ConfigError` (a ValueError) on a bad value."""
    with errors.config_errors():
      return cls._from_config(config, vocab_size)

  @classmethod
  def _from_config(cls, config: ml_collections.ConfigDict, vocab_size: int):
    m, moe = config.model, config.model.moe
    mesh = config.get("mesh")
    parallel = {} if mesh is None else {"expert_parallel": mesh.expert_parallel}
    moe_config = None
    if isinstance(moe.num_experts, bool) or not isinstance(
      moe.num_experts, int
    ):
      raise ValueError(
        f"num_experts={moe.num_experts!r} must be an integer (0: dense)."
      )
    if moe.num_experts > 0:
      moe_config = MoeConfig(
        **{k: moe[k] for k in moe.keys()},
        load_balancing=config.loss.load_balancing,
        activation=m.activation,
        gated=m.gated,
        dtype=m.dtype,
        **parallel,
      )
    elif moe.num_experts < 0:
      raise ValueError(f"num_experts={moe.num_experts} must be >= 0.")
    return cls(
      vocab_size=vocab_size,
      max_len=config.data.seq_len,
      d_model=m.d_model,
      num_layers=m.num_layers,
      num_heads=m.num_heads,
      mlp_dim=m.mlp_dim,
      activation=m.activation,
      gated=m.gated,
      dropout_rate=m.dropout_rate,
      dtype=m.dtype,
      moe_every=m.moe_every,
      moe=moe_config,
      dense_moe_dim=dense_twin_dim(moe),
    )

  def is_moe_block(self, layer: int) -> bool:
    """Whether block `layer` (0-based) holds the MoE feed-forward layer."""
    return (layer + 1) % self.moe_every == 0


class Block(nn.Module):
  """One pre-LN decoder block."""

  config: TransformerConfig
  ffn: str  # "moe" | "dense"
  ffn_dim: int

  @nn.compact
  def __call__(self, x_BLD, padding_mask_BL, *, deterministic, tokens_BL=None):
    cfg = self.config
    dtype = DTYPES[cfg.dtype]
    causal_11LL = nn.make_causal_mask(jnp.ones(x_BLD.shape[:2]))
    h_BLD = nn.LayerNorm(dtype=dtype, name="attention_norm")(x_BLD)
    h_BLD = nn.MultiHeadDotProductAttention(
      num_heads=cfg.num_heads,
      dtype=dtype,
      dropout_rate=cfg.dropout_rate,
      deterministic=deterministic,
      name="attention",
    )(h_BLD, mask=causal_11LL)
    x_BLD = x_BLD + nn.Dropout(cfg.dropout_rate)(h_BLD, deterministic)
    h_BLD = nn.LayerNorm(dtype=dtype, name="ffn_norm")(x_BLD)
    if self.ffn == "moe":
      h_BLD = MoeLayer(cfg.moe, name="moe")(
        h_BLD,
        padding_mask_BL,
        deterministic=deterministic,
        token_ids_BL=tokens_BL,  # for hash routing
      )
    else:
      h_BLD = MlpBlock(
        self.ffn_dim, cfg.activation, cfg.gated, dtype, name="mlp"
      )(h_BLD)
    return x_BLD + nn.Dropout(cfg.dropout_rate)(h_BLD, deterministic)


class TransformerLM(nn.Module):
  """Decoder-only LM: tokens `[B, L]` -> next-token logits `[B, L, V]`."""

  config: TransformerConfig

  @nn.compact
  def __call__(
    self,
    tokens_BL: jax.Array,
    padding_mask_BL: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> jax.Array:
    cfg = self.config
    B, L = tokens_BL.shape
    if L > cfg.max_len:
      raise ValueError(f"sequence length {L} exceeds max_len={cfg.max_len}.")
    dtype = DTYPES[cfg.dtype]
    embed = nn.Embed(
      cfg.vocab_size,
      cfg.d_model,
      embedding_init=nn.initializers.normal(stddev=1.0),
      name="embed",
    )
    position_LD = self.param(
      "position_embedding",
      nn.initializers.normal(stddev=0.02),
      (cfg.max_len, cfg.d_model),
    )
    x_BLD = embed(tokens_BL) + position_LD[None, :L]
    x_BLD = nn.Dropout(cfg.dropout_rate)(x_BLD.astype(dtype), deterministic)
    for layer in range(cfg.num_layers):
      moe_here = cfg.is_moe_block(layer)
      x_BLD = Block(
        cfg,
        ffn="moe" if moe_here and cfg.moe is not None else "dense",
        ffn_dim=cfg.dense_moe_dim if moe_here else cfg.mlp_dim,
        name=f"layer_{layer:02d}",
      )(
        x_BLD, padding_mask_BL, deterministic=deterministic, tokens_BL=tokens_BL
      )
    x_BLD = nn.LayerNorm(dtype=dtype, name="final_norm")(x_BLD)
    # Tied input/output embedding, scaled so initial logits are O(1).
    logits_BLV = embed.attend(x_BLD.astype(jnp.float32)) / jnp.sqrt(cfg.d_model)
    return logits_BLV
