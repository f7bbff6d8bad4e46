# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Capacity and drop priority
#
# A tokens-choose router gives each expert C slots per group of S tokens; a
# (token, choice) pair that finds its expert full is dropped, and the
# residual connection alone carries it. This notebook uses only the pure
# functions of `moe_jax.routing`, no model:
#
# 1. how many slots each codebase's rule gives for the same capacity factor;
# 2. *which* pairs are dropped under the three drop priorities (k-major,
#    token-major, batch priority), by position in the sequence;
# 3. how many are dropped as the capacity factor grows;
# 4. what the drops cost in quality, from the `switch_capacity` reproduction
#    suite when it has been run.
#
# Shapes follow `moe_jax.shapes`: logits `[G, S, E]`, choices `[G, S, K]`.

# %% tags=["parameters"]
# Parameters.
S = 64  # tokens per group
E = 8  # experts
K = 2  # experts per token (top-2)
CAPACITY_FACTOR = 1.25  # for the drop-by-position study
NUM_GROUPS = 512  # groups of drawn logits behind each drop rate
SKEW = 1.0  # expert popularity ~ 1 / (e + 1)^SKEW, see section 2
SEED = 0
RESULTS_DIR = ""  # "" = the repository's results/

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import moe_jax
from moe_jax import routing

REPO = Path(moe_jax.__file__).resolve().parents[1]
RESULTS = Path(RESULTS_DIR) if RESULTS_DIR else REPO / "results"
PRIORITY_COLORS = {
  "k_major": "tab:blue",
  "token_major": "tab:orange",
  "batch_priority": "tab:green",
}


def show(header, rows):
  """Prints rows under a header, aligned; floats to 4 places."""
  text = [[str(h) for h in header]]
  for row in rows:
    text.append(
      [
        f"{v:.4f}" if isinstance(v, (float, np.floating)) else str(v)
        for v in row
      ]
    )
  widths = [max(len(row[i]) for row in text) for i in range(len(header))]
  for row in text:
    print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))


# %% [markdown]
# ## 1. Slots per expert: the capacity rules
#
# The capacity factor CF scales an expert's even share of the group, but the
# codebases disagree on the share (`routing.CAPACITY_RULES`):
#
# * **switch** (Fedus 2021, Eq. 3): C = ceil(CF · S / E), no factor K;
# * **gshard** (Lepikhin 2020, §2.2) and **megatron**: C = ceil(CF · K · S / E);
# * **flaxformer**: round(CF · S / E); **vmoe**: the gshard C rounded up to a
#   multiple of 4;
# * **maxtext**: int(max(ceil(K · S / E) · CF, CF)), the ceiling before the
#   factor;
# * **praxis**: int(CF · S / E) rounded up to a multiple of 4, no K (its CF
#   for top-2 is "unadjusted": 2.0 means GShard's 2S/E).
#
# Every rule clamps C to at most S. `min_capacity` is 0 here so that the
# formulas show. With K = 2 the rules without K give half the slots: the
# same CF means a different model.

# %%
CFS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0)
print(
  f"C for S = {S}, E = {E}, K = {K} (an expert receives K S / E = "
  f"{K * S // E} pairs per group on average):"
)
show(
  ["rule"] + [f"CF={cf:g}" for cf in CFS],
  [
    [name] + [routing.compute_capacity(S, E, K, cf, name, 0) for cf in CFS]
    for name in routing.CAPACITY_RULES
  ],
)
print(
  f"\nC(S={S}, E={E}, K={K}, CF=1.25): "
  + " ".join(
    f"{name}={routing.compute_capacity(S, E, K, 1.25, name, 0)}"
    for name in routing.CAPACITY_RULES
  )
)

# %% [markdown]
# ## 2. Router logits with popular experts
#
# Drops need an imbalanced router. We **draw** the logits (no trained model
# is involved): z_{g,t,e} = b_e + ε_{g,t,e} with ε ~ N(0, 1) i.i.d. from
# `numpy.random.default_rng(SEED)` and a popularity bias
# b_e = -SKEW · ln(e + 1), so that softmax(b) ∝ 1 / (e + 1)^SKEW: expert 0 is
# the most popular, expert E - 1 the least. Position in the sequence plays no
# role in the draw, so any dependence of the drops on position below comes
# from the priority order alone. The gates follow GShard (top-2,
# renormalised); they do not affect which pairs are dropped.

