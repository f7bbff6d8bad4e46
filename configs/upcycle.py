"""Sparse upcycling (Komatsuzaki et al. 2022): an MoE run started from a
trained dense run (moe_jax.upcycle).

  python -m moe_jax.train --config=configs/upcycle.py --workdir=runs/upcycle

alone trains the MoE model from scratch: the baseline upcycling is
compared with. Upcycling first trains the dense model, then starts the MoE
run from it:

  python -m moe_jax.train --config=configs/dense.py --workdir=runs/dense
  python -m moe_jax.train --workdir=runs/upcycled \
    --config=configs/upcycle.py:init_from=runs/dense

Each expert of block l starts as a copy of the dense FFN of block l, the
routers start from the model's own initialisation (the run's seed), every
other parameter is copied; Adam's moments, the step and the schedule start
fresh. The model is configs/switch_top1.py (whose dense twin is
configs/dense.py: FFN width top_k * expert_dim = 512 = one expert) with
router "mixtral" at top_k = 1: the gate is a softmax over the one chosen
logit, 1, and evaluation (capacity factor 2.0 here, and with
--config.model.moe.dispatch=dropless none at all) drops nothing as long as
no expert takes more than twice its share, so the upcycled model starts
computing exactly the dense model (tests/test_upcycle.py). With
router=switch (the raw softmax gate p) each MoE block's FFN starts scaled
by p, about 1/E: the upcycled model starts worse than the dense one.

Arguments: init_from (the dense workdir or step directory; "" = train from
scratch), router (mixtral | switch | top_k_renormalized), steps, lr (peak
of the base's warmup + cosine schedule; default the base's 3e-3).
Komatsuzaki et al. train their upcycled models with the dense run's
optimizer settings; their exact decoder recipe is not reproduced here.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from switch_top1 import get_config as switch_config  # noqa: E402

from moe_jax.reproduction import take_args  # noqa: E402

DEFAULTS = {"init_from": "", "router": "mixtral", "steps": 1500, "lr": 3e-3}


def get_config(arg=None):
  v = take_args(arg, DEFAULTS)
  config = switch_config()
  config.init_from = str(v["init_from"])
  config.init_upcycle = bool(v["init_from"])
  config.init_restore = ("params",)  # the dense run has no router state
  config.model.moe.router = str(v["router"])
  config.model.moe.top_k = 1
  config.optimizer.learning_rate = float(v["lr"])
  config.train.num_steps = int(v["steps"])
  return config
