"""What an MoE model costs: parameters (total and active per token), FLOPs,
memory and all-to-all traffic, computed from a small architecture
description, never from typed-in totals.

  python -m moe_jax.cost --preset=mixtral_8x7b
  python -m moe_jax.cost --preset=all --mesh_experts=64 --tokens_per_step=4096
  python -m moe_jax.cost --config=configs/switch_top1.py --json=cost.json

An `Architecture` lists the model's weight matrices (`tensors`); every number
below is a sum over them:

  total params    sum of every tensor's size
  active params   what one token uses: every tensor, but of the routed
                  experts only the K a token runs (K = top_k; c on average
                  for expert choice), of the routers all (each scores every
                  expert). The input embedding is counted (a convention:
                  Mixtral's "12.9B active" counts it, DeepSeek-V3's "36.6B"
                  does not; `active_params(count_input_embedding=False)`).
  forward FLOPs   2 per multiply-add of every active matrix a token is
                  multiplied by (Kaplan et al. 2020 §2.1: C_forward ~ 2N):
                  attention projections, FFNs, experts, routers (2 D E per
                  MoE layer) and the output projection (2 V D; the input
                  embedding is a lookup, 0). Attention scores and values,
                  which grow with the sequence, are separate:
                  `attention_flops_per_token`.
  training FLOPs  3 x forward: the backward pass costs twice the forward
                  (gradients w.r.t. activations and weights; Kaplan et al.
                  2020 §2.1, C ~ 6N). Rematerialisation would add a forward.

Not counted anywhere: the routing itself (softmax / top-k / sorting), norms,
activation functions and residual adds (a few FLOPs per element, about 1-2%
of a small model's matmuls, less at scale), and capacity slack (a capacity
backend runs its experts over CF x K slots per token, full or not).

Encoder-decoder models (Switch, ST-MoE: T5) count per token as if it passed
through both stacks, as configs/paper/ maps them onto one decoder: FLOPs per
token = encoder + decoder; the decoder's cross-attention counted once per
token for its query, key and value projections.

Presets (`PRESETS`) are the published architectures; configs/paper/ holds
their decoder-only, byte-vocabulary approximations that moe_jax can train
(`from_config` describes those). The presets' totals are tested against the
papers in tests/test_cost.py.
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import NamedTuple

NORMS = {"layernorm": 2, "rmsnorm": 1}  # parameters per feature
POSITIONS = ("learned", "relative", "rope")
OPTIMIZERS = ("adam", "adafactor")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}
PARTS = (
  "embeddings",
  "position",
  "attention",
  "dense_ffn",
  "experts",
  "shared_experts",
  "router",
  "norms",
)


def _choice(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"unknown {name}={value!r}; allowed: {sorted(allowed)}.")


@dataclasses.dataclass(frozen=True)
class Mla:
  """DeepSeek-V2/V3 multi-head latent attention dims (DeepSeek-V3 §2.1.1,
  Eqs. 1-11): queries through a rank-`q_lora_rank` bottleneck, keys and
  values through a rank-`kv_lora_rank` latent; each head's query and key
  split into a `nope_head_dim` part and a `rope_head_dim` part (the rope key
  is one per token, shared by the heads); values of `v_head_dim`."""

  q_lora_rank: int
  kv_lora_rank: int
  nope_head_dim: int
  rope_head_dim: int
  v_head_dim: int


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A transformer with MoE feed-forward layers, as far as its cost goes.

  Layer i (0-based, per stack) holds an MoE layer iff i >= first_dense and
  (i + 1) % moe_every == 0 (moe_every 1: every layer; 2: every other, the
  second of each pair as in moe_jax; which of the pair does not change a
  count); the others a dense FFN of width ffn_dim. num_experts = 0: dense.

  Attributes:
    name: preset or config name.
    vocab_size, d_model, num_layers: V, D, decoder (or only) layers.
    num_heads, head_dim, num_kv_heads: H, head width (0: D / H), key/value
      heads (0: H; fewer: grouped-query attention).
    mla: multi-head latent attention dims instead of the above K/V (None).
    ffn_dim: dense FFN width.
    gated: FFNs have 3 matrices (GLU: SwiGLU / GEGLU, Shazeer 2020), else 2.
    expert_gated: experts (routed and shared) gated (None: as `gated`).
    moe_every, first_dense: where the MoE layers are (see above).
    num_experts, top_k, expert_dim: E, experts per token (K; for expert
      choice the capacity factor c, experts per token on average), F.
    num_shared_experts, shared_expert_dim: always-active experts (0: none;
      width 0: expert_dim).
    num_routers: router matrices D x E per MoE layer (1; 2 for noisy top-k's
      noise; 0 for hash and random routing).
    router_bias: a bias of E per router.
    extra_dense_in_moe: a dense FFN beside each MoE layer in the same block
      (ST-MoE App. C sparse-dense stacking, flaxformer `extra_mlp`), with its
      own norm.
    encoder_layers: > 0: an encoder-decoder; the encoder has this many
      layers with the same MoE pattern, each decoder layer a cross-attention.
    norm: "layernorm" (scale and bias) | "rmsnorm" (scale).
    attention_bias: biases on the attention projections.
    position: "learned" (max_len x D table) | "relative" (T5's bias:
      relative_buckets x H per stack) | "rope" (no parameters).
    max_len, relative_buckets: of the position encoding.
    tied_embeddings: the output projection is the input embedding.
    source: where the numbers come from.
  """

  name: str
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  ffn_dim: int
  gated: bool = False
  head_dim: int = 0
  num_kv_heads: int = 0
  mla: Mla | None = None
  expert_gated: bool | None = None
  moe_every: int = 1
  first_dense: int = 0
  num_experts: int = 0
  top_k: float = 1
  expert_dim: int = 0
  num_shared_experts: int = 0
  shared_expert_dim: int = 0
  num_routers: int = 1
  router_bias: bool = False
  extra_dense_in_moe: bool = False
  encoder_layers: int = 0
  norm: str = "rmsnorm"
  attention_bias: bool = False
  position: str = "rope"
  max_len: int = 0
  relative_buckets: int = 32
  tied_embeddings: bool = False
  source: str = ""

  def __post_init__(self):
    for key in ("vocab_size", "d_model", "num_layers", "num_heads", "ffn_dim"):
      if getattr(self, key) < 1:
        raise ValueError(f"{key}={getattr(self, key)} must be >= 1.")
    if self.moe_every < 1 or self.first_dense < 0 or self.encoder_layers < 0:
      raise ValueError(
        f"moe_every={self.moe_every} must be >= 1, first_dense="
        f"{self.first_dense} and encoder_layers={self.encoder_layers} >= 0."
      )
    if self.num_experts < 0 or self.num_shared_experts < 0:
      raise ValueError(
        f"num_experts={self.num_experts} and num_shared_experts="
        f"{self.num_shared_experts} must be >= 0."
      )
    if self.num_experts and not (
      0 < self.top_k <= self.num_experts and self.expert_dim >= 1
    ):
      raise ValueError(
        f"top_k={self.top_k} must be in (0, num_experts={self.num_experts}] "
        f"and expert_dim={self.expert_dim} >= 1."
      )
    _choice("norm", self.norm, NORMS)
    _choice("position", self.position, POSITIONS)
    if self.position == "learned" and self.max_len < 1:
      raise ValueError(
        f"position='learned' needs max_len >= 1, not {self.max_len}."
      )
    if self.mla is None and self.d_model % self.num_heads and not self.head_dim:
      raise ValueError(
        f"num_heads={self.num_heads} does not divide d_model={self.d_model}: "
        "give head_dim."
      )

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  def is_moe_layer(self, layer: int) -> bool:
    """Whether layer `layer` (0-based, in either stack) holds an MoE FFN."""
    return (
      self.is_moe
      and layer >= self.first_dense
      and (layer + 1) % self.moe_every == 0
    )

  @property
  def num_moe_layers(self) -> int:
    """MoE layers of both stacks."""
    stacks = (self.num_layers, self.encoder_layers)
    return sum(self.is_moe_layer(i) for n in stacks for i in range(n))


