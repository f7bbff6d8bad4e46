"""Run book: more experts at the same compute per token (Switch Fig. 4 and
App. D).

Arms: the FLOP-matched dense model, and Switch top-1 with E in {2, 4, 8, 16,
32, 64} experts in every other block. Every MoE arm does the same work per
token (one expert of width 512); only its parameter count grows with E.
Capacity C = ceil(S CF / E) with CF 1.25 (train) / 2.0 (eval) over groups of
512 tokens, token-major drops, Switch loss alpha = 1e-2, router init 0.1.
The dense arm is the same config with num_experts=0: each MoE block becomes a
dense FFN as wide as the active experts (`moe_jax.models.transformer`).

One arm alone:
  python -m moe_jax.train --config=configs/reproduce/switch_experts.py:experts=16 \
    --workdir=runs/experts_16
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scales import apply_scale, load_base  # noqa: E402

from moe_jax.reproduction import Arm, Claim, Plot, Suite, take_args  # noqa: E402

DEFAULTS = {"experts": 8, "scale": "cpu", "seed": 0}
STEPS = {"smoke": 3, "cpu": 600, "gpu": 20_000}
EXPERTS = (2, 4, 8, 16, 32, 64)


def get_config(arg=None):
  v = take_args(arg, DEFAULTS)
  config = load_base()
  moe = config.model.moe
  moe.router = "switch"
  moe.top_k = 1
  moe.num_experts = int(v["experts"])
  moe.capacity_rule = "switch"
  moe.capacity_factor = 1.25
  moe.eval_capacity_factor = 2.0
  moe.min_capacity = 1
  config.loss.load_balancing = "switch"
  config.loss.load_balancing_weight = 1e-2
  return apply_scale(config, v["scale"], STEPS, v["seed"])


def arms(scale):
  return [Arm("dense", "experts=0", "dense (FLOP-matched)")] + [
    Arm(f"e{n}", f"experts={n}", f"Switch, {n} experts") for n in EXPERTS
  ]


_FIG4 = "Switch Fig. 4 / App. D"
CLAIMS = [
  Claim(
    "E1",
    "Even 2 experts beat the FLOP-matched dense model.",
    _FIG4,
    "2-8 experts already beat T5-Base",
    "eval_loss",
    "e2",
    "dense",
    "<",
    0.005,
  ),
  Claim(
    "E2",
    "8 experts beat the FLOP-matched dense model.",
    _FIG4,
    "-",
    "eval_loss",
    "e8",
    "dense",
    "<",
    0.005,
  ),
  Claim(
    "E3",
    "64 experts beat the FLOP-matched dense model.",
    _FIG4,
    "64 experts reach T5-Base's 450k-step quality at 60k steps",
    "eval_loss",
    "e64",
    "dense",
    "<",
    0.005,
    "600 steps of 2k tokens give each of 64 experts ~20k tokens",
  ),
  Claim(
    "E4",
    "Quality improves with E: 8 experts beat 2.",
    _FIG4,
    "monotone from 1 to 256 experts",
    "eval_loss",
    "e8",
    "e2",
    "<",
    0.005,
  ),
  Claim(
    "E5",
    "Quality improves with E: 64 experts beat 8.",
    _FIG4,
    "monotone from 1 to 256 experts",
    "eval_loss",
    "e64",
    "e8",
    "<",
    0.005,
    "each expert sees E times fewer tokens in a short run",
  ),
]

SUITE = Suite(
  name="switch_experts",
  title="Number of experts at fixed compute (Switch Fig. 4)",
  question="Does adding experts (parameters) at the same FLOPs per token "
  "keep improving the model, and does any MoE beat its dense twin?",
  arms=arms,
  seeds={"smoke": 1, "cpu": 2, "gpu": 2},
  claims=CLAIMS,
  plots=[Plot("train/lm_loss", "Training loss", "training loss (nats / byte)")],
  notes="All arms: top-1, `switch` capacity rule, CF 1.25 / 2.0, groups of "
  "512 tokens (at 64 experts C = 10), Switch loss alpha 1e-2.",
)
