# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Inspect a run
#
# Trains a tiny Switch top-1 run (`configs/switch_top1.py`, shrunk to about a
# minute on two CPU cores), or opens one of yours, then:
#
# 1. plots the loss curves and each MoE layer's expert load from
#    `metrics.jsonl`;
# 2. restores the final checkpoint and routes the fixed validation batches;
# 3. measures whether routing depends on the domain (code vs prose) and on the
#    token id, each next to a chance reference.
#
# Experts are not specialists by design. Any specialisation comes out of
# training, and finite samples produce some dependence by chance, so every
# number below is printed next to what chance gives on the same tokens.

# %% tags=["parameters"]
# Parameters. To inspect your own run, set WORKDIR to its --workdir: a
# directory that holds metrics.jsonl is read as it is, with its own
# config.json; an empty or missing one receives the tiny run.
WORKDIR = ""  # "" = a new temporary directory
NUM_STEPS = 150  # steps of the tiny run (unused for an existing run)
DATA_DIR = ""  # tiny run's data.data_dir; "" = ~/.cache/moe_jax/...
NUM_PERMUTATIONS = 200  # shuffles behind each chance reference
SEED = 0

# %%
import json
import os
import sys
import tempfile
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

import moe_jax
from moe_jax import analysis, data, plotting, train, writers
from moe_jax.checkpoint import Checkpointer
from moe_jax.models import TransformerConfig, TransformerLM

CONFIGS = Path(moe_jax.__file__).resolve().parents[1] / "configs"


def show(header, rows):
  """Prints rows under a header, aligned; floats to 3 places."""
  text = [[str(h) for h in header]]
  for row in rows:
    text.append(
      [
        f"{v:.3f}" if isinstance(v, (float, np.floating)) else str(v)
        for v in row
      ]
    )
  widths = [max(len(row[i]) for row in text) for i in range(len(header))]
  for row in text:
    print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))


# %% [markdown]
# ## The run
#
# The tiny run keeps everything of `switch_top1` (8 experts in every other
# block, top-1, capacity factor 1.25/2.0, α = 1e-2) except its size: d_model 64,
# sequences of 64 bytes, 16 per batch. It uses the embedded corpus with its
# default code cap, whose validation split holds both code and prose.

