# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Routing by hand
#
# The routing math of `moe_jax` without a model: one group of S = 8 tokens and
# E = 4 experts, every tensor small enough to read. Each step is a pure function
# of `moe_jax.routing`, `moe_jax.dispatch` or `moe_jax.losses`, the same calls
# the `MoeLayer` makes. Shapes follow `moe_jax.shapes`: logits `[G, S, E]`,
# choices `[G, S, K]`, dispatch/combine tensors `[G, S, E, C]`, expert buffers
# `[E, G, C, D]`.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from moe_jax import dispatch, losses, routing


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
# ## 1. Router probabilities
#
# A router is a linear map of each token, z_t = x_t W_r, kept in float32
# (Switch, Fedus 2021, §2.4). Here we write the logits z down directly. Every
# scheme below starts from p_t = softmax(z_t) over all E experts (Switch Eq. 1).
# Token t5 has no preference at all: `jax.lax.top_k` breaks the tie towards the
# lower expert index.

# %%
E, S = 4, 8
logits_GSE = jnp.array(
  [
    [
      [2.0, 1.0, 0.0, -1.0],  # t0: clearly e0
      [1.9, 1.8, 0.0, 0.0],  # t1: e0 by a hair over e1
      [2.2, 0.0, 1.0, 0.0],  # t2: e0, then e2
      [0.0, 2.0, 1.9, 0.0],  # t3: e1, e2 close behind
      [1.5, 0.0, 0.0, 1.4],  # t4: e0, then e3
      [0.0, 0.0, 0.0, 0.0],  # t5: no preference
      [2.5, 0.0, 0.0, 2.0],  # t6: e0, then e3
      [0.0, 0.5, 0.0, 3.0],  # t7: e3
    ]
  ]
)
probs_GSE = routing.router_probabilities(logits_GSE)
show(
  ["token"] + [f"p(e{e})" for e in range(E)] + ["argmax"],
  [
    [f"t{t}", *np.asarray(probs_GSE[0, t]), int(jnp.argmax(probs_GSE[0, t]))]
    for t in range(S)
  ],
)

# %% [markdown]
# ## 2. Gates: Switch top-1 vs GShard top-2
#
# * **Switch** (Fedus 2021, Eq. 2): one expert e* = argmax p_t, combine weight
#   g = p_{t,e*}, the raw probability. It is below 1 and is the router's only
#   gradient from the task loss.
# * **GShard** (Lepikhin 2020, Alg. 1, line 5): the top two experts, weights
#   renormalised g_i = p_i / (p_1 + p_2), so they sum to 1 and g_2 <= 1/2.
# * **Mixtral** (a softmax over the K largest logits) gives the same numbers as
#   GShard's renormalisation, computed in another order.

# %%
choices = {}
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
      f"t{t}",
      int(switch_e[0, t, 0]),
      float(switch_g[0, t, 0]),
      int(gshard_e[0, t, 0]),
      float(gshard_g[0, t, 0]),
      int(gshard_e[0, t, 1]),
      float(gshard_g[0, t, 1]),
      float(gshard_g[0, t].sum()),
    ]
    for t in range(S)
  ],
)
same = jnp.allclose(mixtral_g, gshard_g) & (mixtral_e == gshard_e).all()
print("mixtral weights == gshard weights:", bool(same))

# %% [markdown]
# ## 3. Capacity: slots per expert per group
#
# An expert takes at most C tokens of a group; the rest of its tokens are
# dropped. Codebases disagree on C (`routing.CAPACITY_RULES`):
#
# * Switch Eq. 3: C = ceil(S / E · CF), with no factor K.
# * GShard §2.2: C = 2S/E for top-2, i.e. ceil(K · S · CF / E) (Megatron-LM
#   uses the same formula).
# * flaxformer rounds instead of ceiling; vmoe rounds up to a multiple of 4.
#
# A `min_capacity` (4 in the Switch and flaxformer gin files) then clamps C from
# below; it is 0 here so that the formulas show. "round" is Python's, which
# rounds halves to even: round(2.5) = 2. The second table uses the default
# layer of `configs/base.py` (S = 512, E = 8).

# %%
settings = [(1, 1.0), (1, 1.25), (2, 1.25), (2, 2.0)]
for group_size, num_experts in [(S, E), (512, 8)]:
  print(f"\nC for S = {group_size}, E = {num_experts}:")
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
  )

