"""Switch Transformer top-1 MoE LM at tiny CPU size (Fedus et al. 2021).

8 experts in every other feed-forward block (Switch §2), top-1 routing with
the raw softmax probability as the gate (Eq. 2), capacity factor 1.25 for
training and 2.0 for evaluation (Eq. 3, no factor K), first choices
dropped left to right, load-balancing loss alpha = 1e-2 (Eqs. 4-6), router
init scale 0.1 and a float32 router (§2.4). No jitter, no z-loss.

  python -m moe_jax.train --config=configs/switch_top1.py --workdir=runs/switch_top1

Expected on a 2-core CPU: see the README's results table (measured with
seed 0 at the committed revision).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base import get_base_config  # noqa: E402


def get_config():
  config = get_base_config()
  config.model.moe.router = "switch"
  config.model.moe.top_k = 1
  config.model.moe.capacity_rule = "switch"
  config.loss.load_balancing = "switch"
  config.loss.load_balancing_weight = 1e-2
  return config