class Tensor(NamedTuple):
  """`copies` matrices of `shape` (rows, cols; or (n,) for a vector); a
  token uses `active` of them; `matmul`: a token's activation is multiplied
  by it (2 FLOPs per active element), else a lookup or an elementwise
  parameter (0 FLOPs counted)."""

  part: str
  name: str
  shape: tuple[int, ...]
  copies: float
  active: float
  matmul: bool

  @property
  def size(self) -> int:
    return math.prod(self.shape)


def _ffn(part, name, d, width, gated, copies, active):
  """An FFN of `width`: wi [D, F] (and wi_gate) and wo [F, D]."""
  return [
    Tensor(
      part,
      f"{name}/wi",
      (d, width),
      copies * (2 if gated else 1),
      active * (2 if gated else 1),
      True,
    ),
    Tensor(part, f"{name}/wo", (width, d), copies, active, True),
  ]


def _attention(arch: Architecture, name: str, copies: int) -> list[Tensor]:
  """Q, K, V, O projections of one (self- or cross-) attention, x copies."""
  D, H, n = arch.d_model, arch.num_heads, copies
  if arch.mla is not None:
    m = arch.mla
    qk = m.nope_head_dim + m.rope_head_dim
    out = [  # DeepSeek-V3 Eqs. 1-2 (keys, values), 6-7 (queries), 11
      Tensor("attention", f"{name}/q_down", (D, m.q_lora_rank), n, n, True),
      Tensor("attention", f"{name}/q_up", (m.q_lora_rank, H * qk), n, n, True),
      Tensor(
        "attention",
        f"{name}/kv_down",
        (D, m.kv_lora_rank + m.rope_head_dim),
        n,
        n,
        True,
      ),
      Tensor(
        "attention",
        f"{name}/kv_up",
        (m.kv_lora_rank, H * (m.nope_head_dim + m.v_head_dim)),
        n,
        n,
        True,
      ),
      Tensor("attention", f"{name}/out", (H * m.v_head_dim, D), n, n, True),
      Tensor(
        "norms",
        f"{name}/q_norm",
        (m.q_lora_rank * NORMS[arch.norm],),
        n,
        n,
        False,
      ),
      Tensor(
        "norms",
        f"{name}/kv_norm",
        (m.kv_lora_rank * NORMS[arch.norm],),
        n,
        n,
        False,
      ),
    ]
    return out
  hd = arch.head_dim or D // H
  kv = arch.num_kv_heads or H
  out = [
    Tensor("attention", f"{name}/query", (D, H * hd), n, n, True),
    Tensor("attention", f"{name}/key_value", (D, kv * hd), 2 * n, 2 * n, True),
    Tensor("attention", f"{name}/out", (H * hd, D), n, n, True),
  ]
  if arch.attention_bias:
    out.append(
      Tensor("attention", f"{name}/bias", ((H + 2 * kv) * hd + D,), n, n, False)
    )
  return out


