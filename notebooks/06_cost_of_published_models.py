# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # What published MoE models cost
#
# An MoE model has many experts but runs only a few of them per token. So it
# has two sizes: the **total** parameters (what must be stored, and trained)
# and the **active** parameters (what one token is multiplied by, which sets
# the compute per token). This notebook computes both, the memory to train,
# the compute per token and the traffic between devices for the published
# architectures in `moe_jax.cost.PRESETS`, from their layer sizes alone, and
# checks the totals against the numbers the papers give. The same numbers for
# any preset or config: `python -m moe_jax.cost --preset=all`.

# %% tags=["parameters"]
SEQ_LEN = 4096  # tokens per sequence, for the attention FLOPs
TOKENS_PER_STEP = 2**20  # tokens in one training batch (about a million)
EXPERT_PARALLEL = 8  # devices the experts are spread over (the example mesh)
DEVICE_MEMORY_GB = 80  # one accelerator's memory, for scale

# %%
import matplotlib.pyplot as plt
import numpy as np

from moe_jax import cost

names = list(cost.PRESETS)
archs = [cost.PRESETS[name] for name in names]
GB = 1e9


def billions(n):
  return f"{n / 1e9:,.1f}B"


# %% [markdown]
# ## Total vs active parameters
#
# Total: every weight of the model. Active: the weights one token uses (the
# shared layers plus the K experts it is routed to, and the input embedding,
# as Mixtral counts it; DeepSeek-V3's "37B" leaves it out, hence our 1.5%
# more). The published column is what the paper or release says; the ratio
# column is ours over theirs.

# %%
total = np.array([cost.total_params(a) for a in archs], np.float64)
active = np.array([cost.active_params(a) for a in archs], np.float64)
for name, t, a in zip(names, total, active):
  published_total, published_active, where = cost.PUBLISHED[name]
  line = (
    f"{name}: total {billions(t)} (published {billions(published_total)}, "
    f"ratio {t / published_total:.3f}), active {billions(a)}"
  )
  if published_active:
    line += (
      f" (published {billions(published_active)}, ratio "
      f"{a / published_active:.3f})"
    )
  print(f"{line}; {t / a:.1f}x more stored than used per token [{where}]")

fig, ax = plt.subplots(figsize=(10, 4))
x = np.arange(len(names))
for offset, values, label in ((-0.2, total, "total"), (0.2, active, "active")):
  bars = ax.bar(x + offset, values, 0.4, label=label)
  ax.bar_label(
    bars, [billions(v) for v in values], fontsize=7, rotation=90, padding=2
  )
ax.set_yscale("log")
ax.set_ylim(top=total.max() * 30)
ax.set_xticks(x, names, rotation=20)
ax.set_ylabel("parameters (log scale)")
ax.set_title("total vs active parameters")
ax.legend()
plt.show()

# %% [markdown]
# ## Memory to train
#
# Training with Adam in mixed precision stores, per parameter: the weight in
# bfloat16 (2 bytes), its gradient (2 bytes), Adam's two moments and a
# float32 master copy (12 bytes): 16 bytes, for **every** parameter, used or
# not. Activations (which grow with the batch) come on top. The last column
# is how many accelerators of DEVICE_MEMORY_GB it takes just to hold this
# state.

# %%
for name, arch in zip(names, archs):
  weights = cost.param_bytes(arch, "bfloat16")
  grads = weights
  adam = cost.optimizer_bytes(arch, "adam", "bfloat16")
  state = weights + grads + adam
  print(
    f"{name}: weights {weights / GB:,.0f} GB + gradients {grads / GB:,.0f} "
    f"GB + Adam and master copy {adam / GB:,.0f} GB = {state / GB:,.0f} GB "
    f"({state / cost.total_params(arch):.0f} bytes/param): at least "
    f"{int(np.ceil(state / GB / DEVICE_MEMORY_GB))} devices of "
    f"{DEVICE_MEMORY_GB} GB"
  )

# %% [markdown]
# ## Compute per token
#
# Training costs about 6 floating-point operations per active parameter per
# token (2 forward, 4 backward; Kaplan et al. 2020), plus attention over the
# sequence. A dense model with as many parameters as the MoE's total would
# cost 6 x total; the MoE pays only for what it activates.

# %%
for name, arch, t in zip(names, archs, total):
  flops = cost.training_flops_per_token(arch, SEQ_LEN)
  dense = 6 * t
  print(
    f"{name}: {flops / 1e9:,.0f} GFLOP per training token at "
    f"{SEQ_LEN} tokens per sequence; a dense model of the same total size: "
    f"{dense / 1e9:,.0f} GFLOP ({dense / flops:.1f}x more)"
  )

# %% [markdown]
# ## Traffic between devices
#
# When the experts are spread over EXPERT_PARALLEL devices, every token is
# sent to the devices of its K experts and the result sent back (two
# all-to-all exchanges per MoE layer, and again for the gradients in
# training). The bytes per step grow with K, d_model and the number of MoE
# layers, not with the number of experts.

# %%
for name, arch in zip(names, archs):
  moved = cost.all_to_all_bytes(arch, TOKENS_PER_STEP, EXPERT_PARALLEL)
  print(
    f"{name}: {moved / GB:,.0f} GB leave their device per training step of "
    f"{TOKENS_PER_STEP:,} tokens on {EXPERT_PARALLEL} expert devices "
    f"({moved / EXPERT_PARALLEL / GB:,.1f} GB per device; "
    f"{moved / TOKENS_PER_STEP / 1e3:,.0f} kB per token)"
  )