# %% [markdown]
# ## 4. Who gets dropped: the priority order
#
# GShard top-2 gates with C = 2 slots per expert: 16 choices for 8 slots, and
# 6 of the 8 first choices want e0, so capacity must drop some. `assign_slots`
# walks the (token, choice) pairs in a priority order, each pair taking the
# next slot of its expert while one is free (GShard Alg. 1: the counter also
# advances on overflow):
#
# * **k_major** (GShard Alg. 1; Switch, flaxformer, vmoe): every first choice in
#   token order, then every second choice.
# * **token_major** (MaxText): token 0's two choices, then token 1's, ...
# * **batch_priority** (V-MoE, Riquelme 2021 §3.1; ST-MoE App. D): k-major over
#   the tokens sorted by their top-1 probability, most confident first.
#
# In the grids `1`/`2` mark a kept first/second choice, `x1`/`x2` a dropped one,
# and `.` an expert the token did not choose. k-major at K >= 2 and batch
# priority let later tokens decide whether an earlier one is dropped, so they
# leak the future in a decoder (REFERENCE (i)).

# %%
capacity = 2
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
  print(
    f"\n{priority}: {int(route.kept_GSK.sum())} of {2 * S} choices kept;"
    f" tokens with no expert left: {lost or 'none'}"
  )
  show(
    ["token"] + [f"e{e}" for e in range(E)],
    [[f"t{t}"] + grid[t] for t in range(S)],
  )

order = np.argsort(-np.asarray(probs_GSE[0].max(-1)), stable=True)
print(
  "\nbatch_priority visits the tokens in the order", [f"t{t}" for t in order]
)

# %% [markdown]
# ## 5. Dispatch and combine: three backends, one result
#
# * **einsum** (GShard Alg. 2, §2.2; Switch): a one-hot dispatch tensor
#   `dispatch[g, s, e, c] = 1` iff token s sits in slot c of expert e, and
#   `combine = dispatch · g`. Faithful to the papers, but O(G·S·E·C).
# * **indices**: gather each kept pair's token into slot (e, g, position) of
#   the `[E, G, C, D]` buffers and gather it back, O(G·S·K·D) memory.
# * **dropless**: sort the kept pairs by expert into rows `[N, D]` for one
#   grouped matmul (MegaBlocks). The `MoeLayer` routes it with capacity S, so
#   nothing is dropped; given this routing it moves the same pairs.
#
# The toy experts below multiply their tokens by e + 1, so token t's output is
# (sum over its kept pairs of g_k · (e_k + 1)) · x_t, and exactly 0 for a token
# that lost every expert.

# %%
route = routes["k_major"]
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

# %% [markdown]
# The same two tensors as pictures, the `[S, E, C]` block of the one group
# with the slots of each expert side by side. Each column holds at most one
# token (a slot takes one token) and each row at most K = 2 marks (a token
# takes at most two slots); a row without any mark is a token that lost every
# expert. Both panels share one colour scale from 0 to 1.


# %%
def slot_image(x_SEC):
  """[S, E, C] -> [S, E * C]: the slots of expert e in columns e*C ... ."""
  return np.asarray(x_SEC).reshape(x_SEC.shape[0], -1)


fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
panels = [
  (dispatch_GSEC[0], "dispatch[t, e, c]\n1 iff token t sits in slot c of e"),
  (combine_GSEC[0], "combine[t, e, c]\n= dispatch[t, e, c] · gate of (t, e)"),
]
for ax, (x_SEC, title) in zip(axes, panels):
  image = ax.imshow(slot_image(x_SEC), vmin=0, vmax=1, cmap="viridis")
  for t, column in zip(*np.nonzero(slot_image(x_SEC))):
    ax.text(
      column,
      t,
      f"{slot_image(x_SEC)[t, column]:.2f}",
      ha="center",
      va="center",
      fontsize=7,
      color="black",
    )
  for e in range(1, E):
    ax.axvline(e * capacity - 0.5, color="white", linewidth=2)
  ax.set(
    title=title,
    xlabel="expert e / slot c",
    xticks=range(E * capacity),
    xticklabels=[f"e{e}/{c}" for e in range(E) for c in range(capacity)],
    yticks=range(S),
    yticklabels=[f"t{t}" for t in range(S)],
  )
  ax.tick_params(axis="x", labelsize=7)
