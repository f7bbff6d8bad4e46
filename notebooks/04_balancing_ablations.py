# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Balancing ablations: the reproduction suites
#
# `experiments/reproduce.py` re-runs comparisons of the MoE papers at small
# scale, one *suite* per comparison (`configs/reproduce/<suite>.py`), and
# stores every run's summary and every claim's verdict in
# `results/<suite>/results.json`. This notebook reads those files; it trains
# nothing. It shows
#
# 1. every claim: the paper's number, ours (mean ± std over seeds) and the
#    verdict;
# 2. for each suite that has results, the per-arm numbers behind its claims.
#
# The verdict rule is fixed before any run (`moe_jax.reproduction`): with d
# the difference of the seed means in the predicted direction, s the pooled
# seed standard deviation (0 with one seed) and m the claim's minimum effect,
# d > max(2s, m) is **reproduced**, d < -max(2s, m) **not reproduced**, and
# anything between **inconclusive**; an arm without finished runs leaves the
# claim **not run**. Each suite's `report.md` next to its `results.json` has
# the full tables and the curves over training.

# %% tags=["parameters"]
# Parameters.
RESULTS_DIR = ""  # "" = the repository's results/

# %%
import importlib.util
import json
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

import moe_jax
from moe_jax import reproduction

REPO = Path(moe_jax.__file__).resolve().parents[1]
RESULTS = Path(RESULTS_DIR) if RESULTS_DIR else REPO / "results"
spec = importlib.util.spec_from_file_location(
  "reproduce", REPO / "experiments" / "reproduce.py"
)
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)

defined = reproduce.suite_names()
stored = sorted(p.parent.name for p in RESULTS.glob("*/results.json"))
results = {
  name: json.loads((RESULTS / name / "results.json").read_text())
  for name in stored
}
suites = {
  name: reproduce.load_suite(name).SUITE for name in stored if name in defined
}
print("suites with results:", ", ".join(stored) or "none")
print(
  "not run yet:",
  ", ".join(name for name in defined if name not in results) or "none",
)

# %% [markdown]
# ## 1. Every claim


# %%
def fmt(mean, std, seeds):
  """mean ± std (std only with more than one seed); "-" when missing."""
  if mean is None or not np.isfinite(mean):
    return "-"
  return f"{mean:.4g}" + (f" ± {std:.2g}" if seeds > 1 else "")


lines = [
  "| suite | claim | paper | metric | ours: left | ours: right "
  "| d / threshold | verdict |",
  "|---|---|---|---|---|---|---|---|",
]
counts = Counter()
for name, result in results.items():
  for row in result.get("claims", []):
    claim, seeds = row["claim"], row.get("seeds", 0)
    counts[row["verdict"]] += 1
    right_metric = claim.get("right_metric") or claim["metric"]
    metric = claim["metric"] + (
      f" vs {right_metric}" if right_metric != claim["metric"] else ""
    )
    difference = row.get("difference")
    decided = difference is not None and np.isfinite(difference)
    effect = f"{difference:+.3g} / {row['threshold']:.3g}" if decided else "-"
    lines.append(
      f"| {name} | {claim['id']}: {claim['text']} | {claim['paper']} "
      f"| {metric} ({claim['predicted']}) "
      f"| {claim['left']}: "
      f"{fmt(row.get('left_mean'), row.get('left_std'), seeds)} "
      f"| {claim['right']}: "
      f"{fmt(row.get('right_mean'), row.get('right_std'), seeds)} "
      f"| {effect} "
      f"| **{row['verdict']}** |"
    )
display(Markdown("\n".join(lines)))
print(
  "verdict counts: "
  + ", ".join(f"{v}={counts[v]}" for v in reproduction.VERDICTS)
  + f" ({sum(counts.values())} claims in {len(results)} suites)"
)

