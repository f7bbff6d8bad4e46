"""Writes the notebooks of this folder from the cell sources below.

  python notebooks/build_notebooks.py

The .ipynb files are the artifacts users open; this script is their
reviewable source. Edit a cell here, rerun the script, and commit both. The
notebooks are written without outputs and with stable cell ids, so a rebuild
of unchanged sources gives byte-identical files. tests/test_notebooks.py
executes them.
"""

from pathlib import Path

import nbformat
from nbformat import v4

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------
# 01_routing_by_hand.ipynb

ROUTING_BY_HAND = [
  (
    "markdown",
    """# Routing by hand

The routing math of `moe_jax` without a model: one group of S = 8 tokens and
E = 4 experts, every tensor small enough to read. Each step is a pure function
of `moe_jax.routing`, `moe_jax.dispatch` or `moe_jax.losses`, the same calls
the `MoeLayer` makes. Shapes follow `moe_jax.shapes`: logits `[G, S, E]`,
choices `[G, S, K]`, dispatch/combine tensors `[G, S, E, C]`, expert buffers
`[E, G, C, D]`.""",
  ),
  (
    "code",
    """import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import dispatch, losses, routing


def show(header, rows):
  \"\"\"Prints rows under a header, aligned; floats to 3 places.\"\"\"
  text = [[str(h) for h in header]]
  for row in rows:
    text.append(
      [f"{v:.3f}" if isinstance(v, (float, np.floating)) else str(v)
       for v in row]
    )
  widths = [max(len(row[i]) for row in text) for i in range(len(header))]
  for row in text:
    print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))""",
  ),
  (
    "markdown",
    """## 1. Router probabilities

A router is a linear map of each token, z_t = x_t W_r, kept in float32
(Switch, Fedus 2021, §2.4). Here we write the logits z down directly. Every
scheme below starts from p_t = softmax(z_t) over all E experts (Switch Eq. 1).
Token t5 has no preference at all: `jax.lax.top_k` breaks the tie towards the
lower expert index.""",
  ),
  (
    "code",
    """E, S = 4, 8
logits_GSE = jnp.array([[
  [2.0, 1.0, 0.0, -1.0],  # t0: clearly e0
  [1.9, 1.8, 0.0, 0.0],   # t1: e0 by a hair over e1
  [2.2, 0.0, 1.0, 0.0],   # t2: e0, then e2
  [0.0, 2.0, 1.9, 0.0],   # t3: e1, e2 close behind
  [1.5, 0.0, 0.0, 1.4],   # t4: e0, then e3
  [0.0, 0.0, 0.0, 0.0],   # t5: no preference
  [2.5, 0.0, 0.0, 2.0],   # t6: e0, then e3
  [0.0, 0.5, 0.0, 3.0],   # t7: e3
]])
probs_GSE = routing.router_probabilities(logits_GSE)
show(
  ["token"] + [f"p(e{e})" for e in range(E)] + ["argmax"],
  [
    [f"t{t}", *np.asarray(probs_GSE[0, t]), int(jnp.argmax(probs_GSE[0, t]))]
    for t in range(S)
  ],
)""",
  ),
  (
    "markdown",
    """## 2. Gates: Switch top-1 vs GShard top-2

* **Switch** (Fedus 2021, Eq. 2): one expert e* = argmax p_t, combine weight
  g = p_{t,e*}, the raw probability. It is below 1 and is the router's only
  gradient from the task loss.
* **GShard** (Lepikhin 2020, Alg. 1, line 5): the top two experts, weights
  renormalised g_i = p_i / (p_1 + p_2), so they sum to 1 and g_2 <= 1/2.
* **Mixtral** (a softmax over the K largest logits) gives the same numbers as
  GShard's renormalisation, computed in another order.""",
  ),
  (
    "code",
    """choices = {}
for name, top_k in [("switch", 1), ("gshard", 2), ("mixtral", 2)]:
  convention = routing.gate_convention(name, top_k, E)
  choices[name] = routing.top_k_gates(logits_GSE, top_k, convention)

(switch_e, switch_g), (gshard_e, gshard_g), (mixtral_e, mixtral_g) = (
  choices[name] for name in ("switch", "gshard", "mixtral")
)
show(
  ["token", "switch e", "g", "gshard e1", "g1", "e2", "g2", "g1+g2"],
  [
    [
      f"t{t}", int(switch_e[0, t, 0]), float(switch_g[0, t, 0]),
      int(gshard_e[0, t, 0]), float(gshard_g[0, t, 0]),
      int(gshard_e[0, t, 1]), float(gshard_g[0, t, 1]),
      float(gshard_g[0, t].sum()),
    ]
    for t in range(S)
  ],
)
same = jnp.allclose(mixtral_g, gshard_g) & (mixtral_e == gshard_e).all()
print("mixtral weights == gshard weights:", bool(same))""",
  ),
  (
    "markdown",
    """## 3. Capacity: slots per expert per group

An expert takes at most C tokens of a group; the rest of its tokens are
dropped. Codebases disagree on C (`routing.CAPACITY_RULES`):

* Switch Eq. 3: C = ceil(S / E · CF), with no factor K.
* GShard §2.2: C = 2S/E for top-2, i.e. ceil(K · S · CF / E) (Megatron-LM
  uses the same formula).
* flaxformer rounds instead of ceiling; vmoe rounds up to a multiple of 4.

A `min_capacity` (4 in the Switch and flaxformer gin files) then clamps C from
below; it is 0 here so that the formulas show. "round" is Python's, which
rounds halves to even: round(2.5) = 2. The second table uses the default
layer of `configs/base.py` (S = 512, E = 8).""",
  ),
  (
    "code",
    """settings = [(1, 1.0), (1, 1.25), (2, 1.25), (2, 2.0)]
for group_size, num_experts in [(S, E), (512, 8)]:
  print(f"\\nC for S = {group_size}, E = {num_experts}:")
  show(
    ["rule", "x K", "rounding"] + [f"K={k} CF={cf}" for k, cf in settings],
    [
      [name, rule.times_k, f"{rule.rounding}/{rule.multiple_of}"]
      + [
        routing.compute_capacity(group_size, num_experts, k, cf, name, 0)
        for k, cf in settings
      ]
      for name, rule in routing.CAPACITY_RULES.items()
    ],
  )""",
  ),
  (
    "markdown",
    """## 4. Who gets dropped: the priority order

GShard top-2 gates with C = 2 slots per expert: 16 choices for 8 slots, and
6 of the 8 first choices want e0, so capacity must drop some. `assign_slots`
walks the (token, choice) pairs in a priority order, each pair taking the
next slot of its expert while one is free (GShard Alg. 1: the counter also
advances on overflow):

* **k_major** (GShard Alg. 1; Switch, flaxformer, vmoe): every first choice in
  token order, then every second choice.
* **token_major** (MaxText): token 0's two choices, then token 1's, ...
* **batch_priority** (V-MoE, Riquelme 2021 §3.1; ST-MoE App. D): k-major over
  the tokens sorted by their top-1 probability, most confident first.

In the grids `1`/`2` mark a kept first/second choice, `x1`/`x2` a dropped one,
and `.` an expert the token did not choose. k-major at K >= 2 and batch
priority let later tokens decide whether an earlier one is dropped, so they
leak the future in a decoder (REFERENCE (i)).""",
  ),
  (
    "code",
    """capacity = 2
routes = {}
for priority in routing.PRIORITIES:
  route = routing.route_tokens(
    logits_GSE, router="gshard", top_k=2, capacity=capacity, priority=priority
  )
  routes[priority] = route
  grid = [["."] * E for _ in range(S)]
  for t in range(S):
    for k in range(2):
      e = int(route.expert_index_GSK[0, t, k])
      grid[t][e] = ("" if route.kept_GSK[0, t, k] else "x") + str(k + 1)
  lost = [f"t{t}" for t in range(S) if not route.kept_GSK[0, t].any()]
  print(f"\\n{priority}: {int(route.kept_GSK.sum())} of {2 * S} choices kept;"
        f" tokens with no expert left: {lost or 'none'}")
  show(["token"] + [f"e{e}" for e in range(E)],
       [[f"t{t}"] + grid[t] for t in range(S)])

order = np.argsort(-np.asarray(probs_GSE[0].max(-1)), stable=True)
print("\\nbatch_priority visits the tokens in the order",
      [f"t{t}" for t in order])""",
  ),
  (
    "markdown",
    """## 5. Dispatch and combine: three backends, one result

* **einsum** (GShard Alg. 2, §2.2; Switch): a one-hot dispatch tensor
  `dispatch[g, s, e, c] = 1` iff token s sits in slot c of expert e, and
  `combine = dispatch · g`. Faithful to the papers, but O(G·S·E·C).
* **indices**: gather each kept pair's token into slot (e, g, position) of
  the `[E, G, C, D]` buffers and gather it back, O(G·S·K·D) memory.
* **dropless**: sort the kept pairs by expert into rows `[N, D]` for one
  grouped matmul (MegaBlocks). The `MoeLayer` routes it with capacity S, so
  nothing is dropped; given this routing it moves the same pairs.

The toy experts below multiply their tokens by e + 1, so token t's output is
(sum over its kept pairs of g_k · (e_k + 1)) · x_t, and exactly 0 for a token
that lost every expert.""",
  ),
  (
    "code",
    """route = routes["k_major"]
dispatch_GSEC, combine_GSEC = dispatch.dispatch_and_combine_tensors(
  route, E, capacity
)
rows = []
for e in range(E):
  for c in range(capacity):
    tokens = np.flatnonzero(np.asarray(dispatch_GSEC[0, :, e, c]))
    t = int(tokens[0]) if len(tokens) else None
    gate = float(combine_GSEC[0, t, e, c]) if t is not None else 0.0
    rows.append([f"e{e}", c, "empty" if t is None else f"t{t}", gate])
show(["expert", "slot", "token", "combine weight"], rows)

x_GSD = jax.random.normal(jax.random.key(0), (1, S, 3))
scale_E111 = (jnp.arange(E) + 1.0)[:, None, None, None]
outputs = {}
for backend in dispatch.DISPATCHERS:
  x_expert, extra = dispatch.dispatch(x_GSD, route, E, capacity, backend)
  if backend == "dropless":  # rows sorted by expert: group_sizes_E per expert
    expert_N = np.repeat(np.arange(E), np.asarray(extra.group_sizes_E))
    expert_N = np.pad(expert_N, (0, x_expert.shape[0] - len(expert_N)))
    scale = (expert_N + 1.0)[:, None]
  else:
    scale = scale_E111
  outputs[backend] = dispatch.combine(
    x_expert * scale, route, E, capacity, backend, extra
  )
print()
for backend in ("indices", "dropless"):
  difference = float(jnp.max(jnp.abs(outputs["einsum"] - outputs[backend])))
  print(f"einsum and {backend} backends agree: "
        f"max |difference| = {difference:.1e}")

# By hand: sum over the kept pairs of g_k (e_k + 1), times x_t.
factor_S = np.sum(
  np.asarray(route.gates_GSK[0]) * (np.asarray(route.expert_index_GSK[0]) + 1),
  axis=-1,
)
by_hand_GSD = factor_S[None, :, None] * np.asarray(x_GSD)
print("matches the hand formula:",
      bool(np.allclose(outputs["indices"], by_hand_GSD, atol=1e-6)))
print("output factor y_t / x_t per token:", np.round(factor_S, 3))""",
  ),
  (
    "markdown",
    """## 6. Balancing losses and the z-loss

With f_e a dispatch fraction (counted before capacity) and P_e the mean router
probability of expert e (`losses.LOAD_BALANCING_LOSSES`):

* **switch** (Fedus 2021, Eqs. 4-6): E · Σ_e f_e P_e, f over first choices.
* **gshard** (Lepikhin 2020, Alg. 1): (1/E) Σ_e (c_e / S) m_e, the Switch
  loss divided by E².
* **all_choices** (flaxformer; ST-MoE App. A): E · Σ_e f_e P_e, f over all K
  choices, so Σ f = K.
* **k_normalized** (Megatron-LM; DeepSeek's f_i): the all-choices loss / K.

The losses take P and the choices separately, so we build the two extremes by
hand. *Balanced*: P uniform, first choices cycling over the experts (2 tokens
each), second choice the next expert. *Collapsed*: all probability on e0,
every first choice e0, every second choice e1. The last column is the value
at perfect balance that each docstring states.""",
  ),
  (
    "code",
    """t_S = np.arange(S)
balanced_P = jnp.full((1, S, E), 1.0 / E)
balanced_idx = jnp.asarray(np.stack([t_S % E, (t_S + 1) % E], -1)[None])
collapsed_P = jax.nn.one_hot(jnp.zeros((1, S), int), E)
collapsed_idx = jnp.asarray(np.tile([0, 1], (1, S, 1)))
at_balance = {"switch": "1", "gshard": "1/E^2 = 0.0625", "all_choices": "K",
              "k_normalized": "1"}
rows = []
for name, loss_fn in losses.LOAD_BALANCING_LOSSES.items():
  row = [name]
  for k in (1, 2):
    row.append(float(loss_fn(balanced_P, balanced_idx[..., :k])))
    row.append(float(loss_fn(collapsed_P, collapsed_idx[..., :k])))
  rows.append(row + [at_balance[name]])
show(["loss", "K=1 balanced", "collapsed", "K=2 balanced", "collapsed",
      "docstring"], rows)""",
  ),
  (
    "markdown",
    """The **router z-loss** (ST-MoE, Zoph 2022, Eq. 5) is
(1/T) Σ_t (logsumexp_e z_{t,e})², on the raw logits. It penalises their size,
not imbalance: adding a constant to every logit leaves p, f and P, and so
every balancing loss, unchanged, but raises the z-loss. ST-MoE weights it by
1e-3.""",
  ),
  (
    "code",
    """cases = {
  "uniform z = 0": jnp.zeros((1, S, E)),
  "uniform z = 5": jnp.full((1, S, E), 5.0),
  "collapsed z = 10 one_hot(e0)": 10.0 * collapsed_P,
  "the hand logits above": logits_GSE,
}
show(
  ["logits", "z-loss", "p_t of t0"],
  [
    [name, float(losses.router_z_loss(z)),
     str(np.round(np.asarray(routing.router_probabilities(z)[0, 0]), 3))]
    for name, z in cases.items()
  ],
)
print(f"(ln 4)^2 = {np.log(4) ** 2:.3f}; "
      f"(5 + ln 4)^2 = {(5 + np.log(4)) ** 2:.3f}")""",
  ),
  (
    "markdown",
    """In the model, `moe_jax.layers.MoeLayer` makes exactly these calls:
`route_tokens` on the router's logits, `dispatch`, the experts, `combine`,
and it sows the balancing loss and the z-loss (unweighted) for the trainer to
weight once. `02_inspect_a_run.ipynb` looks at what a trained router does.""",
  ),
]

