"""Run book: sparse upcycling vs dense continuation vs an MoE from scratch
(Komatsuzaki et al. 2022, "Sparse Upcycling").

The design, fixed before any run. A dense model (the FLOP-matched dense twin
of configs/upcycle.py: configs/switch_top1.py with num_experts = 0, so every
MoE block's FFN is one expert wide) is pretrained for D steps. From its
checkpoint, E more steps ("extra compute") are spent two ways:

  dense_pretrain   the dense model, D steps, warmup + cosine (the source);
  dense_continue   the dense model started from dense_pretrain's
                   parameters, E steps;
  upcycled         the MoE model (8 experts every other block, router
                   "mixtral" at top-1: gate 1, so it starts computing
                   exactly the dense model) upcycled from dense_pretrain
                   (each expert a copy of its block's FFN, fresh routers;
                   moe_jax.upcycle), E steps;
  moe_scratch      the same MoE model from random initialisation, D + E
                   steps: the same total step (and token) budget as
                   dense_pretrain + upcycled, and about the same FLOPs
                   (top-1 with one-expert-wide FFNs costs a dense step plus
                   the router's D x E).

Both continuations restore the parameters only and restart the same
schedule (warmup + cosine over E steps): the upcycled model cannot take the
dense run's Adam moments (the router has none), so the dense continuation
does not get them either. Every arm sees the same batches per step (the
seed's order) of the same code + prose mixture; all are evaluated on the
same held-out documents. At the cpu scale D = 1200 and E = 800 steps
(about 4.1M tokens in all: 2,000 steps of 16 x 128); Komatsuzaki et al. upcycle T5 and ViT models
after ~1M dense steps, with extra budgets of 10-100% of that.

One arm alone (the upcycled one needs the dense run's workdir):
  python -m moe_jax.train --workdir=runs/up_dense \
    --config=configs/reproduce/upcycle.py:arm=dense_pretrain
  python -m moe_jax.train --workdir=runs/up_upcycled \
    --config=configs/reproduce/upcycle.py:arm=upcycled,init_from=runs/up_dense
"""

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scales import apply_scale  # noqa: E402

from moe_jax.reproduction import Arm, Claim, Plot, Suite, take_args  # noqa: E402

DEFAULTS = {"arm": "dense_pretrain", "scale": "cpu", "seed": 0, "init_from": ""}
# D: the dense pretraining steps; E: the extra steps after it.
STEPS = {"smoke": 3, "cpu": 1200, "gpu": 20_000}
EXTRA = {"smoke": 2, "cpu": 800, "gpu": 10_000}
ARMS = ("dense_pretrain", "dense_continue", "upcycled", "moe_scratch")


def steps_of(args: str, scale: str) -> int:
  """The training steps of an arm (its `get_config` argument) at `scale`."""
  arm = take_args(args, DEFAULTS)["arm"]
  if arm == "dense_pretrain":
    return STEPS[scale]
  if arm == "moe_scratch":
    return STEPS[scale] + EXTRA[scale]
  return EXTRA[scale]


def _upcycle_config():
  """configs/upcycle.py's get_config (switch_top1, router mixtral, top-1)."""
  path = Path(__file__).resolve().parents[1] / "upcycle.py"
  spec = importlib.util.spec_from_file_location("moe_jax_upcycle_cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(arg=None):
  v = take_args(arg, DEFAULTS)
  arm = v["arm"]
  if arm not in ARMS:
    raise ValueError(f"arm={arm!r}; allowed: {ARMS}.")
  config = _upcycle_config()
  config.init_from = ""
  config.init_upcycle = False
  config.init_restore = ("params",)
  if arm in ("dense_pretrain", "dense_continue"):
    config.model.moe.num_experts = 0  # the dense twin: FFN = one expert
    config.loss.load_balancing_weight = 0.0
  config = apply_scale(
    config, v["scale"], {v["scale"]: steps_of(arg, v["scale"])}, v["seed"]
  )
  if arm in ("dense_continue", "upcycled"):
    config.init_from = str(v["init_from"])
    config.init_upcycle = arm == "upcycled"
  return config


def arms(scale):
  return [
    Arm("dense_pretrain", "arm=dense_pretrain", "dense, D steps (source)"),
    Arm(
      "dense_continue",
      "arm=dense_continue",
      "dense continued, +E steps",
      init_from="dense_pretrain",
    ),
    Arm(
      "upcycled",
      "arm=upcycled",
      "upcycled MoE, +E steps",
      init_from="dense_pretrain",
    ),
    Arm("moe_scratch", "arm=moe_scratch", "MoE from scratch, D + E steps"),
  ]


_K = "Komatsuzaki et al. 2022"
CLAIMS = [
  Claim(
    "U1",
    "At equal extra compute, the upcycled MoE beats continuing to train "
    "the dense model.",
    f"{_K}, Fig. 2 and §4.1",
    "upcycled above dense continuation at every extra budget tried "
    "(10-100% of the dense cost), T5 and ViT",
    "eval_loss",
    "upcycled",
    "dense_continue",
    "<",
    0.01,
    "E = 800 steps may be too few for the copied experts to diverge from "
    "each other: until the router and the experts specialise, the upcycled "
    "model computes the dense model, and then it is no better",
  ),
  Claim(
    "U2",
    "At this budget (the dense pretraining + E steps), the upcycled MoE "
    "beats the same MoE trained from scratch for as many steps.",
    f"{_K}, §4.2 (sparse models from scratch)",
    "from-scratch MoEs need far more compute to catch up with the "
    "upcycled ones (they catch up only past ~100% of the dense budget)",
    "eval_loss",
    "upcycled",
    "moe_scratch",
    "<",
    0.01,
    "the from-scratch MoE runs one longer cosine schedule, the upcycled one "
    "two shorter ones (a restart after D); at a few thousand steps a "
    "single schedule can be worth as much as the head start",
  ),
]

SUITE = Suite(
  name="upcycle",
  title="Sparse upcycling vs dense continuation vs MoE from scratch "
  "(Komatsuzaki 2022)",
  question="Given a trained dense model and some extra compute, is it "
  "better spent on the dense model, on an MoE upcycled from it, or was an "
  "MoE from scratch the better use of the whole budget?",
  arms=arms,
  seeds={"smoke": 1, "cpu": 1, "gpu": 2},
  claims=CLAIMS,
  plots=[
    Plot(
      "train/lm_loss",
      "Training loss (the continuations count their steps from 0)",
      "training loss (nats / byte)",
    ),
    Plot(
      "train/moe/*/max_violation",
      "MaxVio over training: the upcycled router breaks the tie of "
      "identical experts",
      "MaxVio (0 = even)",
    ),
  ],
  notes="MoE: configs/upcycle.py (switch_top1 with router `mixtral` at "
  "top-1: the gate is 1, so the upcycled model starts as the dense model; "
  "8 experts every other block, capacity factor 1.25 in training, 2.0 in "
  "evaluation, balance loss 1e-2). Dense: its FLOP-matched twin. "
  "`dense_continue` and `upcycled` start from `dense_pretrain`'s last "
  "checkpoint (same seed), parameters only, with a fresh optimizer and "
  "schedule; their step axis counts from 0, so compare their last "
  "evaluation with `moe_scratch`'s (D + E steps) for U2. One seed at the "
  "cpu scale (the minimum effect decides).",
)
