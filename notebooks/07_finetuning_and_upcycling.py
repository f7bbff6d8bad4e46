# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Fine-tuning and upcycling: the `upcycle` and `finetune` suites
#
# Two reproduction suites start some of their runs from another run's
# checkpoint instead of from random weights (`Arm.init_from`):
#
# 1. `upcycle` (Komatsuzaki et al. 2022, "Sparse Upcycling"): a trained
#    dense model and some extra steps; are they better spent continuing the
#    dense model, or on an MoE whose experts start as copies of its FFNs?
#    And was an MoE trained from scratch for the whole budget better still?
# 2. `finetune`: a pretrained Switch MoE and its FLOP-matched dense twin,
#    fine-tuned on one domain with the recipes of Switch §4 and ST-MoE §4
#    (expert dropout, frozen parameter groups, the balance loss off), and
#    instruction-tuned on one task or on five, after Shen et al. 2023.
#
# This notebook reads `results/<suite>/results.json` (written by
# `experiments/reproduce.py`); it trains nothing. Each claim is decided by
# the verdict rule fixed before the runs, stated in
# [notebook 04](04_balancing_ablations.ipynb): the difference of the seed
# means in the predicted direction must pass both twice the pooled seed
# standard deviation and the claim's minimum effect.
#
# What `results.json` holds: per run its arm, seed, status, workdir and a
# *summary* of its last evaluation (`moe_jax.reproduction.summarize_run`:
# `eval_loss`, `train_loss`, the routing metrics averaged over the MoE
# layers and at the worst layer, ...); per claim its verdict and the numbers
# behind it. It holds no curves over training. Those are in each run's
# `metrics.jsonl`, in the workdir that `results.json` names; `runs/` is not
# committed, so the curves below are drawn only where those files are on
# this machine, and the notebook says so where they are not (each suite's
# `report.md` then has the curves as PNGs, each run on its own step axis).

# %% tags=["parameters"]
# Parameters.
RESULTS_DIR = ""  # "" = the repository's results/

# %%
import importlib.util
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, Markdown, display

import moe_jax
from moe_jax import metrics, reproduction, writers

REPO = Path(moe_jax.__file__).resolve().parents[1]
RESULTS = Path(RESULTS_DIR) if RESULTS_DIR else REPO / "results"
spec = importlib.util.spec_from_file_location(
  "reproduce", REPO / "experiments" / "reproduce.py"
)
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)

SUITES = ("upcycle", "finetune")
modules = {name: reproduce.load_suite(name) for name in SUITES}
results = {}
for name in SUITES:
  path = RESULTS / name / "results.json"
  shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
  if not path.exists():
    print(
      f"{name}: no results ({shown} not found): the {name} suite has not "
      f"been run yet. Produce it with\n  python experiments/reproduce.py "
      f"--suite={name} --scale=cpu\n(it resumes where it stopped), then "
      "re-execute this notebook."
    )
    continue
  results[name] = json.loads(path.read_text())
  result = results[name]
  planned = modules[name].SUITE.arms_at(result["scale"])
  finished = sum(r["status"] == "finished" for r in result["runs"])
  print(
    f"{name}: scale {result['scale']!r}, {len(result['runs'])} runs "
    f"({finished} finished) of the {len(planned)} arms run at this scale"
  )


# %%
def workdir_rows(run):
  """The rows of a run's metrics.jsonl, or None when its workdir is not on
  this machine (results.json stores it relative to the repository when it
  was inside it)."""
  path = Path(run["workdir"])
  path = path if path.is_absolute() else REPO / path
  if not (path / writers.METRICS_FILE).exists():
    return None
  return writers.read_metrics(str(path))


