"""Compares finished runs side by side: a Markdown table and one loss plot.

  python experiments/compare_runs.py runs/switch_top1 runs/gshard_top2 \
      runs/dense --plot=runs/comparison.png

For each workdir it reads config.json and metrics.jsonl and reports the last
evaluation: validation loss, its ratio to the unigram baseline, and per MoE
layer (mean and worst layer) the dropped-token fraction, MaxVio two ways and
load CV, plus the training throughput. MaxVio_batch is the mean over the
eval batches of each batch's MaxVio; MaxVio_global that of the expert loads
pooled over the whole eval set (Wang 2024 Table 2 reports the global one;
see `moe_jax.metrics.pool_batches`). Runs logged before the two were split
have only `eval/moe/layer_XX/max_violation`, which was the batch mean: it is
read as max_violation_batch, and max_violation_global is "-". The README's
results table is this script's output.
"""

import argparse
import json
import re
from pathlib import Path

import numpy as np

from moe_jax import writers


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
  logs = [r for r in rows if r.get("train/seconds_since_last_log")]
  if len(logs) > 1:  # the first interval includes compilation
    steps = np.diff([r["step"] for r in logs])
    seconds = [r["train/seconds_since_last_log"] for r in logs[1:]]
    batch = config["data"]["batch_size"] * config["data"]["seq_len"]
    out["tokens/s"] = batch * np.sum(steps) / np.sum(seconds)
  else:
    out["tokens/s"] = None
  return out


def markdown_table(summaries: list[dict]) -> str:
  def cell(value):
    if value is None:
      return "-"
    if isinstance(value, tuple):
      return f"{value[0]:.3f} ({value[1]:.3f})"
    if isinstance(value, float):
      return f"{value:,.0f}" if value > 100 else f"{value:.3f}"
    return str(value)

  header = list(summaries[0])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for s in summaries:
    lines.append("| " + " | ".join(cell(s[k]) for k in header) + " |")
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
  print(markdown_table([summarize(w) for w in args.workdirs]))
  print(
    "\ndrop_fraction, max_violation_batch (mean of the eval batches' "
    "MaxVio), max_violation_global (MaxVio of the loads pooled over the eval "
    "set), load_cv: mean over MoE layers (worst layer)."
  )
  if args.plot:
    plot_losses(args.workdirs, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
  main()
