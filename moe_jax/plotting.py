"""One-figure summary of a run, drawn from its metrics.jsonl.

  python -c "from moe_jax.plotting import plot_run; plot_run('runs/switch')"

writes runs/switch/summary.png with three panels:

  (a) loss: `train/lm_loss` and `eval/lm_loss` against step, and the unigram
      baseline (`eval/unigram_baseline`) as a dashed line;
  (b) expert load: from the last row with `eval/moe/layer_{NN}/
      expert_fraction`, a layers x experts heatmap whose colours diverge
      around the uniform load 1/E (white), red above it, blue below;
  (c) token drops: `train/moe/layer_{NN}/drop_fraction` per layer.

A panel without data (a dense model has no MoE keys) shows a note instead.
The figure is drawn with matplotlib's object API on an Agg canvas, so no
display is needed and pyplot's global state is left alone.
"""

import os
import re

import numpy as np
from matplotlib import colors
from matplotlib.figure import Figure

from moe_jax.writers import read_metrics

_EXPERT_FRACTION = re.compile(r"^eval/moe/layer_(\d+)/expert_fraction$")
_DROP_FRACTION = re.compile(r"^train/moe/layer_(\d+)/drop_fraction$")


def plot_run(workdir: str, path: str | None = None) -> str:
  """Draws the summary figure of the run in `workdir`.

  Args:
    workdir: a run directory holding metrics.jsonl.
    path: where to write the PNG; default <workdir>/summary.png.

  Returns:
    The path of the PNG written.
  """
  workdir = os.fspath(workdir)
  path = os.path.join(workdir, "summary.png") if path is None else path
  rows = read_metrics(workdir)
  fig = Figure(figsize=(16, 4.5), layout="constrained")
  ax_loss, ax_load, ax_drop = fig.subplots(1, 3)
  _plot_losses(ax_loss, rows)
  _plot_expert_load(fig, ax_load, rows)
  _plot_drops(ax_drop, rows)
  fig.suptitle(os.path.basename(os.path.abspath(workdir)))
  fig.savefig(path, dpi=100)
  return os.fspath(path)


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (steps, values) of the rows that hold a number for `key`."""
  points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
  steps, values = zip(*points, strict=True) if points else ((), ())
  return np.asarray(steps, np.int64), np.asarray(values, np.float64)


def last_expert_load(rows: list[dict]):
  """Finds the newest per-layer expert fractions.

  Args:
    rows: metric rows, as `read_metrics` returns them.

  Returns:
    (step, layers, load_LE) from the last row with any
    `eval/moe/layer_{NN}/expert_fraction` key: the row's step, the layer
    indices in increasing order, and their fractions as a [layers, E] float
    array (NaN where a value is null or a layer has fewer experts). None when
    no row has such a key.
  """
  for row in reversed(rows):
    found = {}
    for key, value in row.items():
      match = _EXPERT_FRACTION.match(key)
      if match and isinstance(value, list):
        found[int(match.group(1))] = value
    if found:
      layers = sorted(found)
      num_experts = max(len(found[layer]) for layer in layers)
      load_LE = np.full((len(layers), num_experts), np.nan)
      for i, layer in enumerate(layers):
        values = [np.nan if v is None else v for v in found[layer]]
        load_LE[i, : len(values)] = values
      return row["step"], layers, load_LE
  return None


def _note(ax, title: str, text: str):
  ax.set_title(title)
  ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
  ax.set_xticks([])
  ax.set_yticks([])


def _marker(key: str, steps: np.ndarray) -> str | None:
  """Dots for sparse eval curves and for lines of one point (else unseen)."""
  return "o" if key.startswith("eval/") or len(steps) == 1 else None


def _plot_losses(ax, rows: list[dict]):
  title = "(a) language-model loss"
  drawn = False
  for key in ("train/lm_loss", "eval/lm_loss"):
    steps, values = series(rows, key)
    if len(steps):
      ax.plot(steps, values, marker=_marker(key, steps), ms=3, label=key)
      drawn = True
  _, baseline = series(rows, "eval/unigram_baseline")
  if len(baseline):
    ax.axhline(
      baseline[-1],
      color="gray",
      linestyle="--",
      label=f"unigram baseline ({baseline[-1]:.3f})",
    )
    drawn = True
  if not drawn:
    _note(ax, title, "no train/lm_loss or eval/lm_loss logged")
    return
  ax.set_title(title)
  ax.set_xlabel("step")
  ax.set_ylabel("nats / token")
  ax.legend()


def _plot_expert_load(fig, ax, rows: list[dict]):
  found = last_expert_load(rows)
  if found is None:
    _note(
      ax,
      "(b) expert load",
      "no eval/moe/layer_NN/expert_fraction\n(dense model or no eval yet)",
    )
    return
  step, layers, load_LE = found
  num_experts = load_LE.shape[1]
  uniform = 1.0 / num_experts
  top = max(np.nanmax(load_LE, initial=0.0), 2.0 * uniform)
  norm = colors.TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=top)
  image = ax.imshow(load_LE, cmap="RdBu_r", norm=norm, aspect="auto")
  bar = fig.colorbar(image, ax=ax, label="fraction of routed choices")
  # top >= 2/E, so the three ticks are distinct.
  bar.set_ticks([0.0, uniform, top], labels=["0", "1/E", f"{top:.3g}"])
  ax.set_title(f"(b) expert load at step {step} (uniform 1/E = {uniform:.3g})")
  ax.set_xlabel("expert")
  ax.set_ylabel("layer")
  ax.set_yticks(range(len(layers)), [f"layer_{layer:02d}" for layer in layers])
  if num_experts <= 32:
    ax.set_xticks(range(num_experts))


def _plot_drops(ax, rows: list[dict]):
  title = "(c) tokens dropped (train)"
  keys = sorted(
    {key for row in rows for key in row if _DROP_FRACTION.match(key)},
    key=lambda key: int(_DROP_FRACTION.match(key).group(1)),
  )
  drawn = False
  for key in keys:
    steps, values = series(rows, key)
    if len(steps):
      label = f"layer_{int(_DROP_FRACTION.match(key).group(1)):02d}"
      ax.plot(steps, values, marker=_marker(key, steps), ms=3, label=label)
      drawn = True
  if not drawn:
    _note(ax, title, "no train/moe/layer_NN/drop_fraction logged")
    return
  ax.set_title(title)
  ax.set_xlabel("step")
  ax.set_ylabel("drop fraction")
  ax.set_ylim(bottom=0.0)
  ax.legend()
