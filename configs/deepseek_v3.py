"""DeepSeek-V3-style MoE LM at tiny CPU size (DeepSeek-AI 2024, §2.1.2).

16 fine-grained routed experts of width 128 (a quarter of the dense FFN's
512; DeepSeekMoE's fine-grained segmentation) plus 1 shared expert of width
128, in every other feed-forward block, SwiGLU experts. Each token chooses
K = 4 routed experts (active routed width 4 x 128 = the dense 512; with the
shared expert 640, the width of its dense twin, num_experts=0):

  s = sigmoid(z)                                   (Eq. 15, float32)
  chosen = TopK(s + b) within the 2 best of 4 expert groups of 4, a group
           scoring the sum of its 2 best s + b (node-limited routing)
  g = s_i / sum_{chosen} s_j                       (Eq. 13; scale 1.0 here,
                                                    V3 uses 2.5 at 256)

Balance comes from the auxiliary-loss-free bias b (Wang et al. 2024 Alg. 1):
after every step each MoE layer moves its b_i by u = 1e-3 towards the mean
load (Fig. 4's best u); b lives in the train state's `router_state`, is
checkpointed and gets no gradient. The complementary sequence-wise balance
loss has alpha = 1e-4 (Eqs. 17-20, §4.2). DeepSeek-V3 drops no tokens
(§2.1.2), and neither does this config: dispatch="dropless" sorts the pairs
by expert for a grouped matmul, with no capacity. On a device mesh, where
dropless is refused, use --config.model.moe.dispatch=indices with the
capacity factor below (C = ceil(2 K S / E), twice the even share). Groups of
512 tokens hold 4 sequences; the balance loss is still computed per
sequence.

  python -m moe_jax.train --config=configs/deepseek_v3.py --workdir=runs/deepseek_v3

The same routing balanced by the auxiliary loss alone instead of the bias
is configs/deepseek_aux_loss.py. Logged per MoE layer:
moe/layer_XX/max_violation_before_bias (the load TopK(s) would give) and
max_violation_after_bias (the load with b), MaxVio of Wang 2024 Eq. 4, per
training batch; at evaluation each as _batch (mean over the eval batches)
and _global (the load pooled over the eval set, Wang 2024 Table 2's).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base import get_base_config  # noqa: E402


def get_config():
  config = get_base_config()
  config.model.activation = "silu"  # SwiGLU experts, as DeepSeek-V3
  config.model.gated = True
  moe = config.model.moe
  moe.router = "deepseek"
  moe.num_experts = 16
  moe.top_k = 4
  moe.expert_dim = 128  # fine-grained: a quarter of mlp_dim = 512
  moe.num_shared_experts = 1
  moe.shared_expert_dim = 128
  moe.num_expert_groups = 4
  moe.top_expert_groups = 2
  moe.expert_group_score_k = 2  # DeepSeek-V3 code: sum of the top-2 scores
  moe.routed_scaling_factor = 1.0
  moe.bias_update_rate = 1e-3  # Wang 2024 Fig. 4
  moe.dispatch = "dropless"  # as DeepSeek-V3: no capacity, no drops
  # Used only with a capacity backend (dispatch="indices" or "einsum"):
  moe.capacity_rule = "gshard"  # C = ceil(CF * K * S / E)
  moe.capacity_factor = 2.0
  moe.eval_capacity_factor = 2.0
  config.loss.sequence_balance_weight = 1e-4  # DeepSeek-V3 §4.2: alpha
  return config