# ---------------------------------------------------------------------------
# 02_inspect_a_run.ipynb

INSPECT_A_RUN = [
  (
    "markdown",
    """# Inspect a run

Trains a tiny Switch top-1 run (`configs/switch_top1.py`, shrunk to about a
minute on two CPU cores), or opens one of yours, then:

1. plots the loss curves and each MoE layer's expert load from
   `metrics.jsonl`;
2. restores the final checkpoint and routes the fixed validation batches;
3. measures whether routing depends on the domain (code vs prose) and on the
   token id, each next to a chance reference.

Experts are not specialists by design. Any specialisation comes out of
training, and finite samples produce some dependence by chance, so every
number below is printed next to what chance gives on the same tokens.""",
  ),
  (
    "code",
    """# Parameters. To inspect your own run, set WORKDIR to its --workdir: a
# directory that holds metrics.jsonl is read as it is, with its own
# config.json; an empty or missing one receives the tiny run.
WORKDIR = ""  # "" = a new temporary directory
NUM_STEPS = 150  # steps of the tiny run (unused for an existing run)
DATA_DIR = ""  # tiny run's data.data_dir; "" = ~/.cache/moe_jax/...
NUM_PERMUTATIONS = 200  # shuffles behind each chance reference
SEED = 0""",
  ),
  (
    "code",
    """import json
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
  \"\"\"Prints rows under a header, aligned; floats to 3 places.\"\"\"
  text = [[str(h) for h in header]]
  for row in rows:
    text.append(
      [f"{v:.3f}" if isinstance(v, (float, np.floating)) else str(v)
       for v in row]
    )
  widths = [max(len(row[i]) for row in text) for i in range(len(header))]
  for row in text:
    print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))""",
  ),
  (
    "markdown",
    """## The run

The tiny run keeps everything of `switch_top1` (8 experts in every other
block, top-1, capacity factor 1.25/2.0, α = 1e-2) except its size: d_model 64,
sequences of 64 bytes, 16 per batch. It uses the embedded corpus with its
default code cap, whose validation split holds both code and prose.""",
  ),
  (
    "code",
    """WORKDIR = WORKDIR or tempfile.mkdtemp(prefix="moe_jax_tiny_")
if not os.path.exists(os.path.join(WORKDIR, writers.METRICS_FILE)):
  if not (CONFIGS / "switch_top1.py").exists():
    raise FileNotFoundError(
      f"{CONFIGS / 'switch_top1.py'} not found: the tiny run needs moe_jax "
      "installed from its repository (pip install -e .)")
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
print("run directory:", WORKDIR)""",
  ),
  (
    "markdown",
    """## Loss and expert load during training

Left: the language-model loss on training batches and on the validation
batches, with the unigram baseline a model must beat. Right: each MoE layer's
expert load f_e (the share of first choices per expert, before capacity) on
training batches; the dashed line is the uniform load 1/E.""",
  ),
  (
    "code",
    """rows = writers.read_metrics(WORKDIR)
moe_layers = sorted({
  key.split("/")[2] for row in rows for key in row
  if key.startswith("train/moe/") and key.endswith("/expert_fraction")
})
fig, axes = plt.subplots(
  1, 1 + len(moe_layers), figsize=(5 * (1 + len(moe_layers)), 3.5),
  squeeze=False,
)
ax = axes[0, 0]
for key in ("train/lm_loss", "eval/lm_loss"):
  steps, values = plotting.series(rows, key)
  ax.plot(steps, values, marker="o" if key.startswith("eval") else None,
          label=key)
_, baseline = plotting.series(rows, "eval/unigram_baseline")
if len(baseline):
  ax.axhline(baseline[-1], color="gray", linestyle="--",
             label="unigram baseline")
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
plt.show()""",
  ),
  (
    "markdown",
    """## Restore the final checkpoint and route the validation batches

`analysis.routing_decisions` runs the model deterministically (eval capacity
factor, padding excluded) and returns each MoE layer's `expert_index`,
`gates` and `kept` as `[B, L, K]`. The analysis below uses the first choice
of the real tokens. The last two checkpoints kept are restored; opening the
checkpoint folder of a run that is still saving can disturb that save, so
inspect finished runs.""",
  ),
  (
    "code",
    """model_config = TransformerConfig.from_config(config, data.VOCAB_SIZE)
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
states = {step: checkpointer.restore(template, step)[0]
          for step in saved_steps[-2:]}
checkpointer.close()
final_step = saved_steps[-1]


def route_all(params):
  \"\"\"First choices [N_batches * B, L] per MoE layer over eval_batches.\"\"\"
  decisions = [analysis.routing_decisions(params, model, b)
               for b in eval_batches]
  return {layer: np.concatenate([d[layer]["expert_index"] for d in decisions])
          for layer in decisions[0]}


expert_index = route_all(states[final_step].params)
layers = sorted(expert_index)
inputs_BL, mask_BL, domain_B = (
  np.concatenate([b[k] for b in eval_batches])
  for k in ("inputs", "mask", "domain")
)
E = config.model.moe.num_experts
present = [d for d in range(len(data.DOMAINS)) if np.any(domain_B == d)]
print(f"checkpoint of step {final_step}; MoE layers {layers}; "
      f"{len(domain_B)} validation sequences, {int(mask_BL.sum())} real tokens")
print("sequences per domain:",
      {data.DOMAINS[d]: int(np.sum(domain_B == d)) for d in present})""",
  ),
  (
    "markdown",
    """## Does routing depend on the domain?

For each MoE layer: the share of each domain's tokens that go to each expert,
the usage entropy H(f)/log E of each domain's load (1 = spread evenly; ST-MoE
Table 14 reports this per token class), and the mutual information
I(domain; expert) next to two chance references from
`analysis.permutation_baseline`: the domain labels shuffled across tokens,
and shuffled across whole sequences.""",
  ),
  (
    "code",
    """R = len(data.DOMAINS)
if not layers or len(present) < 2:
  print("Skipped: this needs MoE layers and validation batches from at least "
        "two domains (TFDS corpora carry no domain).")
else:
  fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 2.5),
                           squeeze=False)
  for ax, layer in zip(axes[0], layers):
    counts_RE = analysis.expert_by_label(
      expert_index[layer], domain_B, mask_BL, E, R)
    share_RE = counts_RE / np.maximum(counts_RE.sum(1, keepdims=True), 1)
    entropy_R = analysis.usage_entropy(counts_RE)
    print(f"\\n{layer}: share of each domain's tokens per expert")
    show(
      ["domain", "tokens"] + [f"e{e}" for e in range(E)] + ["H(f)/log E"],
      [[data.DOMAINS[d], int(counts_RE[d].sum()), *share_RE[d], entropy_R[d]]
       for d in present],
    )
    mi = analysis.mutual_information(counts_RE)
    nmi = analysis.normalized_mutual_information(counts_RE)
    tests = {
      shuffle: analysis.permutation_baseline(
        expert_index[layer], domain_B, mask_BL, E, R, NUM_PERMUTATIONS, SEED,
        shuffle=shuffle)
      for shuffle in ("tokens", "sequences")
    }
    print(f"{layer}: I(domain; expert) = {mi:.4f} nats "
          f"(I / H(domain) = {nmi:.3f})")
    for shuffle, test in tests.items():
      print(f"  domains shuffled across {shuffle}: {test.chance_mean:.4f} "
            f"+- {test.chance_std:.4f} nats, p = {test.p_value:.3f}")
    image = ax.imshow(share_RE[present], vmin=0, aspect="auto")
    fig.colorbar(image, ax=ax, label="share of the domain")
    ax.set(title=f"{layer}: share per expert", xlabel="expert",
           yticks=range(len(present)),
           yticklabels=[data.DOMAINS[d] for d in present])
  plt.show()
  p_R = counts_RE.sum(1)[present] / counts_RE.sum()
  h_domain = float(-np.sum(p_R * np.log(p_R)))
  print(
    "\\nHow to read: I(domain; expert) is 0 when the expert choice says "
    "nothing about the domain, and reaches H(domain) = "
    f"{h_domain:.3f} nats when each expert sees a single domain; "
    "I / H(domain) is the share explained. The shuffled "
    "values are what these same tokens give with the link between domain "
    "and expert broken. An observed I within a few standard deviations of "
    "them, or a large p, is no evidence that routing depends on the domain. "
    "Tokens of one sequence share its domain and context, so the "
    "sequence shuffle is the fairer reference; p cannot fall below "
    f"1 / (1 + NUM_PERMUTATIONS) = {1 / (1 + NUM_PERMUTATIONS):.4f}.")""",
  ),
  (
    "markdown",
    """## Does routing depend on the token id?

OpenMoE (Xue 2024) reports that routing is mostly decided by the token id.
`analysis.token_id_purity` is the share of each id's occurrences that go to
that id's most frequent expert, averaged with weight by frequency: 1 when
the id alone decides. Routing that ignores the id scores about the largest
expert load for frequent ids but 1 for ids seen once, so the reference is the
same statistic with the first choices shuffled across tokens (same loads,
same id frequencies).""",
  ),
  (
    "code",
    """for layer in layers:
  test = analysis.token_id_purity_baseline(
    expert_index[layer], inputs_BL, mask_BL, E, data.VOCAB_SIZE,
    NUM_PERMUTATIONS, SEED)
  print(f"{layer}: token-id purity = {test.observed:.3f}; routing that "
        f"ignores the id: {test.chance_mean:.3f} +- {test.chance_std:.3f}, "
        f"p = {test.p_value:.3f} (1/E = {1 / E:.3f})")
print(
  "\\nHow to read: purity is 1 when the token id alone decides the first "
  "choice. A value close to the shuffled one means the id tells little "
  "about the expert beyond chance; the gap between them is the part of the "
  "routing that follows the id.")""",
  ),
  (
    "markdown",
    """## Did routing change between the last two checkpoints?

`analysis.routing_agreement` is the share of validation tokens whose first
choice is the same under two checkpoints of the run (OpenMoE: routing is
fixed early in training). Two independent routings with these loads would
agree on `chance_agreement` of the tokens.""",
  ),
  (
    "code",
    """if len(states) < 2:
  print("Only one checkpoint is kept; nothing to compare.")
else:
  first_step = min(states)
  earlier = route_all(states[first_step].params)
  for layer in layers:
    agree = analysis.routing_agreement(
      earlier[layer], expert_index[layer], mask_BL)
    chance = analysis.chance_agreement(
      earlier[layer], expert_index[layer], mask_BL, E)
    print(f"{layer}: step {first_step} vs {final_step}: agreement = "
          f"{agree:.3f}, independent routings: {chance:.3f}")
  print(
    "\\nHow to read: 1 means the later checkpoint routes every token as the "
    "earlier one did; a value near the independent one means the routing "
    "was reshuffled in between.")""",
  ),
]


def build(cells, path: Path, prefix: str, parameters: bool = False):
  """Writes `cells` [(kind, source)] to `path` as an output-free notebook;
  with `parameters`, tags the first code cell as papermill does."""
  notebook = v4.new_notebook()
  notebook.metadata["kernelspec"] = {
    "name": "python3",
    "display_name": "Python 3",
    "language": "python",
  }
  notebook.metadata["language_info"] = {"name": "python"}
  for number, (kind, source) in enumerate(cells):
    make = v4.new_markdown_cell if kind == "markdown" else v4.new_code_cell
    cell = make(source, id=f"{prefix}-{number:02d}")
    notebook.cells.append(cell)
  if parameters:
    first_code = next(c for c in notebook.cells if c.cell_type == "code")
    first_code.metadata["tags"] = ["parameters"]
  nbformat.validate(notebook)
  nbformat.write(notebook, path)


def main():
  build(ROUTING_BY_HAND, HERE / "01_routing_by_hand.ipynb", "routing")
  build(INSPECT_A_RUN, HERE / "02_inspect_a_run.ipynb", "inspect", True)


if __name__ == "__main__":
  main()
