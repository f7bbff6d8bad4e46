# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Are experts specialists?
#
# "Mixture of experts" suggests a math expert, a code expert, a French
# expert. Is that what a trained router does? This notebook trains a tiny
# Switch top-1 model (`configs/switch_top1.py`, shrunk to a few minutes on a
# CPU), or opens one of your runs, and asks four questions of its routing on
# the held-out validation text:
#
# 1. Does an expert take mostly **code**, or mostly **English prose**?
# 2. Does an expert take mostly **letters, digits, spaces, punctuation**, or
#    in code **Python keywords vs names**?
# 3. Is a token's expert decided by **which token it is** (the byte "e"
#    always goes to expert 2) or by its **context** (the text around it)?
# 4. How early in training does the routing **settle**?
#
# Every measurement comes with a **chance level**: the same measurement on
# the same tokens with the link between expert and label broken by shuffling.
# A finite sample always shows some pattern; only the part above chance
# counts. `python -m moe_jax.analysis --workdir=...` computes the same
# numbers for any run and writes them to `<workdir>/analysis/`.

# %% tags=["parameters"]
# Parameters. To analyse your own run, set WORKDIR to its --workdir: a
# directory that holds a checkpoint is read as it is; an empty or missing one
# receives the tiny run.
WORKDIR = ""  # "" = a new temporary directory
NUM_STEPS = 600  # steps of the tiny run (unused for an existing run)
DATA_DIR = ""  # tiny run's data.data_dir; "" = ~/.cache/moe_jax/...
NUM_PERMUTATIONS = 100  # shuffles behind each chance level
SEED = 0

# %%
import io
import os
import sys
import tempfile
from pathlib import Path

from IPython.display import Image, display

import moe_jax
from moe_jax import analysis, train

CONFIGS = Path(moe_jax.__file__).resolve().parents[1] / "configs"