# %% [markdown]
# ## 2. The numbers behind each suite's claims
#
# One panel per metric a claim of the suite reads, one column per arm: the
# mean over seeds (coloured dot), one standard deviation over seeds as the
# error bar (ddof 1, as in the verdict rule; none with a single seed), and
# each seed as a small black dot. The y axes do not start at 0, so that
# differences of a few hundredths of a nat show. A name like
# `eval_loss@cf2` is the trained checkpoint evaluated again under another
# setting. Colours name the arms and are the same in every panel of a suite.


# %%
def unit(metric):
  """The y-axis label (unit) of a summary metric."""
  base = metric.split("@")[0]
  if base.endswith("loss") or base == "leak":
    return "nats / byte"
  if base.startswith("max_violation"):
    return "MaxVio = max load / mean load - 1"
  if base == "drop_fraction":
    return "fraction of tokens"
  if base == "tokens_per_second":
    return "tokens / s"
  if base == "loss_spikes":
    return "spikes per run"
  return metric


# 72 dpi keeps the ten suites' figures, and the committed notebook, under
# 1 MB (tests/test_notebooks.py).
plt.rcParams["figure.dpi"] = 72
for name, result in results.items():
  suite = suites.get(name)
  derived = suite.derived if suite else {}
  arms = sorted({run["arm"] for run in result["runs"]})
  labels = {arm: arm for arm in arms}
  if suite:
    order = [a.name for a in suite.arms(result["scale"])]
    arms = [a for a in order if a in arms] + [a for a in arms if a not in order]
    labels.update(
      {a.name: a.label or a.name for a in suite.arms(result["scale"])}
    )
  metrics = {}  # metric -> ids of the claims that read it
  for row in result.get("claims", []):
    for metric in (row["claim"]["metric"], row["claim"].get("right_metric")):
      if metric:
        metrics.setdefault(metric, []).append(row["claim"]["id"])
  if not metrics:
    continue
  palette = plt.get_cmap("tab10" if len(arms) <= 10 else "tab20").colors
  colors = dict(zip(arms, palette))  # the finetune suite has 13 arms
  columns = min(len(metrics), 3)
  rows = -(-len(metrics) // columns)
  fig, axes = plt.subplots(
    rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False
  )
  for ax, (metric, ids) in zip(axes.flat, metrics.items()):
    for x, arm in enumerate(arms):
      values = np.asarray(
        reproduce.values_of(result, arm, metric, derived), float
      )
      values = values[np.isfinite(values)]
      if values.size == 0:
        continue
      ax.errorbar(
        x,
        values.mean(),
        yerr=values.std(ddof=1) if values.size > 1 else None,
        marker="o",
        markersize=8,
        capsize=5,
        color=colors[arm],
      )
      ax.plot(np.full(values.size, x), values, "k.", markersize=4)
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(arms) - 0.5)
    claims = ", ".join(dict.fromkeys(ids))
    ax.set(title=f"{metric} ({claims})", ylabel=unit(metric), xlabel="arm")
    ax.grid(alpha=0.3)
  for ax in axes.flat[len(metrics) :]:
    ax.axis("off")
  handles = [
    plt.Line2D([], [], marker="o", linestyle="", color=colors[a]) for a in arms
  ]
  fig.legend(
    handles,
    [labels[a] for a in arms],
    loc="upper center",
    bbox_to_anchor=(0.5, 0.0),
    ncol=min(len(arms), 3),
    fontsize=8,
  )
  title = suite.title if suite else name
  fig.suptitle(f"{name}: {title} (scale {result['scale']})")
  fig.tight_layout()
  plt.show()
  verdicts = ", ".join(
    f"{row['claim']['id']} {row['verdict']}" for row in result.get("claims", [])
  )
  print(f"{name}: {len(result['runs'])} runs; {verdicts}")

# %% [markdown]
# A suite missing above has not been run at any scale yet. Run one with
#
#     python experiments/reproduce.py --suite=<suite> --scale=cpu
#
# (it resumes where it stopped and rewrites `results/<suite>/` after every
# arm), then re-execute this notebook.
