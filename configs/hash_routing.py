"""Hash-routing MoE LM at tiny CPU size (Roller et al. 2021; unverified).

8 experts in every other feed-forward block; each token goes to the expert
h(token id) of a fixed seeded random table (`routing_seed`), the same in
every MoE block, with weight 1. No router, no router gradient, no auxiliary
loss. Byte frequencies are skewed, so the load is uneven; capacity as in
Switch (C = ceil(CF S / E), CF 1.25 / 2.0) drops the overflow. The
non-learned baseline for learned routers.

  python -m moe_jax.train --config=configs/hash_routing.py --workdir=runs/hash_routing

Expected on a 2-core CPU: see the README's results table.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base import get_base_config  # noqa: E402


def get_config():
  config = get_base_config()
  config.model.moe.router = "hash"
  config.model.moe.top_k = 1
  config.model.moe.routing_seed = 0
  config.loss.load_balancing_weight = 0.0
  return config