def show(figure):
  """Displays a matplotlib Figure of `moe_jax.analysis` as a PNG."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=90)
  display(Image(buffer.getvalue()))


# %% [markdown]
# ## The run
#
# The tiny run keeps everything of `switch_top1` (8 experts in every other
# block, each token sent to its single best expert, at most 1.25x the average
# load per expert in training) except its size: d_model 64, 64-byte
# sequences, 16 per batch. Its text is the Python standard library's source
# code and its English reference documentation. Besides the final checkpoint
# it keeps those of 5%, 10%, 25% and 50% of training
# (`train.keep_checkpoint_steps`), to see when the routing settled.

# %%
WORKDIR = WORKDIR or tempfile.mkdtemp(prefix="moe_jax_specialists_")
if not os.path.isdir(os.path.join(WORKDIR, "checkpoints")):
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
  tiny.train.log_every = max(NUM_STEPS // 20, 1)
  tiny.train.eval_every = NUM_STEPS
  tiny.train.checkpoint_every = NUM_STEPS
  tiny.train.max_checkpoints_to_keep = 1
  tiny.train.keep_checkpoint_steps = tuple(
    sorted({max(NUM_STEPS * p // 100, 1) for p in (5, 10, 25, 50)})
  )
  tiny.train.progress_bar = False
  train.train_and_evaluate(tiny, WORKDIR)

result = analysis.analyze_run(
  WORKDIR, num_permutations=NUM_PERMUTATIONS, seed=SEED
)
layers = list(result["layers"])
print(
  f"checkpoint of step {result['step']}; MoE layers {layers}; "
  f"{result['num_real_tokens']} validation tokens in "
  f"{result['num_sequences']} sequences; kept checkpoints "
  f"{result['kept_steps']}"
)


def chance_line(name, test):
  """One line: the observed value next to its chance level."""
  return (
    f"{name} = {test['observed']:.4f}, chance {test['chance_mean']:.4f} "
    f"+- {test['chance_std']:.4f} (p = {test['p_value']:.3f})"
  )


# %% [markdown]
# ## 1. Is there a code expert?
#
# Each row is a kind of text, each column an expert; a cell is the share of
# that text's tokens whose first-choice expert is that column (rows sum to
# 1). If experts ignored the kind of text, both rows would look alike: each
# expert would take the same share of code as of prose. One number
# summarises the difference, the **mutual information** I(domain; expert) in
# nats: 0 when the expert says nothing about the domain, ln 2 = 0.69 when
# every expert sees one domain only. Its chance level shuffles the domain
# labels across whole sequences.

# %%
figure = analysis.plot_expert_by_label(result, "expert_by_domain")
if figure is None:
  print("Skipped: the validation batches hold a single domain.")
else:
  show(figure)
  for layer, out in result["layers"].items():
    table = out["expert_by_domain"]
    print(
      chance_line(f"{layer}: I(domain; expert)", table["mutual_information"])
    )

# %% [markdown]
# ## 2. Is there a punctuation expert, or a keyword expert?
#
# The same table for kinds of token. The tokenizer reads bytes, so each token
# is one character (or a piece of one): a letter, a digit, a space or line
# break, punctuation, part of a non-English character, or a special marker.
# In code, the letters of a Python keyword (`def`, `return`, ...) and of a
# name (`self`, `my_list`, ...) form their own two rows. The chance level
# shuffles these labels across tokens.

# %%
show(analysis.plot_expert_by_label(result, "expert_by_category"))
for layer, out in result["layers"].items():
  table = out["expert_by_category"]
  print(
    chance_line(f"{layer}: I(category; expert)", table["mutual_information"])
  )

# %% [markdown]
# ## 3. Token or context?
#
# **Token-id purity** asks: when the same byte appears many times, how often
# does it go to its usual expert? 1 means the byte alone decides. The chance
# level is routing with the same expert loads that ignores the byte. It is
# well above 1/8, because rare bytes seen once or twice look "pure" by
# accident. The same question in nats is I(token; expert), to set against
# I(domain; expert) from section 1: the larger excess over chance says what
# the router listens to more.

# %%
show(analysis.plot_token_vs_context(result))
for layer, out in result["layers"].items():
  print(chance_line(f"{layer}: token-id purity", out["token_id"]["purity"]))
  print(
    chance_line(
      f"{layer}: I(token; expert)", out["token_id"]["mutual_information"]
    )
  )

# %% [markdown]
# ## 4. When does routing settle?
#
# For each kept checkpoint: the share of validation tokens it sends to the
# same expert as the final checkpoint does. Two unrelated routers with these
# loads would agree on the dashed "chance" share. OpenMoE (Xue et al. 2024)
# found that routing is fixed early in training.

# %%
figure = analysis.plot_settling(result)
if figure is None:
  print("Only one checkpoint: nothing to compare.")
else:
  show(figure)
for layer, out in result["layers"].items():
  for row in out["agreement"]:
    print(
      f"{layer}: step {row['step']} agrees with step {result['step']} on "
      f"{row['agreement']:.3f} of the tokens, chance {row['chance']:.3f}"
    )

# %% [markdown]
# ## 5. Which tokens lose their expert?
#
# Each expert has a fixed number of slots per group of tokens; tokens beyond
# that are *dropped* (they skip the expert layer). Top: the share of tokens
# dropped at each position in the sequence, at the evaluation capacity.
# Bottom: which expert each position goes to.

# %%
show(analysis.plot_position(result))

# %% [markdown]
# ## The answer, in words
#
# Generated from the numbers above by fixed rules (`moe_jax.analysis.
# analyze_run` lists them): "above chance" means at least 3 standard
# deviations above the shuffled level; a "specialist" takes at least twice
# its average share of one kind of text or token.

# %%
print("\n".join(result["summary"]))
print(f"\nreport: {os.path.join(WORKDIR, 'analysis', 'report.md')}")
