"""Compares finished runs side by side: a Markdown table and one loss plot.

  python experiments/compare_runs.py runs/switch_top1 runs/gshard_top2 \
      runs/dense --plot=runs/comparison.png

For each workdir it reads config.json and metrics.jsonl and reports the last
evaluation: validation loss, its ratio to the unigram baseline, and per MoE
layer (mean and worst layer) the dropped-token fraction, MaxVio two ways and
load CV, plus the training throughput (train steps only: compilation and
evaluation intervals excluded, `moe_jax.reproduction.train_tokens_per_second`).
MaxVio_batch is the mean over the eval batches of each batch's MaxVio;
MaxVio_global that of the expert loads pooled over the whole eval set (Wang
2024 Table 2 reports the global one; see `moe_jax.metrics.pool_batches`).
Runs logged before the two were split have only
`eval/moe/layer_XX/max_violation`, which was the batch mean: it is read as
max_violation_batch, and max_violation_global is "-".

The table also shows every config key whose value differs between the
compared runs (`seed` aside), and runs that differ only in their seed are
grouped into one row: "seeds" counts them and each number is mean ± std over
them. The README's results table is this script's output.
"""

import argparse
import json
import re
from pathlib import Path

import numpy as np

from moe_jax import reproduction, writers

_COLUMNS = (
  "drop_fraction",
  "max_violation_batch",
  "max_violation_global",
  "load_cv",
)
# Eval names before MaxVio was split (the old name held the batch mean).
_OLD_NAMES = {"max_violation_batch": "max_violation"}


def _per_layer(row: dict, name: str) -> list[float]:
  return [
    v for k, v in row.items() if re.fullmatch(rf"eval/moe/layer_\d+/{name}", k)
  ]


def summarize(workdir: str) -> dict:
  """The numbers of one run's last evaluation and its throughput."""
  rows = writers.read_metrics(workdir)
  config = json.loads((Path(workdir) / "config.json").read_text())
  evals = [r for r in rows if r.get("eval/lm_loss") is not None]
  if not evals:
    raise ValueError(f"{workdir} has no evaluation in metrics.jsonl yet.")
  last = evals[-1]
  moe = config["model"]["moe"]
  out = {
    "run": Path(workdir).name,
    "router": moe["router"] if moe["num_experts"] else "dense",
    "E/K": f"{moe['num_experts']}/{moe['top_k']}"
    if moe["num_experts"]
    else "-",
    "step": last["step"],
    "eval loss": last["eval/lm_loss"],
    "/ unigram": last["eval/lm_loss"] / last["eval/unigram_baseline"],
  }
  for name in _COLUMNS:
    per_layer = _per_layer(last, name)
    if not per_layer and name in _OLD_NAMES:
      per_layer = _per_layer(last, _OLD_NAMES[name])
    out[name] = (np.mean(per_layer), np.max(per_layer)) if per_layer else None
  out["tokens/s"] = reproduction.train_tokens_per_second(rows, config)
  return out


def flat_config(workdir: str) -> dict:
  """config.json as {"model.moe.top_k": 2, ...}."""
  config = json.loads((Path(workdir) / "config.json").read_text())
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f"{prefix}{key}.")
      else:
        out[f"{prefix}{key}"] = value

  walk(config, "")
  return out


def differing_keys(configs: list[dict]) -> list[str]:
  """Config keys (not `seed`) whose values are not the same in all runs."""
  keys = sorted(set().union(*configs) - {"seed"})
  missing = object()
  return [
    k
    for k in keys
    if len({json.dumps(c.get(k, missing), default=str) for c in configs}) > 1
  ]


def group_seeds(workdirs: list[str]) -> list[dict]:
  """One row per configuration: summaries of runs that differ only in seed
  merged (numbers -> (mean, std) lists), with the differing config keys."""
  configs = [flat_config(w) for w in workdirs]
  keys = differing_keys(configs)
  groups: dict[str, list[int]] = {}
  for i, config in enumerate(configs):
    signature = json.dumps(
      {k: v for k, v in config.items() if k != "seed"},
      sort_keys=True,
      default=str,
    )
    groups.setdefault(signature, []).append(i)
  rows = []
  for members in groups.values():
    summaries = [summarize(workdirs[i]) for i in members]
    first = summaries[0]
    row = {
      "run": first["run"]
      if len(members) == 1
      else "+".join(summaries[i]["run"] for i in range(len(members)))
    }
    row["seeds"] = len(members)
    row.update({k: configs[members[0]].get(k) for k in keys})
    for name in first:
      if name == "run" or name in row:
        continue
      values = [s[name] for s in summaries]
      row[name] = _merge(values)
    rows.append(row)
  return rows


def _merge(values):
  """Equal values stay as they are; numbers become ("±", mean, std)."""
  if all(v == values[0] for v in values):
    return values[0]
  if all(isinstance(v, tuple) for v in values):
    return tuple(float(np.mean([v[i] for v in values])) for i in range(2))
  if all(isinstance(v, (int, float)) for v in values):
    return ("±", float(np.mean(values)), float(np.std(values, ddof=1)))
  return "/".join(map(str, values))


def markdown_table(summaries: list[dict]) -> str:
  def number(value):
    return f"{value:,.0f}" if abs(value) > 100 else f"{value:.3f}"

  def cell(value):
    if value is None:
      return "-"
    if isinstance(value, tuple) and value and value[0] == "±":
      return f"{number(value[1])} ± {number(value[2])}"
    if isinstance(value, tuple):
      return f"{value[0]:.3f} ({value[1]:.3f})"
    if isinstance(value, float):
      return number(value)
    return str(value)

  header = list(summaries[0])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for s in summaries:
    lines.append("| " + " | ".join(cell(s.get(k)) for k in header) + " |")
  return "\n".join(lines)


def plot_losses(workdirs: list[str], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  for workdir in workdirs:
    rows = writers.read_metrics(workdir)
    ev = [
      (r["step"], r["eval/lm_loss"])
      for r in rows
      if r.get("eval/lm_loss") is not None
    ]
    ax.plot(*zip(*ev), marker="o", label=Path(workdir).name)
  ax.set_xlabel("step")
  ax.set_ylabel("validation loss (nats / token)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--plot", default="", help="PNG path for the loss plot")
  args = parser.parse_args()
  print(markdown_table(group_seeds(args.workdirs)))
  print(
    "\ndrop_fraction, max_violation_batch (mean of the eval batches' "
    "MaxVio), max_violation_global (MaxVio of the loads pooled over the eval "
    "set), load_cv: mean over MoE layers (worst layer); a ± b: mean ± std "
    "over the seeds of a row; columns between 'seeds' and 'router': the "
    "config keys that differ; tokens/s: median over logging intervals, "
    "compilation and evaluation excluded."
  )
  if args.plot:
    plot_losses(args.workdirs, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
  main()
