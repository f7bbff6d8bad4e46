"""Noisy top-k gating MoE LM at tiny CPU size (Shazeer et al. 2017).

8 experts in every other feed-forward block, top-2 noisy gating:
H = x W_g + eps * softplus(x W_noise), eps ~ N(0, 1) in training only
(Eq. 4), G = softmax over the two largest H (Eqs. 3, 5), W_g and W_noise
initialised to zero (App. A). Balanced by the paper's two losses with
w_importance = w_load = 0.1 (Table 6): CV(sum_x G(x))^2 (Eqs. 6-7) and the
smooth load estimator CV(sum_x Phi(((x W_g)_i - kth_excluding(H, k, i)) /
softplus((x W_noise)_i)))^2 (App. A, Eqs. 8-11), per group of 512 tokens.
The paper has no capacity limit; here C = ceil(2 K S / E) drops little.
The paper's models are LSTMs with thousands of experts (k = 4); this is the
gating and the losses only.

  python -m moe_jax.train --config=configs/noisy_top_k.py --workdir=runs/noisy_top_k

Expected on a 2-core CPU: see the README's results table.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base import get_base_config  # noqa: E402


def get_config():
  config = get_base_config()
  config.model.moe.router = "noisy_top_k"
  config.model.moe.top_k = 2
  config.model.moe.router_init_scale = 0.0  # App. A: W_g = 0 (W_noise = 0)
  config.model.moe.capacity_rule = "gshard"  # C = ceil(CF * K * S / E)
  config.model.moe.capacity_factor = 2.0
  config.model.moe.eval_capacity_factor = 2.0
  # Token by token, so drops stay causal in this decoder (Shazeer 2017 sets
  # no drop order; k-major at K = 2 would let later tokens decide).
  config.model.moe.priority = "token_major"
  config.loss.load_balancing_weight = 0.0
  config.loss.importance_loss_weight = 0.1  # Table 6
  config.loss.load_loss_weight = 0.1  # Table 6
  return config
