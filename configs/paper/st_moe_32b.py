"""ST-MoE-32B (Zoph et al. 2022), paper scale, as a decoder-only byte LM.
Run book; needs a large accelerator cluster.

  python -m moe_jax.train --config=configs/paper/st_moe_32b.py --workdir=runs/st_moe_32b

Mapping. ST-MoE-32B is an encoder-decoder of 24 + 24 blocks (flaxformer
`st_moe_32b.gin`) with an MoE layer in every fourth FFN of both stacks (6 +
6). moe_jax is a decoder-only LM over bytes (vocabulary 256), so the stacks
become one causal decoder of 48 blocks with MoE in every fourth: the same 12
MoE layers and most of the parameters, but no cross-attention, learned
absolute positions, LayerNorm instead of RMSNorm, a 256-byte embedding, and
each token passes through all 48 blocks. Not representable here: the
sparse-dense stacking (App. C; flaxformer `extra_mlp`: 12 x 315M = 3.8B
parameters missing), the multiplicative expert bias (App. C), and d_kv = 128
with 64 heads (an 8192-wide attention on a 5120-wide model): moe_jax ties
the head width to d_model / num_heads, so its 64 heads are 80 wide. Next-byte
prediction, not span corruption: losses are not comparable.

Architecture and routing (sources):
  d_model 5120, GEGLU FFN (model.gated=True, activation "gelu"), d_ff 20480,
    d_kv 128: Table 11 and st_moe_32b.gin (EMBED_DIM, MLP_DIM, HEAD_DIM).
  64 heads, 24 + 24 blocks, 6 + 6 sparse layers: st_moe_32b.gin (NUM_HEADS,
    NUM_*_LAYERS, NUM_*_SPARSE_LAYERS); "Expert Layer Freq." 1/4: Table 11.
  64 experts: st_moe_32b.gin NUM_EXPERTS (REFERENCE §e).
  top-2, raw softmax gates (router="top_k"): §5 recommendation;
    flaxformer tokens_choose_base.gin NUM_SELECTED_EXPERTS = 2.
  CF 1.25 train / 2.0 eval: §5.2 ("we therefore continue to use the smaller
    train capacity factor of 1.25"), st_moe_32b.gin. Capacity round(CF S /
    E), at least 4 (capacity_rule="flaxformer"): flaxformer moe_layers.py.
  group size S = 4096: st_moe_32b.gin GROUP_SIZE ("pre-training group size").
  priority "token_major" so the decoder stays causal at K = 2 (the papers
    drop k-major, which leaks in a decoder, REFERENCE §c);
    `--config.model.moe.priority=k_major` gives the papers' order.
  c_B = 1e-2 Switch form: App. A. c_z = 1e-3: App. B and st_moe_32b.gin
    ROUTER_Z_LOSS_FACTOR ("helps w/ pre-training stability").
  router init 0.1x: §6.2 ("follows the initialization scheme proposed in
    Fedus et al."); flaxformer uses normal(0.02).
  float32 router, bfloat16 elsewhere: flaxformer moe.gin ACTIVATION_DTYPE.
  dropout 0.0: flaxformer moe.gin DROPOUT_RATE (st_moe_32b.gin keeps it).

Training (sources): 1.5T tokens, 1M tokens per batch, Adafactor with 10k
warm-up steps then inverse square root decay, on C4 + the GLaM dataset
(§6.2). 2048 sequences of 512 bytes = 2^20 tokens per batch (sequence
length 512 unverified for 32B: §6.1 states 512 for ST-MoE-L's encoder);
1.5e12 / 2^20 = 1,430,512 steps (derived). The learning rate 1e-3 and the
cosine decay are moe_jax choices (AdamW only; unverified).

Parameters: 258B in moe_jax (242B experts) vs 269B (abstract, Table 11);
the gap is the missing sparse-dense FFNs, the narrower attention,
cross-attention and the vocabulary; the real encoder-decoder with all of
them is the cost model's preset (`python -m moe_jax.cost --preset=st_moe_32b`:
269.1B total, 35.1B active per token through both stacks). Hardware: 12 bytes per parameter for
float32 parameters + AdamW moments, about 3.1 TB, plus 1 TB of gradients:
hundreds of accelerators with expert and data parallelism (the paper: "64-way
data parallelism cores and 16-way model parallelism cores",
st_moe_32b.gin), e.g. `--config.mesh.shape="(-1,64,1)"`. moe_jax has no
model (tensor) parallel attention or dense FFNs beyond the mesh's "model"
axis rules (README "Distributed training").

What the paper reports: SuperGLUE test 91.2 (Table 12, state of the art at
publication); ARC-Easy 95.2, ARC-Challenge 86.5, XSum ROUGE-2 27.1; Table 9
step time 4.244 s at CF 1.25 (+14% at CF 2.0).

Data: the embedded corpus by default. For a real corpus prepared with TFDS
(moe_jax.data): `--config.data.source=tfds --config.data.tfds_name=c4/en
--config.data.data_dir=/path/to/tensorflow_datasets`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import st_moe_l  # noqa: E402


def get_config(arg=None):
  """ST-MoE-L's recipe (configs/paper/st_moe_l.py) at the 32B sizes."""
  config = st_moe_l.get_config(arg)
  m = config.model
  m.d_model = 5120
  m.num_heads = 64
  m.mlp_dim = 20480
  m.moe.num_experts = 64
  m.moe.expert_dim = 20480
  config.train.num_steps = 1_430_512
  config.train.eval_every = 10_000
  config.train.checkpoint_every = 2_000
  return config
