"""Expert-choice MoE LM at tiny CPU size (Zhou et al. 2022), with a causal
evaluation.

8 experts in every other feed-forward block. Each expert takes the
C = ceil(c S / E) tokens of its group of S = 512 with the highest router
score (softmax over experts), c = 2 as in most of the paper's experiments;
the gate is that score, every expert is exactly full and no balancing loss is
used (paper details unverified; as coded in flaxformer
`ExpertsChooseMaskedRouter`). A token gets 0 to 8 experts, 2 on average.

Expert choice is NOT causal: whether token t is taken depends on the scores
of later tokens of its group, so in this decoder the training loss can read
the future (flaxformer: it "should not be used in decoder blocks"; Wang et
al. 2024 §5.2). This config opts in with `allow_noncausal=True` and
evaluates causally with `eval_router="top_k"`: at evaluation the same router
logits route tokens-choose top-2 (raw softmax gates, C = ceil(4 S / E), i.e.
twice the even share of top-2), dropping in token-major order
(`eval_priority="token_major"`: token t's two choices take their slots
before token t+1's, so no later token decides an earlier drop; the default
k-major order would let later first choices drop earlier second choices).
Compare the train and eval losses: a train loss far below the eval loss is
the leak (REFERENCE (h) A7).

Its dense twin (--config.model.moe.num_experts=0) has FFNs of width c F =
2 x 512 in the MoE blocks: a token runs E C / S = c experts on average.

  python -m moe_jax.train --config=configs/expert_choice.py --workdir=runs/expert_choice

Expected on a 2-core CPU: see the README's results table.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base import get_base_config  # noqa: E402


def get_config():
  config = get_base_config()
  config.model.moe.router = "expert_choice"
  config.model.moe.allow_noncausal = True
  config.model.moe.capacity_rule = "switch"  # C = ceil(c * S / E)
  config.model.moe.capacity_factor = 2.0  # c = 2 (Zhou 2022, "EC-CF2")
  config.model.moe.eval_router = "top_k"
  # Each token's 2 choices before the next token's: k-major order would put
  # all first choices of the group first, so later tokens would decide
  # which earlier second choices are dropped, and the eval would leak too.
  config.model.moe.eval_priority = "token_major"
  config.model.moe.top_k = 2  # K of the causal evaluation
  config.model.moe.eval_capacity_factor = 4.0  # top-2: 2x its even share
  config.loss.load_balancing_weight = 0.0  # none needed (and none sown)
  return config
