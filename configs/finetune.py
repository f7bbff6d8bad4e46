"""Fine-tuning an MoE run (Switch, Fedus et al. 2021, §4 and Table 4;
ST-MoE, Zoph et al. 2022, §4): a recipe on top of the config the source run
was trained with.

  python -m moe_jax.train --config=configs/finetune.py --workdir=runs/finetune

alone trains the recipe from scratch (no source). The usual use names the
run to start from and the recipe:

  python -m moe_jax.train --workdir=runs/switch_ft_code \
    --config=configs/finetune.py:init_from=runs/switch_top1,domains=code,expert_dropout=0.4,freeze=router

Arguments (`get_config("key=value,...")`; several names joined with "+"):

  init_from       the source: a workdir (its newest checkpoint) or a step
                  directory <workdir>/checkpoints/<step> ("" = none)
  base            the config file the source ran, in configs/ (default
                  switch_top1); the architecture must match it exactly
  restore         what init_from restores: "params" plus any of
                  "router_state", "opt_state" (default params+router_state)
  domains         the data: code | prose | code+prose (default: all)
  dropout         model.dropout_rate outside the experts (Switch: 0.1)
  expert_dropout  model.moe.expert_dropout_rate (Switch Table 4: 0.4)
  freeze          parameter groups with no update: router | experts |
                  non_expert | embeddings, e.g. non_expert (ST-MoE §4:
                  "only MoE parameters") or experts+router ("only non-MoE",
                  which ST-MoE finds as good as all); "" = none
  router_lr       the router's learning-rate multiplier (1.0; no paper
                  value)
  lr, steps       constant learning rate after 10 warmup steps, and the
                  number of steps (1e-3, a third of the base peak, and 500:
                  chosen for the CPU size, not from a paper)
  balance         config.loss.load_balancing_weight (default: the base's;
                  ST-MoE §4 keeps the auxiliary loss on while fine-tuning)

The fine-tuning run counts its own steps from 0, with its own data,
schedule and optimizer (unless restore names opt_state). Relaunching it
resumes its own checkpoint; init_from is read once, at its fresh start.
Watch the routing for collapse with `moe_jax.metrics.detect_collapse` on
the run's metrics.jsonl.
"""

import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from moe_jax.reproduction import take_args  # noqa: E402

DEFAULTS = {
  "init_from": "",
  "base": "switch_top1",
  "restore": "params+router_state",
  "domains": "",
  "dropout": 0.1,
  "expert_dropout": 0.4,
  "freeze": "",
  "router_lr": 1.0,
  "lr": 1e-3,
  "steps": 500,
  "balance": -1.0,  # < 0: the base config's weight
}


def names(value) -> tuple[str, ...]:
  """ "code+prose" -> ("code", "prose"); "" -> ()."""
  return tuple(part for part in str(value or "").split("+") if part)


def load_base(name: str):
  """get_config() of configs/<name>.py."""
  if not (HERE / f"{name}.py").is_file() or name in ("base", "finetune"):
    raise ValueError(
      f"base={name!r} is not a config of {HERE}: name the file the source "
      "run was trained with, e.g. switch_top1."
    )
  return importlib.import_module(name).get_config()


def get_config(arg=None):
  v = take_args(arg, DEFAULTS)
  config = load_base(v["base"])
  config.init_from = str(v["init_from"])
  config.init_restore = names(v["restore"])
  if v["domains"]:
    config.data.domains = names(v["domains"])
  config.model.dropout_rate = float(v["dropout"])
  config.model.moe.expert_dropout_rate = float(v["expert_dropout"])
  config.optimizer.freeze = names(v["freeze"])
  config.optimizer.router_learning_rate_multiplier = float(v["router_lr"])
  config.optimizer.learning_rate = float(v["lr"])
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 10
  if v["balance"] >= 0:
    config.loss.load_balancing_weight = float(v["balance"])
  steps = int(v["steps"])
  config.train.num_steps = steps
  config.train.log_every = max(steps // 50, 1)
  config.train.eval_every = max(steps // 5, 1)
  config.train.checkpoint_every = steps
  return config
