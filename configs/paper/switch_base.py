"""Switch-Base with 128 experts (Fedus et al. 2021), paper scale, as a
decoder-only byte LM. Run book; does not fit a CPU.

  python -m moe_jax.train --config=configs/paper/switch_base.py --workdir=runs/switch_base

Mapping. Switch-Base is a T5-Base encoder-decoder (12 + 12 blocks) with a
Switch layer in every other FFN of both stacks. moe_jax is a decoder-only LM
over bytes (vocabulary 256), so the two stacks become one causal decoder of
12 + 12 = 24 blocks with the MoE layer in every other block: the same 12 MoE
layers and about the same total parameters, but no cross-attention, learned
absolute positions instead of T5's relative bias, LayerNorm instead of
RMSNorm, a 256-byte embedding instead of 32,128 sentencepieces, and each
token passes through all 24 blocks (per-token FLOPs are the encoder's plus
the decoder's). The objective is next-byte prediction, not span corruption,
so losses are not comparable with the paper's.

Architecture and routing (sources):
  d_model 768, 12 heads of 64, FFN / expert width 3072, ReLU, not gated,
    12 + 12 blocks, MoE every other FFN, dropout 0.1: the released
    google/switch-base-{8,...,256} config.json (HF Hub) and flaxformer
    `t5x/configs/moe/models/switch_base.gin` (MLP_DIM 3072, relu). Table 9 of
    the paper lists Switch-Base with GEGLU and d_ff 2048 instead; both give
    the same 4.72M parameters per expert (2 x 768 x 3072 = 3 x 768 x 2048).
  128 experts, every other FFN: Table 1 caption ("All MoE and Switch
    Transformer models use 128 experts, with experts at every other
    feed-forward layer") and Table 9.
  top-1, raw probability as gate (router="switch"): Eq. 2.
  capacity C = ceil(S / E * CF) (capacity_rule="switch"), Eq. 3; CF 1.25
    train / 2.0 eval: switch_base.gin (Table 1 has rows at 1.0, 1.25, 2.0).
  group size S = 8192 tokens: switch_base.gin GROUP_SIZE.
  load-balancing loss alpha = 1e-2, Switch form (Eqs. 4-6), summed over
    layers ("for each Switch layer"): §2.2.
  router init 0.1x (truncated normal, std sqrt(0.1 / fan_in)): §2.4, Table 3.
  float32 router, bfloat16 elsewhere (selective precision): §2.4, Table 2.
  input jitter eps = 1e-2: App. C ("Throughout this work, we use input
    jitter"); the T5X gin drops it.
  no router z-loss (z-loss is from ST-MoE).

Training (sources):
  100k steps: Table 1 ("Quality after 100k steps").
  2^20 tokens per batch: §4.1 (the fine-tuning baselines' pre-training);
    Table 1's batch size is not stated (unverified for Table 1). Here 2048
    sequences of 512 bytes; 512 is T5's input length (unverified for Switch).
  optimizer: the paper (T5) uses Adafactor with an inverse-square-root decay;
    moe_jax has AdamW only, so the learning rate 1e-3, the 10k warm-up steps
    and the cosine decay below are moe_jax choices, not the paper's
    (unverified).

Parameters: 7.36B in moe_jax (7.25B of them experts) vs 7.4B ("7,410M",
Table 8; "7B", Table 9). The real encoder-decoder (32,128 sentencepieces,
cross-attention) is the cost model's preset: `python -m moe_jax.cost
--preset=switch_base` gives 7.42B total, 224M active per token. Hardware: float32 parameters + AdamW's two moments
take 12 bytes per parameter, about 88 GB, plus 29 GB of gradients and the
activations of 2^20 tokens: shard over several accelerators (the paper used
32 TPUv3 cores), e.g. `--config.mesh.shape="(4,8,1)"` with experts on the
expert axis, or shrink the batch with `--config.data.batch_size`.

What the paper reports (Table 1, C4 span corruption, neg. log perplexity
after 100k steps): Switch-Base CF 1.25 -1.553 (CF 1.0 -1.561, CF 2.0
-1.554) vs T5-Base -1.731 and T5-Large -1.550; Table 9: -1.370 at 250k and
-1.306 at 500k steps.

Data: the embedded corpus by default. For a real corpus prepared with TFDS
(moe_jax.data): `--config.data.source=tfds --config.data.tfds_name=c4/en
--config.data.data_dir=/path/to/tensorflow_datasets`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from base import get_base_config  # noqa: E402


def get_config(arg=None):
  del arg  # one size only
  config = get_base_config()
  config.data.seq_len = 512
  config.data.batch_size = 2048
  config.data.eval_batch_size = 256
  config.data.num_eval_batches = 16
  config.data.max_code_bytes = 100_000_000

  m = config.model
  m.d_model = 768
  m.num_layers = 24  # 12 encoder + 12 decoder blocks
  m.num_heads = 12
  m.mlp_dim = 3072
  m.activation = "relu"
  m.gated = False
  m.dropout_rate = 0.1
  m.dtype = "bfloat16"  # the router stays float32
  m.moe_every = 2

  moe = m.moe
  moe.num_experts = 128
  moe.router = "switch"
  moe.top_k = 1
  moe.expert_dim = 3072
  moe.group_size = 8192
  moe.capacity_factor = 1.25
  moe.eval_capacity_factor = 2.0
  moe.capacity_rule = "switch"
  moe.min_capacity = 4
  moe.priority = "k_major"  # top-1: one rank, left to right
  moe.router_init_scale = 0.1
  moe.router_jitter = 1e-2
  moe.router_dtype = "float32"

  config.loss.load_balancing = "switch"
  config.loss.load_balancing_weight = 1e-2
  config.loss.router_z_loss_weight = 0.0
  config.loss.layer_reduction = "sum"

  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 10_000
  config.optimizer.schedule = "cosine"

  config.train.num_steps = 100_000
  config.train.log_every = 100
  config.train.eval_every = 5_000
  config.train.checkpoint_every = 5_000
  return config
