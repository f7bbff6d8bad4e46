"""Uniform random routing on the tiny CPU LM: the no-learning baseline.

8 experts in every other feed-forward block; in training each token goes
to an expert drawn uniformly afresh every step (rng stream `routing`), with
weight 1; at evaluation the choice is fixed by `routing_seed` (per position
in the group). No router, no gradient, no auxiliary loss; the load is
balanced in expectation. Capacity as in Switch (CF 1.25 / 2.0). (Named
random_routing.py, not random.py, because configs/ is put on sys.path.)

  python -m moe_jax.train --config=configs/random_routing.py --workdir=runs/random_routing

Expected on a 2-core CPU: see the README's results table.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base import get_base_config  # noqa: E402


def get_config():
  config = get_base_config()
  config.model.moe.router = "random"
  config.model.moe.top_k = 1
  config.model.moe.routing_seed = 0
  config.loss.load_balancing_weight = 0.0
  return config