def _stack(arch: Architecture, stack: str, num_layers: int) -> list[Tensor]:
  """The tensors of one stack of `num_layers` layers (grouped by kind)."""
  D, norm = arch.d_model, NORMS[arch.norm]
  decoder_of_two = stack == "decoder" and arch.encoder_layers > 0
  moe = sum(arch.is_moe_layer(i) for i in range(num_layers))
  dense = num_layers - moe + (moe if arch.extra_dense_in_moe else 0)
  norms = num_layers * (3 if decoder_of_two else 2) + 1  # + the final norm
  norms += moe if arch.extra_dense_in_moe else 0
  out = _attention(arch, f"{stack}/self_attention", num_layers)
  if decoder_of_two:
    out += _attention(arch, f"{stack}/cross_attention", num_layers)
  out += _ffn(
    "dense_ffn", f"{stack}/mlp", D, arch.ffn_dim, arch.gated, dense, dense
  )
  out.append(
    Tensor("norms", f"{stack}/norms", (norm * D,), norms, norms, False)
  )
  if arch.position == "relative":
    buckets = (arch.relative_buckets * arch.num_heads,)
    out.append(
      Tensor("position", f"{stack}/relative_bias", buckets, 1, 1, False)
    )
  if moe:
    E, F = arch.num_experts, arch.expert_dim
    gated = arch.gated if arch.expert_gated is None else arch.expert_gated
    out += _ffn(
      "experts", f"{stack}/experts", D, F, gated, moe * E, moe * arch.top_k
    )
    if arch.num_shared_experts:
      width = arch.num_shared_experts * (arch.shared_expert_dim or F)
      out += _ffn(
        "shared_experts", f"{stack}/shared", D, width, gated, moe, moe
      )
    routers = moe * arch.num_routers
    if routers:
      out.append(
        Tensor("router", f"{stack}/router", (D, E), routers, routers, True)
      )
      if arch.router_bias:
        out.append(
          Tensor(
            "router", f"{stack}/router_bias", (E,), routers, routers, False
          )
        )
  return out


def tensors(arch: Architecture) -> list[Tensor]:
  """Every weight tensor of `arch`, grouped by kind (see `Tensor`)."""
  V, D = arch.vocab_size, arch.d_model
  out = [
    Tensor("embeddings", "input_embedding", (V, D), 1, 1, arch.tied_embeddings)
  ]
  if not arch.tied_embeddings:
    out.append(Tensor("embeddings", "output_projection", (D, V), 1, 1, True))
  if arch.position == "learned":
    out.append(
      Tensor("position", "position_embedding", (arch.max_len, D), 1, 1, False)
    )
  if arch.encoder_layers:
    out += _stack(arch, "encoder", arch.encoder_layers)
  out += _stack(arch, "decoder", arch.num_layers)
  return out


def params_by_part(
  arch: Architecture, active: bool = False
) -> dict[str, float]:
  """Parameters per part (`PARTS`), all of them or those a token uses."""
  out = dict.fromkeys(PARTS, 0.0)
  for t in tensors(arch):
    out[t.part] += t.size * (t.active if active else t.copies)
  return out


def total_params(arch: Architecture) -> int:
  return round(sum(params_by_part(arch).values()))


def active_params(
  arch: Architecture, count_input_embedding: bool = True
) -> float:
  """Parameters one token uses (see the module docstring). Without the input
  embedding (when untied) with `count_input_embedding=False`, DeepSeek-V3's
  convention (its tied-free "36.6B including 0.9B for the output head")."""
  active = sum(params_by_part(arch, active=True).values())
  if not count_input_embedding and not arch.tied_embeddings:
    active -= arch.vocab_size * arch.d_model
  return active


def forward_flops_per_token(arch: Architecture) -> float:
  """2 x the active elements of every matrix a token is multiplied by
  (attention projections, FFNs, experts, routers, output projection);
  attention scores and values are `attention_flops_per_token`."""
  return 2.0 * sum(t.size * t.active for t in tensors(arch) if t.matmul)