def stats(result, arm, metric):
  """(mean, std over seeds (ddof 1; 0 with one seed), seeds) of a summary
  metric of `arm`; (nan, nan, 0) when no run has it."""
  values = np.asarray(reproduce.values_of(result, arm, metric, {}), float)
  values = values[np.isfinite(values)]
  if values.size == 0:
    return np.nan, np.nan, 0
  std = values.std(ddof=1) if values.size > 1 else 0.0
  return float(values.mean()), float(std), int(values.size)


def fmt(mean, std=0.0, seeds=1, digits=4):
  """mean ± std (std only with more than one seed); "-" when missing."""
  if mean is None or not np.isfinite(mean):
    return "-"
  return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if seeds > 1 else "")


def lineage(module, scale):
  """{arm: (first step, last step)} on the step axis of the arm's lineage:
  an arm that starts from another begins where its source ended."""
  arms = module.SUITE.arms(scale)
  span = {}
  for arm in arms:  # sources are listed before the arms that start from them
    start = span[arm.init_from][1] if arm.init_from else 0
    span[arm.name] = (start, start + module.steps_of(arm.args, scale))
  return span


def tokens_per_step(module, scale):
  """Training tokens per step (batch size x sequence length), the same for
  every arm of the suite (checked)."""
  sizes = {
    (config.data.batch_size, config.data.seq_len)
    for config in (
      module.get_config(f"{arm.args},scale={scale}")
      for arm in module.SUITE.arms(scale)
    )
  }
  if len(sizes) != 1:
    raise ValueError(f"arms with different batch shapes: {sorted(sizes)}.")
  ((batch, length),) = sizes
  return batch * length


def claims_table(name):
  """The suite's claims as a table (paper vs ours, verdict), then one line
  per claim; the caveat written before the runs where it did not show."""
  result = results[name]
  in_summaries = {k for r in result["runs"] for k in r["summary"]}
  lines = [
    "| claim | source | paper | metric | ours: left | ours: right "
    "| d / threshold | verdict |",
    "|---|---|---|---|---|---|---|---|",
  ]
  notes = []
  for row in result.get("claims", []):
    claim, seeds = row["claim"], row.get("seeds", 0)
    right_metric = claim.get("right_metric") or claim["metric"]
    metric = claim["metric"] + (
      f" vs {right_metric}" if right_metric != claim["metric"] else ""
    )
    difference = row.get("difference")
    decided = difference is not None and np.isfinite(difference)
    effect = f"{difference:+.4f} / {row['threshold']:.4f}" if decided else "-"
    lines.append(
      f"| {claim['id']}: {claim['text']} | {claim['source']} "
      f"| {claim['paper']} | {metric} ({claim['predicted']}) "
      f"| {claim['left']}: "
      f"{fmt(row.get('left_mean'), row.get('left_std'), seeds)} "
      f"| {claim['right']}: "
      f"{fmt(row.get('right_mean'), row.get('right_std'), seeds)} "
      f"| {effect} | **{row['verdict']}** |"
    )
    for key in dict.fromkeys((claim["metric"], right_metric)):
      if row["verdict"] != "not run" and key not in in_summaries:
        notes.append(
          f"{claim['id']}: no run's summary has {key!r}, so this claim "
          "cannot be decided from these results"
        )
  display(Markdown("\n".join(lines)))
  for row in result.get("claims", []):
    claim = row["claim"]
    print(f"{claim['id']}: {row['verdict']} -- {claim['text']}")
    if row["verdict"] not in ("reproduced", "not run") and claim.get("caveat"):
      print(f"    caveat (written before the runs): {claim['caveat']}")
  for note in notes:
    print(f"note: {note}")


def print_table(header, rows):
  """A fixed-width text table."""
  widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
  for row in (header, *rows):
    print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))


def mean_curve(curves):
  """The mean over seeds of (steps, values) curves at the steps every seed
  logged."""
  curves = [c for c in curves if c[0].size]
  if not curves:
    return np.array([]), np.array([])
  steps = curves[0][0]
  for s, _ in curves[1:]:
    steps = np.intersect1d(steps, s)
  return steps, np.mean([v[np.isin(s, steps)] for s, v in curves], axis=0)


