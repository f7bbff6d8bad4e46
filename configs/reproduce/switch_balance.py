"""Run book: does the load-balancing loss prevent collapse, and what does it
cost? (Switch Transformer §2.2; Shazeer et al. 2017 Table 6.)

Arms: top-1 and top-2 x alpha in {0, 1e-4, 1e-3, 1e-2, 1e-1}, everything
else equal: 8 experts in every other block, raw softmax gates
(router="top_k"; at K = 1 this is Switch's Eq. 2), capacity with the factor K,
C = ceil(K * S * CF / E) with CF 1.25 in training and 2.0 in evaluation (one
rule in every arm), token-major drop order (causal), the Switch loss
alpha * E * sum_e f_e P_e with f from each token's first choice (Eqs. 4-6).

One arm alone:
  python -m moe_jax.train \
    --config=configs/reproduce/switch_balance.py:top_k=1,alpha=0.0,scale=cpu \
    --workdir=runs/balance_top1_alpha0
The whole suite: python experiments/reproduce.py --suite=switch_balance
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scales import apply_scale, load_base  # noqa: E402

from moe_jax.reproduction import Arm, Claim, Plot, Suite, take_args  # noqa: E402

DEFAULTS = {"top_k": 1, "alpha": 1e-2, "scale": "cpu", "seed": 0}
STEPS = {"smoke": 3, "cpu": 600, "gpu": 20_000}
ALPHAS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)


def get_config(arg=None):
  v = take_args(arg, DEFAULTS)
  config = load_base()
  moe = config.model.moe
  moe.router = "top_k"
  moe.top_k = v["top_k"]
  moe.capacity_rule = "gshard"  # C = ceil(K * S * CF / E)
  moe.capacity_factor = 1.25
  moe.eval_capacity_factor = 2.0
  moe.priority = "token_major"
  config.loss.load_balancing = "switch"
  config.loss.load_balancing_weight = float(v["alpha"])
  return apply_scale(config, v["scale"], STEPS, v["seed"])


def _name(k, alpha):
  return f"top{k}_alpha{alpha:g}"


def arms(scale):
  return [
    Arm(_name(k, a), f"top_k={k},alpha={a}", f"top-{k}, alpha={a:g}")
    for k in (1, 2)
    for a in ALPHAS
  ]


_NO_LOSS = "Shazeer 2017 Table 6 (figures from REFERENCE.md, not re-checked)"
CLAIMS = [
  Claim(
    "B1",
    "Without a balancing loss, top-1 routing collapses onto few experts "
    "(load CV far above that with the loss).",
    _NO_LOSS,
    "CV(load) 3.01 without a loss vs 0.05 with w = 0.1",
    "load_cv",
    _name(1, 0.0),
    _name(1, 1e-2),
    ">",
    0.3,
    "a 600-step run may end before collapse completes",
  ),
  Claim(
    "B2",
    "The same for top-2 routing.",
    _NO_LOSS,
    "(top-2 in the paper's MoE-4k runs)",
    "load_cv",
    _name(2, 0.0),
    _name(2, 1e-2),
    ">",
    0.3,
  ),
  Claim(
    "B3",
    "Without the loss the worst expert is far overloaded "
    "(MaxVio, loads pooled over the held-out set).",
    _NO_LOSS,
    "max/mean load 17.80 without vs 1.07-1.47 with a loss",
    "max_violation_global",
    _name(1, 0.0),
    _name(1, 1e-2),
    ">",
    0.5,
  ),
  Claim(
    "B4",
    "Without the loss experts die (share of choices < 10% of even).",
    "Switch §2.2 (no number)",
    "-",
    "dead_experts",
    _name(1, 0.0),
    _name(1, 1e-2),
    ">",
    0.5,
  ),
  Claim(
    "B5",
    "Without the loss more tokens are dropped (eval CF 2.0).",
    "Switch §2.2 (no number)",
    "-",
    "drop_fraction",
    _name(1, 0.0),
    _name(1, 1e-2),
    ">",
    0.01,
  ),
  Claim(
    "B6",
    "Balancing improves quality (lower validation loss).",
    _NO_LOSS,
    "PPL 39.8 without vs 35.6-35.7 with a loss",
    "eval_loss",
    _name(1, 1e-2),
    _name(1, 0.0),
    "<",
    0.005,
    "at 600 steps and 8 experts a collapsed router still trains the "
    "residual stream and the dense blocks",
  ),
  Claim(
    "B7",
    "A larger alpha balances better: alpha 1e-2 beats 1e-3 on CV.",
    "Switch §2.2 (alpha = 1e-2 chosen by sweep; no table)",
    "-",
    "load_cv",
    _name(1, 1e-2),
    _name(1, 1e-3),
    "<",
    0.02,
  ),
  Claim(
    "B8",
    "alpha = 1e-1 overwhelms the LM loss and costs quality vs 1e-2.",
    'Switch §2.2 ("small enough to not overwhelm the cross-entropy")',
    "-",
    "eval_loss",
    _name(1, 1e-1),
    _name(1, 1e-2),
    ">",
    0.005,
  ),
]

SUITE = Suite(
  name="switch_balance",
  title="Load-balancing loss coefficient, top-1 and top-2 (Switch §2.2)",
  question="Does routing collapse without the balancing loss, and what does "
  "a too-large coefficient cost?",
  arms=arms,
  seeds={"smoke": 1, "cpu": 2, "gpu": 3},
  claims=CLAIMS,
  plots=[
    Plot(
      "train/moe/*/load_cv",
      "Load CV over training (mean over MoE layers)",
      "CV of expert load (0 = even)",
    ),
    Plot(
      "train/moe/*/max_violation",
      "MaxVio over training (per batch, mean over MoE layers)",
      "MaxVio (0 = even)",
    ),
    Plot(
      "train/moe/*/drop_fraction",
      "Dropped tokens in training (CF 1.25)",
      "fraction of tokens",
    ),
  ],
  notes="Loss convention: Switch Eq. 4, alpha * E * sum_e f_e P_e, f from "
  "the first choice, summed over MoE layers. Capacity: ceil(K S CF / E), "
  "groups of 512 tokens at cpu scale.",
)