def attention_flops_per_token(arch: Architecture, seq_len: int) -> float:
  """Scores q.k and the weighted sum of values, per token, over `seq_len`
  keys without causal skipping (what a dense, unfused attention computes;
  a causal kernel that skips masked blocks does about half):

    per attention layer  2 L H d_qk + 2 L H d_v

  (Kaplan et al. 2020 Table 1 count 2 n_ctx d_attn per layer for the
  scores alone.) d_qk = d_v = head_dim, or for MLA nope + rope and v_head_dim.
  Cross-attention of an encoder-decoder counted with `seq_len` keys too."""
  if arch.mla is not None:
    qk = arch.mla.nope_head_dim + arch.mla.rope_head_dim
    v = arch.mla.v_head_dim
  else:
    qk = v = arch.head_dim or arch.d_model // arch.num_heads
  layers = arch.num_layers
  if arch.encoder_layers:  # decoder self + cross, encoder self
    layers = 2 * arch.num_layers + arch.encoder_layers
  return layers * 2.0 * seq_len * arch.num_heads * (qk + v)


def training_flops_per_token(arch: Architecture, seq_len: int) -> float:
  """3 x (forward matmuls + attention at `seq_len`): backward = 2 forwards."""
  return 3.0 * (
    forward_flops_per_token(arch) + attention_flops_per_token(arch, seq_len)
  )


def param_bytes(arch: Architecture, dtype: str = "bfloat16") -> int:
  _choice("dtype", dtype, DTYPE_BYTES)
  return total_params(arch) * DTYPE_BYTES[dtype]


def optimizer_bytes(
  arch: Architecture, optimizer: str = "adam", param_dtype: str = "bfloat16"
) -> int:
  """Optimizer state in bytes, float32 throughout:

    adam       2 moments m, v (Kingma & Ba 2015 Alg. 1): 8 bytes / param
    adafactor  factored second moment (Shazeer & Stern 2018 §3, beta1 = 0):
               rows + cols per matrix (per expert for expert weights), the
               full vector for vectors: 4 bytes each
    + a float32 master copy of the parameters (4 bytes / param) when the
      parameters are stored in a narrower dtype (mixed precision,
      Micikevicius et al. 2018 §3.1).
  Gradients (`param_bytes` again, in the parameter dtype) are not included."""
  _choice("optimizer", optimizer, OPTIMIZERS)
  _choice("param_dtype", param_dtype, DTYPE_BYTES)
  if optimizer == "adam":
    state = 2 * total_params(arch)
  else:
    state = 0
    for t in tensors(arch):
      per_copy = sum(t.shape) if len(t.shape) == 2 else t.size
      state += per_copy * t.copies
    state = round(state)
  master = total_params(arch) if DTYPE_BYTES[param_dtype] < 4 else 0
  return 4 * (state + master)


def activation_bytes_per_token(
  arch: Architecture, seq_len: int, layer: int = -1, bytes_per_element: int = 2
) -> float:
  """Activations one token keeps for the backward pass in layer `layer` (an
  MoE layer if -1 and the model has one, else a dense one), in bytes, with
  16-bit activations, 1-byte dropout masks, no rematerialisation and no
  tensor or sequence parallelism.

  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models") Eq. 1: a GPT layer keeps s b h (34 + 5 a s / h)
  bytes: per token 34 h + 5 a s, of which attention 11 h + 5 a s (a heads,
  s = `seq_len`), the two layer norms' inputs 4 h, and the MLP 19 h = 2 h
  (input) + 8 h (GeLU input, 4h wide) + 8 h (second matmul's input) + h
  (dropout mask). Here the MLP term is generalised to width W with
  expert-parallel copies:

    dense FFN   b h + 2 b W (+ b W gate output + b W product when gated)
                + b W + h   (input, activation input, second matmul input,
                dropout mask; the paper's 19 h at W = 4h, b = 2)
    MoE FFN     b h + [K (2 b h) dispatched inputs and expert outputs]
                + each of the K experts' and the shared experts' hidden
                terms as above + h + the router's E logits and
                probabilities in float32 (8 E)

  with b = `bytes_per_element`. Attention is taken from Eq. 1 for every
  attention variant (GQA's and MLA's smaller keys and values are ignored).
  """
  h, b, s, a = arch.d_model, bytes_per_element, seq_len, arch.num_heads
  attention = 11 * h + 5 * a * s
  norms = 4 * h

  def hidden(width, gated):
    return (
      b * width * (3 if gated else 1) + b * width
    )  # act in (+ gate, prod), wo in

  moe_here = arch.is_moe_layer(layer) if layer >= 0 else arch.is_moe
  if moe_here:
    gated = arch.gated if arch.expert_gated is None else arch.expert_gated
    K, E = arch.top_k, arch.num_experts
    ffn = b * h + K * 2 * b * h + K * hidden(arch.expert_dim, gated) + h + 8 * E
    if arch.num_shared_experts:
      width = arch.num_shared_experts * (
        arch.shared_expert_dim or arch.expert_dim
      )
      ffn += hidden(width, gated)
  else:
    ffn = b * h + hidden(arch.ffn_dim, arch.gated) + h
  return attention + norms + ffn