# %% [markdown]
# ## 1. Sparse upcycling (Komatsuzaki et al. 2022)
#
# The dense model (`dense_pretrain`, D steps) is the source. From its last
# checkpoint, E more steps are spent two ways: continuing the dense model
# (`dense_continue`), or on the MoE *upcycled* from it (`upcycled`: every
# expert a copy of its block's dense FFN, fresh routers; with a gate of 1
# at top-1 it starts computing exactly the dense model). `moe_scratch` is
# the same MoE from random weights for D + E steps: the same total steps
# and tokens as `dense_pretrain` + `upcycled`. Both continuations restore
# the parameters only and restart the schedule.
#
# Every run's own log counts its steps from 0. Here an arm that starts
# from another is drawn shifted right by its source's D steps, so the x
# axis is the steps (top axis: tokens) seen by the model's whole lineage,
# and the two continuations end where `moe_scratch` ends. The hatched part
# of a bar is the training inherited from the source.

# %%
UP = modules["upcycle"]
up_scale = results["upcycle"]["scale"] if "upcycle" in results else "cpu"
up_span = lineage(UP, up_scale)
up_tokens = tokens_per_step(UP, up_scale)
up_arms = UP.SUITE.arms(up_scale)
up_labels = {arm.name: arm.label or arm.name for arm in up_arms}
up_colors = dict(zip(up_span, plt.get_cmap("tab10").colors))
D = up_span["dense_pretrain"][1]
E = up_span["upcycled"][1] - up_span["upcycled"][0]
print(
  f"upcycle at scale {up_scale!r}: D = {D} dense steps, E = {E} extra "
  f"steps, {up_tokens:,} tokens per step"
)
for arm in up_arms:
  start, end = up_span[arm.name]
  source = f" (steps 0-{start} are {arm.init_from}'s)" if arm.init_from else ""
  print(
    f"  {arm.name}: lineage steps {start}-{end}, {end * up_tokens:,} tokens "
    f"in all{source}"
  )

fig, ax = plt.subplots(figsize=(8, 2.8))
for y, arm in enumerate(up_arms):
  start, end = up_span[arm.name]
  color = up_colors[arm.name]
  if start:
    ax.barh(y, start, color=color, alpha=0.25, hatch="//", edgecolor=color)
  ax.barh(y, end - start, left=start, color=color)
ax.set_yticks(range(len(up_arms)), [up_labels[a.name] for a in up_arms])
ax.invert_yaxis()
ax.set_xlabel("steps seen by the model's lineage")
top = ax.secondary_xaxis(
  "top", functions=(lambda s: s * up_tokens, lambda t: t / up_tokens)
)
top.set_xlabel("tokens seen")
ax.set_title(f"upcycle: the arms' training budgets (scale {up_scale})")
fig.tight_layout()
plt.show()

# %% [markdown]
# ### The arms and the claims
#
# Eval metrics are those of each run's last evaluation, on the same held-out
# documents for every arm. MaxVio (Wang et al. 2024, Eq. 4: max load / mean
# load - 1) is that of the expert loads pooled over the held-out batches,
# averaged over the MoE layers and at the worst layer; the dense arms have
# none.

# %%
if "upcycle" not in results:
  print(
    "upcycle: no results yet; run\n  python experiments/reproduce.py "
    "--suite=upcycle --scale=cpu"
  )
else:
  result = results["upcycle"]
  header = (
    "arm",
    "seeds",
    "lineage steps",
    "eval_loss",
    "train_loss",
    "MaxVio",
    "MaxVio worst",
    "dead experts",
  )
  table = []
  for arm in up_arms:
    runs = [r for r in result["runs"] if r["arm"] == arm.name]
    if not runs:
      table.append((arm.name, 0, "-", "not run", "", "", "", ""))
      continue
    cells = [
      fmt(*stats(result, arm.name, m))
      for m in (
        "eval_loss",
        "train_loss",
        "max_violation_global",
        "max_violation_global_worst",
        "dead_experts",
      )
    ]
    table.append((arm.name, len(runs), up_span[arm.name][1], *cells))
  print_table(header, table)
  claims_table("upcycle")

