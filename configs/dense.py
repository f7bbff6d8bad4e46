"""FLOP-matched dense baseline of configs/switch_top1.py.

The same transformer with num_experts = 0: every block that holds an MoE
layer in the Switch config gets a dense FFN of width top_k * expert_dim =
512 instead, so each token costs the same FLOPs as in the MoE model (minus
the router's D*E). For the baseline of another MoE config, pass
--config.model.moe.num_experts=0 with that config: its MoE blocks get the
width of everything active per token, routed and shared experts
(`moe_jax.models.transformer.dense_twin_dim`; e.g. 640 for
configs/deepseek_v3.py, 4 x 128 routed + 128 shared).

  python -m moe_jax.train --config=configs/dense.py --workdir=runs/dense

Expected on a 2-core CPU: see the README's results table.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base import get_base_config  # noqa: E402


def get_config():
  config = get_base_config()
  config.model.moe.num_experts = 0
  config.loss.load_balancing_weight = 0.0
  return config