def all_to_all_bytes(
  arch: Architecture,
  tokens_per_step: int,
  expert_parallel: int,
  bytes_per_element: int = 2,
  training: bool = True,
  capacity_factor: float = 1.0,
) -> float:
  """Bytes that leave their device in the all-to-alls of one step, summed
  over the devices of an expert-parallel mesh axis of size ep:

    T K D b x 2 (dispatch and combine) x n_moe x (ep - 1) / ep x CF
    x 2 when training (the backward pass sends the gradients back the same
    way, GShard §3.2)

  T = `tokens_per_step`, K experts per token, D = d_model, b bytes per
  element, n_moe MoE layers; tokens are spread evenly over the devices and a
  token's expert is on another device with probability (ep - 1) / ep.
  `capacity_factor`: a capacity backend sends fixed-size buffers of CF K T
  slots, full or not (1.0: dropless, only the real pairs). Per device:
  divide by ep."""
  if expert_parallel < 1 or tokens_per_step < 0:
    raise ValueError(
      f"expert_parallel={expert_parallel} must be >= 1 and tokens_per_step="
      f"{tokens_per_step} >= 0."
    )
  if not arch.is_moe:
    return 0.0
  per_layer = (
    tokens_per_step * arch.top_k * arch.d_model * bytes_per_element * 2
  )
  leaving = (expert_parallel - 1) / expert_parallel
  passes = 2 if training else 1
  return per_layer * arch.num_moe_layers * leaving * capacity_factor * passes


# ---- presets: the published architectures -------------------------------

_T5 = dict(  # flaxformer moe.gin (T5.1.1): RMSNorm, no biases, relative
  # position bias (32 buckets per stack), V = 32128 (gin NUM_EMBEDDINGS).
  vocab_size=32128,
  norm="rmsnorm",
  position="relative",
  moe_every=2,
  top_k=1,
)