# %% [markdown]
# ### Training curves on the lineage's step axis
#
# Left, the training loss (each logged step); right, the validation loss at
# each evaluation, with each run's last evaluation as stored in
# `results.json` (large dots, one per seed). The curves come from the runs'
# `metrics.jsonl` (mean over seeds) and are missing where the workdirs are
# not on this machine; the last evaluations are always there.

# %%
if "upcycle" in results:
  result = results["upcycle"]
  found = [r for r in result["runs"] if workdir_rows(r) is not None]
  print(
    f"upcycle: metrics.jsonl found for {len(found)} of "
    f"{len(result['runs'])} runs"
  )
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  for arm in up_arms:
    runs = [r for r in result["runs"] if r["arm"] == arm.name]
    start = up_span[arm.name][0]
    color = up_colors[arm.name]
    rows = [workdir_rows(r) for r in runs]
    rows = [r for r in rows if r is not None]
    for ax, key in zip(axes, ("train/lm_loss", "eval/lm_loss")):
      steps, values = mean_curve([reproduction.series(r, key) for r in rows])
      if steps.size:
        ax.plot(
          start + steps,
          values,
          color=color,
          label=up_labels[arm.name],
          marker="o" if steps.size < 8 else None,
          markersize=3,
        )
    for run in runs:
      summary = run["summary"]
      if summary.get("eval_loss") is not None:
        axes[1].plot(
          start + summary["eval_step"],
          summary["eval_loss"],
          "o",
          color=color,
          markersize=8,
          markeredgecolor="k",
        )
  for ax, title in zip(axes, ("training loss", "validation loss")):
    ax.axvline(D, color="gray", linestyle=":", linewidth=1)
    ax.set(
      title=f"upcycle: {title}",
      xlabel="steps seen by the model's lineage (continuations shifted by D)",
      ylabel="nats / byte",
    )
    ax.grid(alpha=0.3)
    top = ax.secondary_xaxis(
      "top", functions=(lambda s: s * up_tokens, lambda t: t / up_tokens)
    )
    top.set_xlabel("tokens seen")
  handles = [
    plt.Line2D([], [], color=up_colors[a.name], marker="o") for a in up_arms
  ]
  fig.legend(
    handles,
    [up_labels[a.name] for a in up_arms],
    loc="upper center",
    bbox_to_anchor=(0.5, 0.0),
    ncol=len(up_arms),
    fontsize=8,
  )
  fig.tight_layout()
  plt.show()
  for arm in up_arms:
    start = up_span[arm.name][0]
    losses = [
      (start + r["summary"]["eval_step"], r["summary"]["eval_loss"])
      for r in result["runs"]
      if r["arm"] == arm.name and r["summary"].get("eval_loss") is not None
    ]
    for step, loss in losses:
      print(f"{arm.name}: last eval at lineage step {step}: {loss:.4f}")
  if not found:
    report = RESULTS / "upcycle" / "01_train_lm_loss.png"
    if report.exists():
      print(
        "no workdir here: the report's training-loss plot follows (each "
        "run on its own step axis, continuations from 0)"
      )
      display(Image(str(report)))

# %% [markdown]
# ### The upcycled router breaks a tie
#
# Right after upcycling every expert of a block is the same function, so
# where the router sends a token does not change the output: the LM loss
# gives the fresh router no signal and only the balance loss shapes it.
# The routing gains a purpose only once the experts drift apart. The plot
# shows MaxVio over training per MoE layer (each training batch's expert
# loads, before capacity) for the upcycled model and, for reference, for
# the MoE trained from scratch, on the lineage's step axis; the dashed line
# is where `metrics.detect_collapse` would count a layer as collapsed.