# %%
WORKDIR = WORKDIR or tempfile.mkdtemp(prefix="moe_jax_tiny_")
if not os.path.exists(os.path.join(WORKDIR, writers.METRICS_FILE)):
  if not (CONFIGS / "switch_top1.py").exists():
    raise FileNotFoundError(
      f"{CONFIGS / 'switch_top1.py'} not found: the tiny run needs moe_jax "
      "installed from its repository (pip install -e .)"
    )
  sys.path.insert(0, str(CONFIGS))
  import switch_top1

  tiny = switch_top1.get_config()
  tiny.data.data_dir = DATA_DIR
  tiny.data.seq_len = 64
  tiny.data.batch_size = 16
  tiny.data.eval_batch_size = 32
  tiny.data.num_eval_batches = 4
  tiny.model.d_model = 64
  tiny.model.num_heads = 2
  tiny.model.mlp_dim = 128
  tiny.model.moe.expert_dim = 128
  tiny.model.moe.group_size = 256
  tiny.optimizer.warmup_steps = max(NUM_STEPS // 10, 1)
  tiny.train.num_steps = NUM_STEPS
  tiny.train.log_every = max(NUM_STEPS // 30, 1)
  tiny.train.eval_every = max(NUM_STEPS // 3, 1)
  tiny.train.checkpoint_every = max(NUM_STEPS // 2, 1)
  tiny.train.progress_bar = False
  train.train_and_evaluate(tiny, WORKDIR)

with open(os.path.join(WORKDIR, "config.json")) as f:
  config = ml_collections.ConfigDict(json.load(f))
print("run directory:", WORKDIR)

# %% [markdown]
# ## Loss and expert load during training
#
# Left: the language-model loss on training batches and on the validation
# batches, with the unigram baseline a model must beat. Right: each MoE layer's
# expert load f_e (the share of first choices per expert, before capacity) on
# training batches; the dashed line is the uniform load 1/E.

# %%
rows = writers.read_metrics(WORKDIR)
moe_layers = sorted(
  {
    key.split("/")[2]
    for row in rows
    for key in row
    if key.startswith("train/moe/") and key.endswith("/expert_fraction")
  }
)
fig, axes = plt.subplots(
  1,
  1 + len(moe_layers),
  figsize=(5 * (1 + len(moe_layers)), 3.5),
  squeeze=False,
)
ax = axes[0, 0]
for key in ("train/lm_loss", "eval/lm_loss"):
  steps, values = plotting.series(rows, key)
  ax.plot(
    steps, values, marker="o" if key.startswith("eval") else None, label=key
  )
_, baseline = plotting.series(rows, "eval/unigram_baseline")
if len(baseline):
  ax.axhline(
    baseline[-1], color="gray", linestyle="--", label="unigram baseline"
  )
ax.set(xlabel="step", ylabel="nats / token", title="loss")
ax.legend()
for ax, layer in zip(axes[0, 1:], moe_layers):
  key = f"train/moe/{layer}/expert_fraction"
  points = [(row["step"], row[key]) for row in rows if row.get(key)]
  load_TE = np.array(
    [[np.nan if v is None else v for v in load] for _, load in points]
  )
  ax.plot([step for step, _ in points], load_TE, linewidth=1)
  ax.axhline(1 / load_TE.shape[1], color="gray", linestyle="--")
  ax.set(xlabel="step", ylabel="f_e", title=f"{layer}: expert load (train)")
plt.show()

# %% [markdown]
# ## Restore the final checkpoint and route the validation batches
#
# `analysis.routing_decisions` runs the model deterministically (eval capacity
# factor, padding excluded) and returns each MoE layer's `expert_index`,
# `gates` and `kept` as `[B, L, K]`. The analysis below uses the first choice
# of the real tokens. The last two checkpoints kept are restored; opening the
# checkpoint folder of a run that is still saving can disturb that save, so
# inspect finished runs.

# %%
model_config = TransformerConfig.from_config(config, data.VOCAB_SIZE)
model = TransformerLM(model_config)
tx, _ = train.make_optimizer(config.optimizer, config.train.num_steps)
eval_batches = data.create_eval_batches(config.data)
template = jax.eval_shape(
  lambda: train.init_state(config, model, tx, eval_batches[0])
)
checkpointer = Checkpointer(
  os.path.join(WORKDIR, "checkpoints"),
  max_to_keep=config.train.max_checkpoints_to_keep,
  save_interval_steps=config.train.checkpoint_every,
)
saved_steps = checkpointer.all_steps()
states = {
  step: checkpointer.restore(template, step)[0] for step in saved_steps[-2:]
}
checkpointer.close()
final_step = saved_steps[-1]


def route_all(params):
  """First choices [N_batches * B, L] per MoE layer over eval_batches."""
  decisions = [
    analysis.routing_decisions(params, model, b) for b in eval_batches
  ]
  return {
    layer: np.concatenate([d[layer]["expert_index"] for d in decisions])
    for layer in decisions[0]
  }


expert_index = route_all(states[final_step].params)
layers = sorted(expert_index)
inputs_BL, mask_BL, domain_B = (
  np.concatenate([b[k] for b in eval_batches])
  for k in ("inputs", "mask", "domain")
)
E = config.model.moe.num_experts
present = [d for d in range(len(data.DOMAINS)) if np.any(domain_B == d)]
print(
  f"checkpoint of step {final_step}; MoE layers {layers}; "
  f"{len(domain_B)} validation sequences, {int(mask_BL.sum())} real tokens"
)
print(
  "sequences per domain:",
  {data.DOMAINS[d]: int(np.sum(domain_B == d)) for d in present},
)

# %% [markdown]
# ## Does routing depend on the domain?
#
# For each MoE layer: the share of each domain's tokens that go to each expert,
# the usage entropy H(f)/log E of each domain's load (1 = spread evenly; ST-MoE
# Table 14 reports this per token class), and the mutual information
# I(domain; expert) next to two chance references from
# `analysis.permutation_baseline`: the domain labels shuffled across tokens,
# and shuffled across whole sequences.

# %%
R = len(data.DOMAINS)
if not layers or len(present) < 2:
  print(
    "Skipped: this needs MoE layers and validation batches from at least "
    "two domains (TFDS corpora carry no domain)."
  )
else:
  fig, axes = plt.subplots(
    1, len(layers), figsize=(5 * len(layers), 2.5), squeeze=False
  )
  for ax, layer in zip(axes[0], layers):
    counts_RE = analysis.expert_by_label(
      expert_index[layer], domain_B, mask_BL, E, R
    )
    share_RE = counts_RE / np.maximum(counts_RE.sum(1, keepdims=True), 1)
    entropy_R = analysis.usage_entropy(counts_RE)
    print(f"\n{layer}: share of each domain's tokens per expert")
    show(
      ["domain", "tokens"] + [f"e{e}" for e in range(E)] + ["H(f)/log E"],
      [
        [data.DOMAINS[d], int(counts_RE[d].sum()), *share_RE[d], entropy_R[d]]
        for d in present
      ],
    )
    mi = analysis.mutual_information(counts_RE)
    nmi = analysis.normalized_mutual_information(counts_RE)
    tests = {
      shuffle: analysis.permutation_baseline(
        expert_index[layer],
        domain_B,
        mask_BL,
        E,
        R,
        NUM_PERMUTATIONS,
        SEED,
        shuffle=shuffle,
      )
      for shuffle in ("tokens", "sequences")
    }
    print(
      f"{layer}: I(domain; expert) = {mi:.4f} nats (I / H(domain) = {nmi:.3f})"
    )
    for shuffle, test in tests.items():
      print(
        f"  domains shuffled across {shuffle}: {test.chance_mean:.4f} "
        f"+- {test.chance_std:.4f} nats, p = {test.p_value:.3f}"
      )
    image = ax.imshow(share_RE[present], vmin=0, aspect="auto")
    fig.colorbar(image, ax=ax, label="share of the domain")
    ax.set(
      title=f"{layer}: share per expert",
      xlabel="expert",
      yticks=range(len(present)),
      yticklabels=[data.DOMAINS[d] for d in present],
    )
  plt.show()
  p_R = counts_RE.sum(1)[present] / counts_RE.sum()
  h_domain = float(-np.sum(p_R * np.log(p_R)))
  print(
    "\nHow to read: I(domain; expert) is 0 when the expert choice says "
    "nothing about the domain, and reaches H(domain) = "
    f"{h_domain:.3f} nats when each expert sees a single domain; "
    "I / H(domain) is the share explained. The shuffled "
    "values are what these same tokens give with the link between domain "
    "and expert broken. An observed I within a few standard deviations of "
    "them, or a large p, is no evidence that routing depends on the domain. "
    "Tokens of one sequence share its domain and context, so the "
    "sequence shuffle is the fairer reference; p cannot fall below "
    f"1 / (1 + NUM_PERMUTATIONS) = {1 / (1 + NUM_PERMUTATIONS):.4f}."
  )

# %% [markdown]
# ## Does routing depend on the token id?
#
# OpenMoE (Xue 2024) reports that routing is mostly decided by the token id.
# `analysis.token_id_purity` is the share of each id's occurrences that go to
# that id's most frequent expert, averaged with weight by frequency: 1 when
# the id alone decides. Routing that ignores the id scores about the largest
# expert load for frequent ids but 1 for ids seen once, so the reference is the
# same statistic with the first choices shuffled across tokens (same loads,
# same id frequencies).

# %%
for layer in layers:
  test = analysis.token_id_purity_baseline(
    expert_index[layer],
    inputs_BL,
    mask_BL,
    E,
    data.VOCAB_SIZE,
    NUM_PERMUTATIONS,
    SEED,
  )
  print(
    f"{layer}: token-id purity = {test.observed:.3f}; routing that "
    f"ignores the id: {test.chance_mean:.3f} +- {test.chance_std:.3f}, "
    f"p = {test.p_value:.3f} (1/E = {1 / E:.3f})"
  )
print(
  "\nHow to read: purity is 1 when the token id alone decides the first "
  "choice. A value close to the shuffled one means the id tells little "
  "about the expert beyond chance; the gap between them is the part of the "
  "routing that follows the id."
)

# %% [markdown]
# ## Did routing change between the last two checkpoints?
#
# `analysis.routing_agreement` is the share of validation tokens whose first
# choice is the same under two checkpoints of the run (OpenMoE: routing is
# fixed early in training). Two independent routings with these loads would
# agree on `chance_agreement` of the tokens.

# %%
if len(states) < 2:
  print("Only one checkpoint is kept; nothing to compare.")
else:
  first_step = min(states)
  earlier = route_all(states[first_step].params)
  for layer in layers:
    agree = analysis.routing_agreement(
      earlier[layer], expert_index[layer], mask_BL
    )
    chance = analysis.chance_agreement(
      earlier[layer], expert_index[layer], mask_BL, E
    )
    print(
      f"{layer}: step {first_step} vs {final_step}: agreement = "
      f"{agree:.3f}, independent routings: {chance:.3f}"
    )
  print(
    "\nHow to read: 1 means the later checkpoint routes every token as the "
    "earlier one did; a value near the independent one means the routing "
    "was reshuffled in between."
  )