PRESETS = {
  # flaxformer t5x/configs/moe/models/switch_base.gin + tokens_choose_base.gin:
  # 12 + 12 layers, D 768, 12 heads x 64, ReLU MLP 3072 (Table 9 lists GEGLU
  # 2048: the same parameters per expert), 128 experts (Table 1 caption;
  # the gin says 64), 6 + 6 sparse layers, tied output ("re-uses the token
  # embedder"). Published: 7.4B ("7,410M", Table 8). configs/paper/
  # switch_base.py is its 24-layer decoder-only byte approximation.
  "switch_base": Architecture(
    name="switch_base",
    d_model=768,
    num_layers=12,
    encoder_layers=12,
    num_heads=12,
    head_dim=64,
    ffn_dim=3072,
    num_experts=128,
    expert_dim=3072,
    tied_embeddings=True,
    source="Switch Table 8/9; flaxformer switch_base.gin",
    **_T5,
  ),
  # switch_large.gin: 24 + 24 layers, D 1024, 16 heads x 64, ReLU 4096,
  # 128 experts, 12 + 12 sparse, tied. Published: 26.3B (Table 9 "26B";
  # Table 8 "26.3B"). Table 9's GEGLU d_ff 2816 would give 27.1B.
  "switch_large": Architecture(
    name="switch_large",
    d_model=1024,
    num_layers=24,
    encoder_layers=24,
    num_heads=16,
    head_dim=64,
    ffn_dim=4096,
    num_experts=128,
    expert_dim=4096,
    tied_embeddings=True,
    source="Switch Table 9; flaxformer switch_large.gin",
    **_T5,
  ),
  # switch_xxl.gin: 24 + 24 layers, D 4096, 64 heads x 64, GEGLU 10240,
  # 128 experts, 12 + 12 sparse, separate output logits. Published: 395B
  # (Table 9). Table 9 (via REFERENCE §e) lists 64 experts; that gives
  # 201B, so the gin's 128 is what 395B counts.
  "switch_xxl": Architecture(
    name="switch_xxl",
    d_model=4096,
    num_layers=24,
    encoder_layers=24,
    num_heads=64,
    head_dim=64,
    ffn_dim=10240,
    gated=True,
    num_experts=128,
    expert_dim=10240,
    source="Switch Table 9; flaxformer switch_xxl.gin",
    **_T5,
  ),
  # switch_c.gin: 15 + 15 layers, D 2080, 30 heads x 64 (attention 1920
  # wide), ReLU 6144, 2048 experts in EVERY layer, separate output logits.
  # Published: 1571B (Table 9).
  "switch_c": Architecture(
    name="switch_c",
    d_model=2080,
    num_layers=15,
    encoder_layers=15,
    num_heads=30,
    head_dim=64,
    ffn_dim=6144,
    num_experts=2048,
    expert_dim=6144,
    source="Switch Table 9; flaxformer switch_c.gin",
    **{**_T5, "moe_every": 1},
  ),
  # GLaM 64B/64E (Du et al. 2022) Table 4: 64 layers, D 8192, FFN / expert
  # width 32768, 128 heads x 128, 64 experts, top-2, MoE every other layer
  # (§3); GEGLU dense FFNs, plain GELU experts (§3; praxis layers/glam.py
  # gates the dense template only); 256K sentencepiece vocabulary (§4; taken
  # as 256000, tied; unverified). Published: 1.2T total, 96.6B active
  # (Table 4). configs/paper/glam_64e.py is its byte-vocabulary
  # approximation (heads of 64, ungated dense FFNs: 1.134T).
  "glam_64b_64e": Architecture(
    name="glam_64b_64e",
    vocab_size=256_000,
    d_model=8192,
    num_layers=64,
    num_heads=128,
    head_dim=128,
    ffn_dim=32768,
    gated=True,
    expert_gated=False,
    moe_every=2,
    num_experts=64,
    top_k=2,
    expert_dim=32768,
    tied_embeddings=True,
    norm="rmsnorm",
    position="rope",  # relative position bias in the paper; ~0 parameters
    source="GLaM Table 4, §3",
  ),
  # ST-MoE-32B (Zoph et al. 2022): flaxformer st_moe_32b.gin + st_moe_base.gin:
  # 24 + 24 layers, D 5120, 64 heads x 128, GEGLU 20480, 64 experts, top-2,
  # every fourth FFN sparse (6 + 6) with an extra dense MLP in each sparse
  # block (App. C), separate output logits (moe.gin). Published: 269B
  # total (abstract, Table 11); "FLOP-matched to a 32B dense model" is a
  # FLOP statement, not a parameter count. configs/paper/st_moe_32b.py maps
  # the 4.1B ST-MoE-L instead.
  "st_moe_32b": Architecture(
    name="st_moe_32b",
    d_model=5120,
    num_layers=24,
    encoder_layers=24,
    num_heads=64,
    head_dim=128,
    ffn_dim=20480,
    gated=True,
    num_experts=64,
    expert_dim=20480,
    extra_dense_in_moe=True,
    source="ST-MoE abstract, Table 11; flaxformer st_moe_32b.gin",
    **{**_T5, "moe_every": 4, "top_k": 2},
  ),
  # Mixtral 8x7B (Jiang et al. 2024 Table 1; HF mistralai/Mixtral-8x7B-v0.1
  # config.json): 32 layers, D 4096, 32 heads x 128, 8 KV heads, SwiGLU
  # 14336, 8 experts top-2 in every layer, V 32000, untied, RMSNorm, RoPE.
  # Published: 46.7B total, 12.9B active (Mistral AI's release post; the
  # paper: "47B", "13B"). configs/mixtral.py is its tiny-width counterpart.
  "mixtral_8x7b": Architecture(
    name="mixtral_8x7b",
    vocab_size=32000,
    d_model=4096,
    num_layers=32,
    num_heads=32,
    head_dim=128,
    num_kv_heads=8,
    ffn_dim=14336,
    gated=True,
    num_experts=8,
    top_k=2,
    expert_dim=14336,
    source="Mixtral Table 1; HF Mixtral-8x7B-v0.1 config.json",
  ),
  # DeepSeek-V3 (DeepSeek-AI 2024 §4.2; HF deepseek-ai/DeepSeek-V3
  # config.json): 61 layers, the first 3 dense (first_k_dense_replace),
  # D 7168, MLA with 128 heads, q_lora 1536, kv_lora 512, nope 128, rope 64,
  # v 128; dense SwiGLU 18432; 1 shared + 256 routed experts of 2048, top-8;
  # sigmoid router with a bias (e_score_correction_bias, in the checkpoint);
  # V 129280, untied. Without the MTP module. Published: 671B total, 37B
  # active (abstract); README_WEIGHTS.md: 36.6B active "including 0.9B for
  # the output head", i.e. without the input embedding.
  "deepseek_v3": Architecture(
    name="deepseek_v3",
    vocab_size=129280,
    d_model=7168,
    num_layers=61,
    num_heads=128,
    mla=Mla(
      q_lora_rank=1536,
      kv_lora_rank=512,
      nope_head_dim=128,
      rope_head_dim=64,
      v_head_dim=128,
    ),
    ffn_dim=18432,
    gated=True,
    first_dense=3,
    num_experts=256,
    top_k=8,
    expert_dim=2048,
    num_shared_experts=1,
    shared_expert_dim=2048,
    router_bias=True,
    source="DeepSeek-V3 §4.2, config.json, README_WEIGHTS.md",
  ),
}

# name -> (total, active or None, where): what the presets are checked
# against (tests/test_cost.py) and the CLI prints beside them.
PUBLISHED = {
  "switch_base": (7.41e9, None, "Switch Table 8"),
  "switch_large": (26.3e9, None, "Switch Table 8"),
  "switch_xxl": (395e9, None, "Switch Table 9"),
  "switch_c": (1571e9, None, "Switch Table 9"),
  "glam_64b_64e": (1.2e12, 96.6e9, "GLaM Table 4"),
  "st_moe_32b": (269e9, None, "ST-MoE abstract"),
  "mixtral_8x7b": (46.7e9, 12.9e9, "Mistral AI release"),
  "deepseek_v3": (671e9, 37e9, "DeepSeek-V3 abstract"),
}


# ---- our own configs ------------------------------------------------------