# %%
if "upcycle" in results:
  result = results["upcycle"]
  moe_config = UP.get_config(f"arm=upcycled,scale={up_scale}")
  num_experts, top_k = (
    moe_config.model.moe.num_experts,
    moe_config.model.moe.top_k,
  )
  line = num_experts * metrics.collapse_threshold(num_experts, top_k) - 1
  per_arm = {}
  for name in ("upcycled", "moe_scratch"):
    rows = [workdir_rows(r) for r in result["runs"] if r["arm"] == name]
    rows = [r for r in rows if r is not None]
    layers = sorted(
      {
        k.split("/")[2]
        for r in rows
        for row in r
        for k in row
        if k.startswith("train/moe/") and k.endswith("/max_violation")
      }
    )
    per_arm[name] = {
      layer: mean_curve(
        [
          reproduction.series(r, f"train/moe/{layer}/max_violation")
          for r in rows
        ]
      )
      for layer in layers
    }
  if not any(per_arm.values()):
    print(
      "no metrics.jsonl of the MoE arms here: MaxVio over training is not "
      "in results.json (the report's "
      "results/upcycle/02_train_moe_max_violation.png has it, averaged over "
      "layers, each run on its own step axis). At the last evaluation:"
    )
    for name in ("upcycled", "moe_scratch"):
      print(
        f"  {name}: MaxVio {fmt(*stats(result, name, 'max_violation_global'))}"
        f", worst layer "
        f"{fmt(*stats(result, name, 'max_violation_global_worst'))}"
      )
  else:
    fig, ax = plt.subplots(figsize=(9, 4))
    styles = ("-", "--", "-.", ":")
    for name, layers in per_arm.items():
      start = up_span[name][0]
      for (layer, (steps, values)), style in zip(layers.items(), styles):
        if not steps.size:
          continue
        ax.plot(
          start + steps,
          values,
          style,
          color=up_colors[name],
          label=f"{name} {layer}",
          marker="o" if steps.size < 8 else None,
          markersize=3,
        )
        print(
          f"{name} {layer}: MaxVio {values[0]:.3f} at lineage step "
          f"{start + steps[0]}, {values[-1]:.3f} at {start + steps[-1]}"
        )
    ax.axhline(line, color="k", linestyle="--", linewidth=1)
    ax.axvline(D, color="gray", linestyle=":", linewidth=1)
    ax.set(
      title="upcycle: MaxVio of each MoE layer over training",
      xlabel="steps seen by the model's lineage",
      ylabel="MaxVio (0 = even)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    plt.show()

# %% [markdown]
# ## 2. Fine-tuning an MoE and instruction tuning
#
# Two sources, `moe_pretrain` (Switch, 8 experts every other block, top-1)
# and `dense_pretrain` (its FLOP-matched dense twin), trained on code +
# prose. Every other arm starts from one of them (parameters only, a fresh
# optimizer, the Switch §4 recipe) and fine-tunes for the same number of
# steps:
#
# * on prose alone, evaluated on held-out prose: the MoE with dropout 0.1
#   everywhere (`moe_ft`), with expert dropout 0.4 (`moe_ft_edrop`), with
#   only the non-MoE parameters (`moe_ft_freeze_moe`) or only the MoE
#   parameters (`moe_ft_freeze_nonexpert`) training, with the router
#   frozen (`moe_ft_freeze_router`), without the balance loss
#   (`moe_ft_noaux`), and the dense twin (`dense_ft`);
# * on instructions (the loss on the responses only), evaluated on the
#   held-out documents' examples: five tasks mixed (`*_it_multi`) or the
#   one task `code_body` (`*_it_single`). The multi-task arms are also
#   evaluated on `code_body` alone (`eval_loss@code_body`).
#
# A fine-tuning arm's eval loss is comparable with the other fine-tuning
# arms on the same data, not with a pretraining arm's. The collapse
# columns: the largest expert share max_e f_e follows from MaxVio as
# (1 + MaxVio) / E (Wang et al. 2024, Eq. 4, with the mean share 1/E); the
# collapse flag is `metrics.detect_collapse` on the training log, which
# `results.json` does not store, so it needs the run's workdir ("?"
# without it).

# %%
FT = modules["finetune"]
ft_scale = results["finetune"]["scale"] if "finetune" in results else "cpu"
ft_arms = FT.SUITE.arms(ft_scale)
ft_labels = {arm.name: arm.label or arm.name for arm in ft_arms}
ft_moe = FT.get_config(f"arm=moe_pretrain,scale={ft_scale}").model.moe
print(
  f"finetune at scale {ft_scale!r}: pretraining "
  f"{FT.steps_of('arm=moe_pretrain', ft_scale)} steps, every fine-tuning "
  f"{FT.steps_of('arm=moe_ft', ft_scale)} steps; E = {ft_moe.num_experts}, "
  f"K = {ft_moe.top_k}"
)


def collapse_of(run):
  """`detect_collapse` of a run's training log: {layer: result}, or None
  without its workdir."""
  rows = workdir_rows(run)
  if rows is None:
    return None
  return metrics.detect_collapse(rows, top_k=ft_moe.top_k)


if "finetune" not in results:
  print(
    "finetune: no results yet; run\n  python experiments/reproduce.py "
    "--suite=finetune --scale=cpu"
  )
else:
  result = results["finetune"]
  header = (
    "arm",
    "from",
    "seeds",
    "eval_loss",
    "@code_body",
    "train_loss",
    "MaxVio",
    "MaxVio worst",
    "max share worst",
    "dead",
    "collapsed",
  )
  table = []
  for arm in ft_arms:
    runs = [r for r in result["runs"] if r["arm"] == arm.name]
    if not runs:
      table.append((arm.name, arm.init_from or "-", 0, "not run", *[""] * 7))
      continue
    worst = stats(result, arm.name, "max_violation_global_worst")
    share = (1 + worst[0]) / ft_moe.num_experts, worst[1] / ft_moe.num_experts
    arm_moe = FT.get_config(f"{arm.args},scale={ft_scale}").model.moe
    flags = []
    for run in runs:
      found = collapse_of(run) if arm_moe.num_experts else {}
      if not arm_moe.num_experts:
        flags.append("-")  # a dense arm: no MoE layer
      elif found is None:
        flags.append("?")
      else:
        hit = [
          f"{layer}@{c['collapse_step']}"
          for layer, c in found.items()
          if c["collapsed"]
        ]
        flags.append(" ".join(hit) or "no")
    table.append(
      (
        arm.name,
        arm.init_from or "-",
        len(runs),
        fmt(*stats(result, arm.name, "eval_loss")),
        fmt(*stats(result, arm.name, "eval_loss@code_body")),
        fmt(*stats(result, arm.name, "train_loss")),
        fmt(*stats(result, arm.name, "max_violation_global")),
        fmt(*worst),
        fmt(*share, worst[2]),
        fmt(*stats(result, arm.name, "dead_experts"), digits=2),
        ",".join(flags),
      )
    )
  print_table(header, table)
  claims_table("finetune")

# %% [markdown]
# ### Expert load over fine-tuning, with and without the recipes
#
# Top: each MoE layer's largest expert share over the fine-tuning steps
# (each training batch, before capacity; mean over seeds), one line per MoE
# fine-tuning arm, with the collapse line of `metrics.detect_collapse`
# (dashed) and the share the pretrained source ended with (dotted); the
# right axis reads the same in MaxVio. Bottom: every expert's share in
# `moe_ft` (balance loss on) and `moe_ft_noaux` (off), the comparison of
# claim F4. Both need the workdirs; the bar chart after them reads the
# last evaluation from `results.json` alone.

# %%
if "finetune" in results:
  result = results["finetune"]
  E_ft = ft_moe.num_experts
  moe_arms = [
    a.name for a in ft_arms if a.init_from == "moe_pretrain"
  ]  # the MoE fine-tunings
  colors = dict(zip(moe_arms, plt.get_cmap("tab10").colors))
  shares = {}  # arm -> layer -> [(steps, max share)] per seed
  loads = {}  # arm -> layer -> [(steps, fractions [T, E])] per seed
  threshold = metrics.collapse_threshold(E_ft, ft_moe.top_k)
  for name in ["moe_pretrain", *moe_arms]:
    for run in (r for r in result["runs"] if r["arm"] == name):
      rows = workdir_rows(run)
      if rows is None:
        continue
      for layer, c in metrics.detect_collapse(rows, top_k=ft_moe.top_k).items():
        shares.setdefault(name, {}).setdefault(layer, []).append(
          (c["steps"], c["max_share"])
        )
      for layer, load in metrics.expert_load(rows).items():
        loads.setdefault(name, {}).setdefault(layer, []).append(load)
  found = sum(workdir_rows(r) is not None for r in result["runs"])
  print(
    f"finetune: metrics.jsonl found for {found} of {len(result['runs'])} runs"
  )
  layers = sorted({layer for by in shares.values() for layer in by})
  if not layers:
    print(
      "no metrics.jsonl of the MoE arms here: the expert shares over "
      "training are not in results.json (the report's "
      "results/finetune/01_train_moe_max_violation.png has MaxVio averaged "
      "over layers)."
    )
  else:
    fig, axes = plt.subplots(
      1, len(layers), figsize=(5.5 * len(layers), 4), squeeze=False
    )
    for ax, layer in zip(axes[0], layers):
      for name in moe_arms:
        steps, values = mean_curve(shares.get(name, {}).get(layer, []))
        if not steps.size:
          continue
        ax.plot(
          steps,
          values,
          color=colors[name],
          label=name,
          marker="o" if steps.size < 8 else None,
          markersize=3,
        )
        print(
          f"{name} {layer}: largest share {values[0]:.3f} at step "
          f"{steps[0]}, {values[-1]:.3f} at step {steps[-1]}"
        )
      source = shares.get("moe_pretrain", {}).get(layer)
      if source:
        end = np.mean([v[-1] for _, v in source])
        ax.axhline(end, color="gray", linestyle=":", label="pretrained, end")
      ax.axhline(threshold, color="k", linestyle="--", label="collapse line")
      ax.axhline(1 / E_ft, color="k", linewidth=0.5)
      right = ax.secondary_yaxis(
        "right", functions=(lambda f: E_ft * f - 1, lambda v: (v + 1) / E_ft)
      )
      right.set_ylabel("MaxVio")
      ax.set(
        title=f"finetune: {layer}",
        xlabel="fine-tuning step",
        ylabel="largest expert share (1/E = even)",
      )
      ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    plt.show()
    pair = [name for name in ("moe_ft", "moe_ft_noaux") if name in loads]
    if pair:
      fig, axes = plt.subplots(
        len(pair),
        len(layers),
        figsize=(5.5 * len(layers), 2.8 * len(pair)),
        squeeze=False,
      )
      for row, name in zip(axes, pair):
        for ax, layer in zip(row, layers):
          seeds = loads[name].get(layer, [])
          if not seeds:
            ax.axis("off")
            continue
          steps, fraction_TE = seeds[0]  # the first seed
          ax.stackplot(
            steps, fraction_TE.T, colors=plt.get_cmap("tab20").colors
          )
          ax.set(
            title=f"{name} {layer} (first seed)",
            xlabel="fine-tuning step",
            ylabel="expert shares",
            ylim=(0, 1),
          )
      fig.tight_layout()
      plt.show()

  # The last evaluation, from results.json alone.
  shown = [
    a.name for a in ft_arms if a.name in {r["arm"] for r in result["runs"]}
  ]
  shown = [n for n in shown if n.startswith("moe_")]
  if shown:
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for x, name in enumerate(shown):
      mean, std, seeds = stats(result, name, "max_violation_global")
      worst = stats(result, name, "max_violation_global_worst")[0]
      ax.bar(x, mean, yerr=std if seeds > 1 else None, color="tab:blue")
      ax.plot(x, worst, "v", color="tab:red")
    ax.plot([], [], "v", color="tab:red", label="worst layer")
    ax.bar([], [], color="tab:blue", label="mean over MoE layers")
    ax.axhline(
      E_ft * threshold - 1, color="k", linestyle="--", label="collapse line"
    )
    ax.set_xticks(range(len(shown)), shown, rotation=30, ha="right")
    ax.set(
      title="finetune: MaxVio at the last evaluation (held-out loads pooled)",
      ylabel="MaxVio (0 = even)",
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    plt.show()

# %% [markdown]
# ### MoE vs dense: instruction tuning vs one task (Shen et al. 2023)
#
# Shen et al. find that an MoE gains more from multi-task instruction
# tuning than its dense twin does: fine-tuned directly on one task the MoE
# is no better than dense, instruction-tuned first it is clearly better.
# Here the *gain* of the MoE is the dense arm's eval loss minus the MoE
# arm's (positive: the MoE is better), on the same held-out `code_body`
# examples: after single-task tuning (`*_it_single`, claim I2) and after
# multi-task tuning (`*_it_multi` evaluated on `code_body`, claim I3); the
# gain on all five tasks (I1) and the pretrained models' gap on their own
# held-out data are shown for context. The difference of the two gains is
# descriptive: the claims above, not it, carry the verdicts.

# %%
if "finetune" in results:
  result = results["finetune"]
  pairs = {
    "pretrained (code + prose)": (
      "moe_pretrain",
      "dense_pretrain",
      "eval_loss",
    ),
    "single-task on code_body (I2)": (
      "moe_it_single",
      "dense_it_single",
      "eval_loss",
    ),
    "multi-task, on code_body (I3)": (
      "moe_it_multi",
      "dense_it_multi",
      "eval_loss@code_body",
    ),
    "multi-task, all 5 tasks (I1)": (
      "moe_it_multi",
      "dense_it_multi",
      "eval_loss",
    ),
  }
  gains = {}
  for title, (moe, dense, metric) in pairs.items():
    m, d = stats(result, moe, metric)[0], stats(result, dense, metric)[0]
    gains[title] = d - m
    print(
      f"{title}: dense {fmt(d)} - MoE {fmt(m)} = MoE gain "
      f"{fmt(d - m, digits=4)} ({metric})"
    )
  single = gains["single-task on code_body (I2)"]
  multi = gains["multi-task, on code_body (I3)"]
  print(
    "extra MoE gain from instruction tuning on code_body (multi - single): "
    f"{fmt(multi - single)}"
  )
  drawn = {k: v for k, v in gains.items() if np.isfinite(v)}
  if drawn:
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.barh(list(drawn), list(drawn.values()), color="tab:purple")
    ax.axvline(0, color="k", linewidth=0.8)
    ax.invert_yaxis()
    ax.set(
      title="finetune: MoE gain over its dense twin (dense - MoE eval loss)",
      xlabel="nats / byte (positive: MoE better)",
    )
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    plt.show()

# %% [markdown]
# A suite without results above has not been run at this scale yet:
#
#     python experiments/reproduce.py --suite=upcycle,finetune --scale=cpu
#
# trains the sources first and the arms that start from them after (a
# stopped sweep resumes; `results/<suite>/` is rewritten after every arm).
# Then re-execute this notebook:
#
#     python experiments/execute_notebooks.py \
#       notebooks/07_finetuning_and_upcycling.py
