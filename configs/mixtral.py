"""Mixtral-style MoE LM at tiny CPU size (Jiang et al. 2024, "Mixtral of
Experts", §2.1).

8 SwiGLU experts in every feed-forward block, each token routed to K = 2 of
them with the gate a softmax over the two selected logits only:

  G(x) = Softmax(Top2(x W_g))      (Mixtral Eq. 2: the other logits -> -inf)
  y    = sum_i G(x)_i SwiGLU_i(x)  (Mixtral Eq. 1)

which equals p_i / (p_1 + p_2) of the full softmax (router "mixtral" in
moe_jax.routing.ROUTERS). Mixtral drops no tokens, and neither does this
config (dispatch="dropless"). The paper states no balancing loss; this
config keeps the Switch loss in its all-choices form (f counts every one
of the K choices) at the Switch weight 1e-2, so that a short run stays
balanced; set --config.loss.load_balancing_weight=0 for the paper's silence.

  python -m moe_jax.train --config=configs/mixtral.py --workdir=runs/mixtral

Expected on a 2-core CPU: see the README's results table.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base import get_base_config  # noqa: E402


def get_config():
  config = get_base_config()
  config.model.activation = "silu"  # SwiGLU experts (and dense blocks)
  config.model.gated = True
  config.model.moe_every = 1  # every feed-forward block is an MoE
  config.model.moe.router = "mixtral"
  config.model.moe.top_k = 2
  config.model.moe.dispatch = "dropless"  # no capacity, no drops
  config.loss.load_balancing = "all_choices"
  config.loss.load_balancing_weight = 1e-2
  return config