def from_config(config, vocab_size: int | None = None) -> Architecture:
  """The architecture of a moe_jax run config (configs/*.py): what
  `TransformerLM` builds from it. Learned positions (max_len = seq_len),
  tied embeddings, LayerNorm (scale and bias), attention with biases, no
  FFN biases; MoE every `moe_every`-th block. A dense model
  (num_experts = 0) has FFNs of `dense_twin_dim` in the would-be MoE
  blocks; when that differs from mlp_dim they are described as one
  always-chosen expert of that width without a router. Routers:
  one D x E matrix (+ E bias with router_bias), two for noisy_top_k, none
  for hash and random; DeepSeek's balancing bias is state, not a parameter.
  Expert choice runs c (c K under a times_k capacity rule) experts per token
  on average (`models.transformer.dense_twin_dim`)."""
  from moe_jax import routing
  from moe_jax.models.transformer import TransformerConfig, dense_twin_dim

  if vocab_size is None:
    from moe_jax.data.tokenizer import VOCAB_SIZE as vocab_size
  cfg = TransformerConfig.from_config(config, vocab_size)
  moe = config.model.moe
  common = dict(
    name=str(config.get("name", "config")),
    vocab_size=cfg.vocab_size,
    d_model=cfg.d_model,
    num_layers=cfg.num_layers,
    num_heads=cfg.num_heads,
    ffn_dim=cfg.mlp_dim,
    gated=cfg.gated,
    moe_every=cfg.moe_every,
    norm="layernorm",
    attention_bias=True,
    position="learned",
    max_len=cfg.max_len,
    tied_embeddings=True,
  )
  if cfg.moe is None:
    if cfg.dense_moe_dim != cfg.mlp_dim and any(
      cfg.is_moe_block(i) for i in range(cfg.num_layers)
    ):
      # The twin's wider blocks: a one-expert, top-1 "MoE" without router
      # has exactly their weights and FLOPs.
      return Architecture(
        **common,
        num_experts=1,
        top_k=1,
        expert_dim=cfg.dense_moe_dim,
        num_routers=0,
      )
    return Architecture(**common)
  scheme = routing.ROUTING_SCHEMES[moe.router]
  routers = (
    0 if not scheme.learned else 2 if scheme.family == "noisy_top_k" else 1
  )
  shared = moe.num_shared_experts * (moe.shared_expert_dim or moe.expert_dim)
  routed_width = dense_twin_dim(moe) - shared  # K F, or round(c F)
  return Architecture(
    **common,
    num_experts=moe.num_experts,
    top_k=routed_width / moe.expert_dim,
    expert_dim=moe.expert_dim,
    num_shared_experts=moe.num_shared_experts,
    shared_expert_dim=moe.shared_expert_dim,
    num_routers=routers,
    router_bias=moe.router_bias,
  )


def load_config(spec: str):
  """A run config from 'path/to/config.py' or 'path.py:arg'."""
  path, _, arg = spec.partition(":")
  if not Path(path).is_file():
    raise ValueError(f"--config={spec!r}: no such file {path!r}.")
  module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  config.unlock()
  config.name = spec
  return config


# ---- report ----------------------------------------------------------------


def summary(
  arch: Architecture,
  seq_len: int = 2048,
  tokens_per_step: int = 2**20,
  mesh_experts: int = 1,
  param_dtype: str = "bfloat16",
  optimizer: str = "adam",
) -> dict:
  """Every number of `arch` in one dict (what the CLI prints and writes)."""
  total, active = total_params(arch), active_params(arch)
  forward = forward_flops_per_token(arch)
  attention = attention_flops_per_token(arch, seq_len)
  out = {
    "name": arch.name,
    "total_params": total,
    "active_params": active,
    "active_params_without_input_embedding": active_params(arch, False),
    "active_fraction": active / total,
    "params_by_part": params_by_part(arch),
    "active_params_by_part": params_by_part(arch, active=True),
    "moe_layers": arch.num_moe_layers,
    "seq_len": seq_len,
    "forward_flops_per_token": forward,
    "attention_flops_per_token": attention,
    "training_flops_per_token": training_flops_per_token(arch, seq_len),
    "param_dtype": param_dtype,
    "optimizer": optimizer,
    "param_bytes": param_bytes(arch, param_dtype),
    "gradient_bytes": param_bytes(arch, param_dtype),
    "optimizer_bytes": optimizer_bytes(arch, optimizer, param_dtype),
    "activation_bytes_per_token_per_layer": activation_bytes_per_token(
      arch, seq_len
    ),
    "tokens_per_step": tokens_per_step,
    "mesh_experts": mesh_experts,
    "all_to_all_bytes_per_step_forward": all_to_all_bytes(
      arch, tokens_per_step, mesh_experts, training=False
    ),
    "all_to_all_bytes_per_step_training": all_to_all_bytes(
      arch, tokens_per_step, mesh_experts, training=True
    ),
    "source": arch.source,
  }
  if PRESETS.get(arch.name) == arch:
    published_total, published_active, where = PUBLISHED[arch.name]
    out["published"] = {
      "total_params": published_total,
      "active_params": published_active,
      "source": where,
    }
  return out


