"""Run book: where the MoE layers go (GLaM's layout: top-2, many experts,
every other block) vs every block vs the FLOP-matched dense models.

Arms: top-2 with 16 experts in every other block (GLaM) and in every block,
and the dense twin of each (num_experts=0: every MoE block becomes a dense
FFN of width K x expert_dim, so each pair does the same work per token).
Renormalised top-2 gates (GShard Alg. 1, as GLaM), capacity C = ceil(K S CF
/ E), CF 1.25 / 2.0, token-major drops, Switch loss alpha = 1e-2. GLaM's own
64-expert models are the run book configs/paper/glam_64e.py.

One arm alone:
  python -m moe_jax.train --config=configs/reproduce/glam.py:moe_every=1 \
    --workdir=runs/glam_every_layer
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scales import apply_scale, load_base  # noqa: E402

from moe_jax.reproduction import Arm, Claim, Suite, take_args  # noqa: E402

DEFAULTS = {"moe_every": 2, "experts": 16, "scale": "cpu", "seed": 0}
STEPS = {"smoke": 3, "cpu": 600, "gpu": 20_000}


def get_config(arg=None):
  v = take_args(arg, DEFAULTS)
  config = load_base()
  config.model.moe_every = int(v["moe_every"])
  moe = config.model.moe
  moe.router = "top_k_renormalized"
  moe.top_k = 2
  moe.num_experts = int(v["experts"])
  moe.capacity_rule = "gshard"
  moe.capacity_factor = 1.25
  moe.eval_capacity_factor = 2.0
  moe.priority = "token_major"
  config.loss.load_balancing = "switch"
  config.loss.load_balancing_weight = 1e-2
  return apply_scale(config, v["scale"], STEPS, v["seed"])


def arms(scale):
  return [
    Arm("moe_every2", "moe_every=2", "MoE every other block (GLaM)"),
    Arm("dense_every2", "moe_every=2,experts=0", "dense twin of every-other"),
    Arm("moe_every1", "moe_every=1", "MoE every block"),
    Arm("dense_every1", "moe_every=1,experts=0", "dense twin of every-block"),
  ]


CLAIMS = [
  Claim(
    "G1",
    "Top-2 MoE in every other block beats its FLOP-matched dense model.",
    "GLaM (Du et al. 2022) §5-6",
    "GLaM beats dense models of equal FLOPs per token at every size",
    "eval_loss",
    "moe_every2",
    "dense_every2",
    "<",
    0.005,
  ),
  Claim(
    "G2",
    "The same with MoE in every block.",
    "GLaM layout alternative",
    "-",
    "eval_loss",
    "moe_every1",
    "dense_every1",
    "<",
    0.005,
  ),
  Claim(
    "G3",
    "MoE in every block beats every other block per step (more "
    "parameters and more expert FLOPs).",
    "GLaM §3 (layout choice)",
    "-",
    "eval_loss",
    "moe_every1",
    "moe_every2",
    "<",
    0.005,
  ),
]

SUITE = Suite(
  name="glam",
  title="MoE every other block vs every block vs dense (GLaM layout)",
  question="Does GLaM's layout beat the dense model at equal compute, and "
  "what does an MoE in every block add?",
  arms=arms,
  seeds={"smoke": 1, "cpu": 2, "gpu": 2},
  claims=CLAIMS,
  notes="Top-2 renormalised gates, 16 experts of width 512, `gshard` "
  "capacity rule with CF 1.25 / 2.0, Switch loss alpha 1e-2 summed over MoE "
  "layers. The dense twins are wider in the blocks that are MoE blocks in "
  "their MoE arm (width 2 x 512).",
)