axes[0].set_ylabel("token t")
fig.colorbar(image, ax=axes, label="weight (dimensionless)", shrink=0.8)
plt.show()

# %%
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
  print(
    f"einsum and {backend} backends agree: max |difference| = {difference:.1e}"
  )

# By hand: sum over the kept pairs of g_k (e_k + 1), times x_t.
factor_S = np.sum(
  np.asarray(route.gates_GSK[0]) * (np.asarray(route.expert_index_GSK[0]) + 1),
  axis=-1,
)
by_hand_GSD = factor_S[None, :, None] * np.asarray(x_GSD)
print(
  "matches the hand formula:",
  bool(np.allclose(outputs["indices"], by_hand_GSD, atol=1e-6)),
)
print("output factor y_t / x_t per token:", np.round(factor_S, 3))

# %% [markdown]
# ## 6. Balancing losses and the z-loss
#
# With f_e a dispatch fraction (counted before capacity) and P_e the mean router
# probability of expert e (`losses.LOAD_BALANCING_LOSSES`):
#
# * **switch** (Fedus 2021, Eqs. 4-6): E · Σ_e f_e P_e, f over first choices.
# * **gshard** (Lepikhin 2020, Alg. 1): (1/E) Σ_e (c_e / S) m_e, the Switch
#   loss divided by E².
# * **all_choices** (flaxformer; ST-MoE App. A): E · Σ_e f_e P_e, f over all K
#   choices, so Σ f = K.
# * **k_normalized** (Megatron-LM; DeepSeek's f_i): the all-choices loss / K.
#
# The losses take P and the choices separately, so we build the two extremes by
# hand. *Balanced*: P uniform, first choices cycling over the experts (2 tokens
# each), second choice the next expert. *Collapsed*: all probability on e0,
# every first choice e0, every second choice e1. The last column is the value
# at perfect balance that each docstring states.

# %%
t_S = np.arange(S)
balanced_P = jnp.full((1, S, E), 1.0 / E)
balanced_idx = jnp.asarray(np.stack([t_S % E, (t_S + 1) % E], -1)[None])
collapsed_P = jax.nn.one_hot(jnp.zeros((1, S), int), E)
collapsed_idx = jnp.asarray(np.tile([0, 1], (1, S, 1)))
at_balance = {
  "switch": "1",
  "gshard": "1/E^2 = 0.0625",
  "all_choices": "K",
  "k_normalized": "1",
}
rows = []
for name, loss_fn in losses.LOAD_BALANCING_LOSSES.items():
  row = [name]
  for k in (1, 2):
    row.append(float(loss_fn(balanced_P, balanced_idx[..., :k])))
    row.append(float(loss_fn(collapsed_P, collapsed_idx[..., :k])))
  rows.append(row + [at_balance[name]])
show(
  [
    "loss",
    "K=1 balanced",
    "collapsed",
    "K=2 balanced",
    "collapsed",
    "docstring",
  ],
  rows,
)

# %% [markdown]
# The **router z-loss** (ST-MoE, Zoph 2022, Eq. 5) is
# (1/T) Σ_t (logsumexp_e z_{t,e})², on the raw logits. It penalises their size,
# not imbalance: adding a constant to every logit leaves p, f and P, and so
# every balancing loss, unchanged, but raises the z-loss. ST-MoE weights it by
# 1e-3.

# %%
cases = {
  "uniform z = 0": jnp.zeros((1, S, E)),
  "uniform z = 5": jnp.full((1, S, E), 5.0),
  "collapsed z = 10 one_hot(e0)": 10.0 * collapsed_P,
  "the hand logits above": logits_GSE,
}
show(
  ["logits", "z-loss", "p_t of t0"],
  [
    [
      name,
      float(losses.router_z_loss(z)),
      str(np.round(np.asarray(routing.router_probabilities(z)[0, 0]), 3)),
    ]
    for name, z in cases.items()
  ],
)
print(
  f"(ln 4)^2 = {np.log(4) ** 2:.3f}; (5 + ln 4)^2 = {(5 + np.log(4)) ** 2:.3f}"
)

# %% [markdown]
# In the model, `moe_jax.layers.MoeLayer` makes exactly these calls:
# `route_tokens` on the router's logits, `dispatch`, the experts, `combine`,
# and it sows the balancing loss and the z-loss (unweighted) for the trainer to
# weight once. `02_inspect_a_run.ipynb` looks at what a trained router does.
