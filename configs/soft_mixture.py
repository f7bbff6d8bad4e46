"""Dense soft mixture of 8 experts on the tiny CPU LM (Jacobs et al. 1991).

Every token goes to every expert, weighted by the router's softmax:
y = sum_e softmax(x W_g)_e FFN_e(x) (Shazeer 2017 Eqs. 1-2 notation), no
sparsity, no capacity limit, no balancing loss. The historical baseline of
sparse MoE and the K = E limit of top-k routing; it costs 8 experts' FLOPs
per token, so its FLOP-matched dense baseline is
`--config.model.moe.num_experts=0` (a dense FFN of width 8 x 512).

  python -m moe_jax.train --config=configs/soft_mixture.py --workdir=runs/soft_mixture

Expected on a 2-core CPU: see the README's results table.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base import get_base_config  # noqa: E402


def get_config():
  config = get_base_config()
  config.model.moe.router = "soft_mixture"
  config.model.moe.top_k = 8  # = num_experts
  config.loss.load_balancing_weight = 0.0
  return config
