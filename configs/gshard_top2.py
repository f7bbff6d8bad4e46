"""GShard top-2 MoE LM at tiny CPU size (Lepikhin et al. 2020).

8 experts in every other feed-forward block (GShard §2.1), top-2 routing
with renormalised gates g_i / (g1 + g2) (Alg. 1), the second expert kept
with probability 2 * g2 in training (the "random" policy, Alg. 1 line 12;
a rejected second choice takes no slot, as in Lingvo and Mesh TF, where
Alg. 1 itself advances the counter: `second_choice_counting="gshard_alg1"`),
capacity 2S/E per group (the factor K in capacity: ceil(K * S * CF / E),
CF 1.0 train / 2.0 eval), all first choices before any second choice, and
the GShard auxiliary loss in its Switch-scaled form (first-choice f, x E^2
as in Lingvo/praxis) with weight 1e-2.

  python -m moe_jax.train --config=configs/gshard_top2.py --workdir=runs/gshard_top2

Expected on a 2-core CPU: see the README's results table.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base import get_base_config  # noqa: E402


def get_config():
  config = get_base_config()
  config.model.moe.router = "gshard"
  config.model.moe.top_k = 2
  config.model.moe.second_policy = "random"
  # Lingvo / Mesh TF counting; "gshard_alg1" for Alg. 1's literal counter.
  config.model.moe.second_choice_counting = "kept_only"
  config.model.moe.capacity_rule = "gshard"
  config.model.moe.capacity_factor = 1.0
  config.model.moe.eval_capacity_factor = 2.0
  config.model.moe.priority = "k_major"
  # k-major at K = 2 is not causal (README, Causality); kept as in GShard.
  config.model.moe.allow_noncausal = True
  config.loss.load_balancing = "switch"
  config.loss.load_balancing_weight = 1e-2
  return config