def _si(x: float, unit: str = "") -> str:
  for scale, prefix in (
    (1e12, "T"),
    (1e9, "G" if unit else "B"),
    (1e6, "M"),
    (1e3, "k"),
  ):
    if abs(x) >= scale:
      return f"{x / scale:.3g}{prefix}{unit}"
  return f"{x:.3g}{unit}"


def format_table(rows: list[dict]) -> str:
  """One line per model: the headline numbers."""
  a2a = rows[0]["mesh_experts"] > 1
  head = [
    "model",
    "total",
    "active",
    "act/tot",
    "published",
    "fwd/tok",
    "train/tok",
  ]
  head += [f"params+{rows[0]['optimizer']}"]
  head += ["a2a/step"] if a2a else []
  lines = [head]
  for r in rows:
    published = r.get("published")
    pub = "-"
    if published:
      pub = _si(published["total_params"])
      if published["active_params"]:
        pub += " / " + _si(published["active_params"])
    line = [
      r["name"],
      _si(r["total_params"]),
      _si(r["active_params"]),
      f"{r['active_fraction']:.3f}",
      pub,
      _si(r["forward_flops_per_token"] + r["attention_flops_per_token"], "F"),
      _si(r["training_flops_per_token"], "F"),
      _si(r["param_bytes"] + r["optimizer_bytes"], "B"),
    ]
    if a2a:
      line.append(_si(r["all_to_all_bytes_per_step_training"], "B"))
    lines.append(line)
  widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
  text = [
    "  ".join(
      c.ljust(w) if i == 0 else c.rjust(w)
      for i, (c, w) in enumerate(zip(row, widths))
    )
    for row in lines
  ]
  return "\n".join(text)


def format_parts(r: dict) -> str:
  """Where one model's parameters are: total and active per part."""
  lines = [f"{r['name']}: parameters by part (total / active per token)"]
  for part in PARTS:
    total, active = r["params_by_part"][part], r["active_params_by_part"][part]
    if total:
      lines.append(f"  {part:15s} {_si(total):>8s} / {_si(active):>8s}")
  lines.append(
    f"  activations ~{_si(r['activation_bytes_per_token_per_layer'], 'B')} per "
    f"token per {'MoE ' if r['moe_layers'] else ''}layer at seq_len "
    f"{r['seq_len']} (Korthikanti et al. 2022 Eq. 1, generalised)"
  )
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--preset", default="", help=f"one of {sorted(PRESETS)} or 'all'"
  )
  parser.add_argument(
    "--config", default="", help="a moe_jax config file[:arg]"
  )
  parser.add_argument(
    "--seq_len",
    type=int,
    default=0,
    help="attention FLOPs (0: 2048, or the config's)",
  )
  parser.add_argument("--mesh_experts", type=int, default=1)
  parser.add_argument(
    "--tokens_per_step",
    type=int,
    default=0,
    help="all-to-all (0: 2^20, or the config's batch_size x seq_len)",
  )
  parser.add_argument(
    "--param_dtype", default="bfloat16", choices=sorted(DTYPE_BYTES)
  )
  parser.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
  parser.add_argument("--json", default="", help="write the numbers here")
  args = parser.parse_args(argv)

  def fail(message):
    print(f"moe_jax.cost: {message}", file=sys.stderr)
    return 2

  if bool(args.preset) == bool(args.config):
    return fail("give exactly one of --preset and --config.")
  if args.preset and args.preset != "all" and args.preset not in PRESETS:
    return fail(
      f"unknown --preset={args.preset!r}; allowed: {sorted(PRESETS)} or 'all'."
    )
  if args.mesh_experts < 1 or args.tokens_per_step < 0 or args.seq_len < 0:
    return fail(
      f"--mesh_experts={args.mesh_experts} must be >= 1, --tokens_per_step="
      f"{args.tokens_per_step} and --seq_len={args.seq_len} >= 0."
    )
  seq_len = args.seq_len or 2048
  tokens = args.tokens_per_step or 2**20
  if args.config:
    try:
      config = load_config(args.config)
      archs = [from_config(config)]
    except (ValueError, OSError) as error:
      return fail(str(error))
    seq_len = args.seq_len or config.data.seq_len
    batch = config.data.batch_size * config.data.seq_len
    tokens = args.tokens_per_step or batch
  elif args.preset == "all":
    archs = list(PRESETS.values())
  else:
    archs = [PRESETS[args.preset]]
  rows = [
    summary(
      a,
      seq_len,
      tokens,
      args.mesh_experts,
      args.param_dtype,
      args.optimizer,
    )
    for a in archs
  ]
  print(format_table(rows))
  print(
    f"FLOPs per token: forward = matmuls + attention at seq_len {seq_len}; "
    f"train = 3 x forward. Memory: {args.param_dtype} parameters + "
    f"{args.optimizer} state"
    + (" + float32 master copy" if DTYPE_BYTES[args.param_dtype] < 4 else "")
    + ", no gradients or activations."
    + (
      f" a2a: all-to-all bytes per training step, {tokens} "
      f"tokens, {args.mesh_experts}-way expert parallelism, bf16."
      if args.mesh_experts > 1
      else ""
    )
  )
  if len(rows) == 1:
    print(format_parts(rows[0]))
  if args.json:
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
