"""S-BASE (Sinkhorn-balanced) top-1 MoE LM at tiny CPU size (Clark et al.
2022; paper details unverified, as coded in NVIDIA/Megatron-LM's
`sinkhorn` routing).

8 experts in every other feed-forward block. In training, exp(z) of each
group of 512 tokens is Sinkhorn-normalised to uniform expert marginals (fp32,
no gradient, tolerance 1e-4) and its top-1 picks each token's expert; the
gate is the unbalanced sigmoid(z) of that expert (Megatron: sigmoid at k = 1,
softmax at k > 1), the router's only gradient. No balancing loss (Megatron
refuses one with Sinkhorn). Evaluation routes greedily (top-1 of sigmoid(z)).
Capacity as in Switch (C = ceil(CF S / E), CF 1.25 / 2.0; Megatron is
dropless by default).

The balancing couples all tokens of a group, so training routing is NOT
causal (a token's expert depends on later tokens' logits); this config opts
in with `allow_noncausal=True`. Evaluation is causal.

  python -m moe_jax.train --config=configs/sbase.py --workdir=runs/sbase

Expected on a 2-core CPU: see the README's results table.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base import get_base_config  # noqa: E402


def get_config():
  config = get_base_config()
  config.model.moe.router = "sinkhorn"
  config.model.moe.top_k = 1
  config.model.moe.allow_noncausal = True
  config.loss.load_balancing_weight = 0.0
  return config
