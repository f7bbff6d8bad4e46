"""Evaluates a trained run's checkpoint again, with other evaluation settings,
without retraining: e.g. the same Switch model at several evaluation capacity
factors (Switch Table 1, ST-MoE Table 8), or an expert-choice model with a
causal router (Wang et al. 2024 §5.2).

  python -m moe_jax.evaluate --workdir=runs/switch_top1 \
      --set=model.moe.eval_capacity_factor=1.0 \
      --set=model.moe.eval_capacity_factor=2.0

Each --set is one evaluation (several settings in one: separate them with
";"). The run's own config.json is the starting point; only keys that change
evaluation are accepted (EVAL_KEYS), since any other change would no longer
describe the trained model. Prints one line per evaluation and, with --json,
writes all metrics.
"""

import ast
import json
from pathlib import Path

import jax
import ml_collections

from moe_jax import data, train
from moe_jax.checkpoint import Checkpointer
from moe_jax.models import TransformerConfig, TransformerLM

# Config keys an evaluation may change: they affect routing at evaluation,
# not the trained parameters.
EVAL_KEYS = (
  "model.moe.eval_capacity_factor",
  "model.moe.eval_router",
  "model.moe.eval_priority",
  "model.moe.capacity_rule",
  "model.moe.min_capacity",
  "model.moe.priority",
  "model.moe.dispatch",
  "data.num_eval_batches",
  "data.eval_batch_size",
  # source="instructions": which tasks' held-out examples are evaluated
  # (a subset of the training mixture, e.g. one task).
  "data.instruction_tasks",
)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The ConfigDict a run was trained with (<workdir>/config.json); JSON
  lists become tuples again, as the configs write them."""
  path = Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: is {workdir} a run?")

  def tuples(value):
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    if isinstance(value, list):
      return tuple(tuples(v) for v in value)
    return value

  return ml_collections.ConfigDict(tuples(json.loads(path.read_text())))


def with_overrides(config, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted keys set; only EVAL_KEYS are allowed."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    if key not in EVAL_KEYS:
      raise ValueError(
        f"evaluation cannot change {key!r}: it would no longer describe the "
        f"trained model. Allowed: {', '.join(EVAL_KEYS)}."
      )
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise ValueError(f"{key!r} is not in this run's config.")
    node[leaf] = value
  return config


def evaluate_checkpoint(
  workdir: str, overrides: dict | None = None, step: int | None = None
) -> dict:
  """Restores the checkpoint of `step` (default: the latest) of `workdir`
  and evaluates it on the fixed validation batches under `overrides`.

  Returns:
    {"step": ..., "eval/lm_loss": ..., "eval/moe/layer_XX/...": ...,
     "eval/unigram_baseline": ...}, as the trainer logs evaluations.
  """
  config = with_overrides(load_config(workdir), overrides or {})
  model = TransformerLM(TransformerConfig.from_config(config, data.VOCAB_SIZE))
  tx, _ = train.make_optimizer(config.optimizer, config.train.num_steps)
  eval_batches = data.create_eval_batches(config.data)
  template = train.abstract_state(config, model, tx, eval_batches[0])
  with Checkpointer(
    f"{workdir}/checkpoints", max_to_keep=1, save_interval_steps=1
  ) as ckpt:
    state, _ = ckpt.restore(template, step)
  eval_fn = jax.jit(
    lambda variables, batch: train.eval_step(
      variables, batch, model=model, loss_config=config.loss
    )
  )
  metrics = train.evaluate(eval_fn, train.eval_variables(state), eval_batches)
  out = {"step": int(state.step), **train._host_metrics("eval", metrics)}
  out["eval/unigram_baseline"] = data.unigram_baseline(config.data)
  return out


def _parse_set(text: str) -> dict:
  out = {}
  for item in filter(None, text.split(";")):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--set item {item!r} is not key=value.")
    try:
      out[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = value.strip()
  return out


def main(argv=None):
  import argparse

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    dest="settings",
    help="key=value[;key=value]: one evaluation (repeat for more)",
  )
  parser.add_argument("--json", default="", help="write all metrics here")
  args = parser.parse_args(argv)
  results = []
  for text in args.settings or [""]:
    overrides = _parse_set(text)
    metrics = evaluate_checkpoint(args.workdir, overrides, args.step)
    results.append({"overrides": overrides, "metrics": metrics})
    drops = [v for k, v in metrics.items() if k.endswith("/drop_fraction")]
    drop = f", drop_fraction {sum(drops) / len(drops):.4f}" if drops else ""
    print(
      f"step {metrics['step']} {text or '(as trained)'}: eval loss "
      f"{metrics['eval/lm_loss']:.4f}{drop}"
    )
  if args.json:
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
  main()