# %%
rng = np.random.default_rng(SEED)
bias_E = -SKEW * np.log(np.arange(E) + 1.0)
logits_GSE = bias_E + rng.standard_normal((NUM_GROUPS, S, E))
capacity = routing.compute_capacity(S, E, K, CAPACITY_FACTOR, "gshard", 0)
choices_GSK = np.asarray(routing.top_k_indices(logits_GSE, K))
pairs_E = np.bincount(choices_GSK.ravel(), minlength=E) / NUM_GROUPS
print(
  f"{NUM_GROUPS} groups of S = {S} tokens, E = {E}, top-{K}; "
  f"C = {capacity} (gshard rule, CF = {CAPACITY_FACTOR:g})"
)
show(
  ["expert"] + [f"e{e}" for e in range(E)],
  [
    ["first choices / group"]
    + list(np.bincount(choices_GSK[..., 0].ravel(), minlength=E) / NUM_GROUPS),
    ["all choices / group"] + list(pairs_E),
  ],
)

# %% [markdown]
# ## 3. Who is dropped: the priority order
#
# `routing.assign_slots` walks the (token, choice) pairs of a group in a
# priority order; each takes the next slot of its expert and is kept iff
# that slot is < C. The counter advances for dropped pairs too (GShard
# Alg. 1), so *every* order keeps exactly min(n_e, C) of the n_e pairs that
# chose expert e: the priority decides **who** is dropped, never **how
# many**.
#
# * **k_major** (GShard Alg. 1; Switch, flaxformer, vmoe): every first choice
#   in token order, then every second choice. A first choice at position
#   t < C is never dropped, but second choices drop anywhere.
# * **token_major** (MaxText): token 0's K choices, then token 1's, ... A
#   token's K choices go to K different experts, so a pair at position t has
#   at most t pairs of its expert before it: no pair at t < C is dropped, and
#   within an expert the kept pairs are a prefix of the sequence.
# * **batch_priority** (V-MoE BPR, Riquelme 2021 §3.1; ST-MoE App. D):
#   k-major over the tokens sorted by their top-1 probability, most
#   confident first. Drops no longer depend on position.
#
# Only token-major is causal: under the other two a later token can take the
# slot of an earlier one (REFERENCE (i), "causality leaks"). The last column
# checks it: redraw the logits of the second half of every group and count
# the changed kept/dropped decisions of the first half.

# %%
positions = np.arange(S)
quarter = S // 4
future_GSE = logits_GSE.copy()
future_GSE[:, S // 2 :] = bias_E + np.random.default_rng(
  SEED + 1
).standard_normal((NUM_GROUPS, S - S // 2, E))
dropped = {}
rows = []
for priority in routing.PRIORITIES:
  route = routing.route_tokens(
    logits_GSE, router="gshard", top_k=K, capacity=capacity, priority=priority
  )
  kept_GSK = np.asarray(route.kept_GSK)
  expert_GSK = np.asarray(route.expert_index_GSK)
  dropped[priority] = ~kept_GSK
  # A kept pair after (in token order) a dropped pair of the same expert.
  onehot_GNE = np.eye(E, dtype=int)[expert_GSK].reshape(NUM_GROUPS, S * K, E)
  drops_GNE = onehot_GNE * ~kept_GSK.reshape(NUM_GROUPS, S * K, 1)
  drops_before_GNE = np.cumsum(drops_GNE, axis=1) - drops_GNE
  kept_after_drop = int(
    np.sum(
      onehot_GNE
      * drops_before_GNE.clip(0, 1)
      * kept_GSK.reshape(NUM_GROUPS, S * K, 1)
    )
  )
  future = routing.route_tokens(
    future_GSE, router="gshard", top_k=K, capacity=capacity, priority=priority
  )
  leaked = int(
    np.sum(np.asarray(future.kept_GSK)[:, : S // 2] != kept_GSK[:, : S // 2])
  )
  drop_S = (~kept_GSK).mean(axis=(0, 2))
  rows.append(
    [
      priority,
      float((~kept_GSK).mean()),
      float((~kept_GSK[..., 0]).mean()),
      float((~kept_GSK[..., 1:]).mean()),
      float((~kept_GSK).all(-1).mean()),
      float(drop_S[:quarter].mean()),
      float(drop_S[-quarter:].mean()),
      kept_after_drop,
      leaked,
    ]
  )
show(
  [
    "priority",
    "all pairs",
    "1st choices",
    "2nd choices",
    "token lost all",
    "first S/4",
    "last S/4",
    "kept after drop",
    "1st half changed",
  ],
  rows,
)
print()
for row in rows:
  print(
    f"drop[{row[0]}]: all pairs {row[1]:.4f}, first choices {row[2]:.4f}, "
    f"second choices {row[3]:.4f}, first quarter {row[5]:.4f}, last quarter "
    f"{row[6]:.4f}, kept after a drop {row[7]}, first-half decisions changed "
    f"by the second half {row[8]}"
  )
for priority in routing.PRIORITIES:
  for k, rank in enumerate(("first", "second")):
    where = np.nonzero(dropped[priority][..., k].any(0))[0]
    print(
      f"earliest dropped position[{priority}, {rank} choice]: "
      f"{int(where[0]) if len(where) else 'none'}"
    )

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
for k, ax in enumerate(axes):
  for priority in routing.PRIORITIES:
    ax.plot(
      positions,
      dropped[priority][..., k].mean(0),
      color=PRIORITY_COLORS[priority],
      label=priority,
    )
  ax.axvline(
    capacity - 0.5, color="gray", linestyle="--", label=f"t = C = {capacity}"
  )
  ax.set(
    title=f"{('first', 'second')[k]} choices dropped, by position",
    xlabel="position t in the group (tokens)",
    ylabel="fraction of pairs dropped",
  )
  ax.grid(alpha=0.3)
axes[0].legend()
fig.suptitle(
  f"Top-{K}, S = {S}, E = {E}, C = {capacity} (CF {CAPACITY_FACTOR:g}), "
  f"drawn logits (skew {SKEW:g}), {NUM_GROUPS} groups"
)
fig.tight_layout()
plt.show()

# %% [markdown]
# How to read: token-major keeps every pair of the first C positions and
# drops late tokens, both ranks alike; k-major protects every first choice
# at the cost of second choices, even early ones; batch priority spreads the
# drops over the sequence and drops the least confident tokens. All three
# drop the same number of pairs.

# %% [markdown]
# ## 4. How many are dropped: drops vs capacity factor
#
# Because a pair's slot does not depend on C (the counter advances on
# overflow), one routing with C = S gives the drops at every capacity: a pair
# is kept iff its slot is < C. Three routers, each top-2:
#
# * **balanced**: token t chooses experts t mod E and (t + 1) mod E, so every
#   expert receives exactly K S / E pairs;
# * **drawn**: the logits of section 2;
# * **collapsed**: every token chooses experts 0 and 1.
#
# Under the gshard rule C = ceil(CF · K · S / E) reaches S at CF = E / K, and
# then nothing can be dropped whatever the router; without K in the rule
# (switch) that takes CF = E.

# %%
t_S = np.arange(S)
routers = {
  "balanced": 10.0 * np.eye(E)[t_S % E] + 5.0 * np.eye(E)[(t_S + 1) % E],
  "drawn": logits_GSE,
  "collapsed": 10.0 * np.eye(E)[np.zeros(S, int)]
  + 5.0 * np.eye(E)[np.ones(S, int)],
}
slots = {}
for name, logits in routers.items():
  logits = (
    np.broadcast_to(logits, (NUM_GROUPS, S, E)) if logits.ndim == 2 else logits
  )
  route = routing.route_tokens(logits, router="gshard", top_k=K, capacity=S)
  slots[name] = np.asarray(route.position_GSK)
cf_grid = np.arange(0.25, 8.01, 0.25)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
router_colors = {
  "balanced": "tab:green",
  "drawn": "tab:blue",
  "collapsed": "tab:red",
}
drop_at = {}
for ax, rule in zip(axes, ("gshard", "switch")):
  for name, position_GSK in slots.items():
    drops = []
    for cf in cf_grid:
      c = routing.compute_capacity(S, E, K, float(cf), rule, 0)
      drops.append(float(np.mean(position_GSK >= c)))
      drop_at[rule, name, float(cf)] = drops[-1]
    ax.plot(cf_grid, drops, color=router_colors[name], marker=".", label=name)
  limit = E / K if rule == "gshard" else E
  ax.axvline(
    limit, color="gray", linestyle="--", label=f"C = S (CF = {limit:g})"
  )
  with_k = " · K" if rule == "gshard" else ""
  ax.set(
    title=f"{rule} rule: C = ceil(CF{with_k} · S / E)",
    xlabel="capacity factor CF",
    ylabel="fraction of (token, choice) pairs dropped",
  )
  ax.grid(alpha=0.3)
  ax.legend()
fig.suptitle(f"Top-{K}, S = {S}, E = {E}: drops vs capacity factor")
fig.tight_layout()
plt.show()
for rule in ("gshard", "switch"):
  for cf in (0.5, 1.0, 1.25, 2.0, 4.0, 8.0):
    print(
      f"drop fraction rule={rule} cf={cf:g}: "
      + ", ".join(f"{name} {drop_at[rule, name, cf]:.4f}" for name in routers)
    )

# %% [markdown]
# ## 5. What the drops cost: the `switch_capacity` suite
#
# `experiments/reproduce.py --suite=switch_capacity` trains top-1 and top-2
# language models at training CF 0.75, 1.0, 1.25 and 2.0 (top-2 with the
# gshard and the switch rule; token-major priority) and evaluates every
# checkpoint again at CF 0.75 ... 3.0 without retraining. This cell reads
# its `results.json`; it trains nothing.

# %%
path = RESULTS / "switch_capacity" / "results.json"
if not path.exists():
  print(
    f"{path.relative_to(REPO) if not RESULTS_DIR else path} not found: the "
    "switch_capacity suite has not been run yet. Produce it "
    "with\n  python experiments/reproduce.py --suite=switch_capacity "
    "--scale=cpu\n(several hours on a CPU; it resumes where it stopped), "
    "then re-execute this notebook."
  )
else:
  results = json.loads(path.read_text())
  families = {
    "top-1": (1, ""),
    "top-2, C with K": (2, ""),
    "top-2, C without K": (2, "_noK"),
  }

  def summaries(arm):
    return [r["summary"] for r in results["runs"] if r["arm"] == arm]

  def mean_std(values):
    values = np.asarray([v for v in values if v is not None], float)
    if values.size == 0:
      return np.nan, np.nan
    return values.mean(), values.std(ddof=1) if values.size > 1 else 0.0

  train_cfs = sorted(
    {float(r["arm"].rsplit("_cf", 1)[1]) for r in results["runs"]}
  )
  print(
    f"switch_capacity at scale {results['scale']!r}: "
    f"{len(results['runs'])} runs"
  )
  table = []
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  family_colors = dict(zip(families, ("tab:blue", "tab:orange", "tab:green")))
  for family, (k, suffix) in families.items():
    xs, loss, loss_std = [], [], []
    for cf in train_cfs:
      runs = summaries(f"top{k}{suffix}_cf{cf:g}")
      if not runs:
        continue
      m, s = mean_std([r.get("eval_loss") for r in runs])
      m2, _ = mean_std([r.get("eval_loss@cf2") for r in runs])
      drop, _ = mean_std([r.get("drop_fraction") for r in runs])
      table.append([family, f"{cf:g}", len(runs), m, s, m2, drop])
      xs.append(cf)
      loss.append(m)
      loss_std.append(s)
    if xs:
      axes[0].errorbar(
        xs,
        loss,
        yerr=loss_std,
        marker="o",
        capsize=3,
        color=family_colors[family],
        label=family,
      )
    runs = summaries(f"top{k}{suffix}_cf1.25")
    eval_cfs = sorted(
      float(key.split("@cf")[1])
      for key in (runs[0] if runs else {})
      if key.startswith("eval_loss@cf")
    )
    if eval_cfs:
      axes[1].plot(
        eval_cfs,
        [
          mean_std([r.get(f"eval_loss@cf{x:g}") for r in runs])[0]
          for x in eval_cfs
        ],
        marker="o",
        color=family_colors[family],
        label=family,
      )
  show(
    [
      "model",
      "train CF",
      "seeds",
      "eval loss",
      "std",
      "eval loss @CF 2",
      "drop fraction",
    ],
    table,
  )
  axes[0].set(
    title="Validation loss at the training CF",
    xlabel="training capacity factor",
    ylabel="validation loss (nats / byte)",
  )
  axes[1].set(
    title="Trained at CF 1.25, evaluated at other CFs",
    xlabel="evaluation capacity factor",
    ylabel="validation loss (nats / byte)",
  )
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  plt.show()
  for row in results.get("claims", []):
    claim = row["claim"]
    print(f"{claim['id']}: {row['verdict']} -- {claim['text']}")
