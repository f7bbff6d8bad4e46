"""Measuring what routers learned: specialisation, purity, agreement.

Shapes (see `moe_jax.shapes`): routing decisions `[B, L, K]` as the MoE
layers sow them into `intermediates`, token masks `[B, L]` (> 0 = real
token), labels `[B]` (one per sequence, e.g. its domain) or `[B, L]`.

Experts are not specialists by design: any specialisation emerged from
training, and finite samples mislead (a plug-in mutual information is > 0 for
independent variables, about (R - 1)(E - 1) / 2N nats for an R x E table of N
tokens; an id seen once is always "pure"). So each measure has a chance
reference (`permutation_baseline`, `token_id_purity_baseline`,
`chance_agreement`); report the two side by side.

An expert choice is the router's first choice (rank 0 of `expert_index`),
before capacity, like f in the balancing losses; pass `mask & kept[..., 0]`
to count only dispatched tokens. Only real tokens count; logs are natural.
"""

import functools
from typing import NamedTuple

import jax
import numpy as np


class PermutationTest(NamedTuple):
  """A statistic of the data (`observed`), its mean and std over shuffled
  copies (the chance level), and p = (1 + #{shuffled >= observed}) /
  (1 + number of shuffles)."""

  observed: float
  chance_mean: float
  chance_std: float
  p_value: float


def routing_decisions(
  params, model, batch, router_state=None
) -> dict[str, dict[str, np.ndarray]]:
  """Runs `model` deterministically on `batch` and returns its routing.

  `model` is a `TransformerLM`, `batch` holds `inputs` and `mask` `[B, L]`.
  Returns {block name ("layer_01", as in the metric keys): {"expert_index",
  "gates", "kept"}} for every MoE layer, NumPy `[B, L, K]` each, at the eval
  capacity factor with padded tokens taking no slot, as in `eval_step`.
  Compiled once per model and batch shape (flax modules hash by config).
  Pass `router_state` (the train state's) for the DeepSeek router.
  """
  sown = _sown_routing(
    params, router_state or {}, model, batch["inputs"], batch["mask"]
  )
  return jax.tree.map(np.asarray, sown)


@functools.partial(jax.jit, static_argnums=2)
def _sown_routing(params, router_state, model, inputs_BL, mask_BL):
  variables = {"params": params}
  if router_state:  # the DeepSeek bias (`TrainState.router_state`)
    variables["router_state"] = router_state
  _, state = model.apply(
    variables,
    inputs_BL,
    mask_BL > 0,
    deterministic=True,
    mutable=["intermediates"],
  )
  return {  # the decisions only (the layer also sows its router logits)
    block: {k: modules["moe"][k][0] for k in ("expert_index", "gates", "kept")}
    for block, modules in sorted(state["intermediates"].items())
    if "moe" in modules
  }


def _check_range(name, values_N, bound):
  if values_N.size and (values_N.min() < 0 or values_N.max() >= bound):
    raise ValueError(
      f"{name} holds values in [{values_N.min()}, {values_N.max()}] on real "
      f"tokens; allowed: 0 .. {bound - 1}."
    )


def _first_choices(expert_index, mask, num_experts):
  """The real tokens' first choices, flat `[N]`, and the bool mask `[B, L]`."""
  index_BL = np.asarray(expert_index)
  index_BL = index_BL[..., 0] if index_BL.ndim == 3 else index_BL
  mask_BL = np.asarray(mask) > 0
  if index_BL.shape != mask_BL.shape:
    raise ValueError(
      f"expert_index {index_BL.shape} (first choices) and mask "
      f"{mask_BL.shape} must both be [B, L]."
    )
  expert_N = index_BL[mask_BL].astype(np.int64)
  _check_range("expert_index", expert_N, num_experts)
  return expert_N, mask_BL


def _per_token(name, labels, mask_BL, num_labels):
  """Labels `[B]` (broadcast along L) or `[B, L]` of the real tokens, `[N]`."""
  labels = np.asarray(labels)
  labels = labels[:, None] if labels.ndim == 1 else labels
  labels_N = np.broadcast_to(labels, mask_BL.shape)[mask_BL].astype(np.int64)
  _check_range(name, labels_N, num_labels)
  return labels_N


def _table(rows_N, cols_N, num_rows, num_cols):
  flat = np.bincount(rows_N * num_cols + cols_N, minlength=num_rows * num_cols)
  return flat.reshape(num_rows, num_cols)


def expert_by_label(expert_index, labels, mask, num_experts, num_labels):
  """int64 `[R, E]`: counts[l, e] = real tokens of label l whose first
  choice is e. expert_index `[B, L, K]` (rank 0 used) or `[B, L]`; labels
  `[B]` (broadcast along L, e.g. the domain) or `[B, L]`, in 0 .. R - 1 with
  R = num_labels; mask `[B, L]`, > 0 for real tokens."""
  expert_N, mask_BL = _first_choices(expert_index, mask, num_experts)
  labels_N = _per_token("labels", labels, mask_BL, num_labels)
  return _table(labels_N, expert_N, num_labels, num_experts)


def _joint(counts):
  counts = np.asarray(counts, np.float64)
  if counts.ndim != 2 or (counts < 0).any() or counts.sum() <= 0:
    raise ValueError(
      f"counts must be a non-negative 2-d table with a positive total; got "
      f"shape {counts.shape}, total {counts.sum()}."
    )
  return counts / counts.sum()


def mutual_information(counts) -> float:
  """I(label; expert) in nats, the plug-in estimate from a table `[R, E]`:

    I = sum_{l,e} p(l,e) log(p(l,e) / (p(l) p(e))),  p = counts / N,

  with 0 log 0 = 0. It is 0 iff the table factorises and at most
  min(H(label), H(expert)). Biased upwards on finite samples: compare with
  `permutation_baseline`.
  """
  p_RE = _joint(counts)
  outer_RE = p_RE.sum(1, keepdims=True) * p_RE.sum(0, keepdims=True)
  nz = p_RE > 0
  mi = np.sum(p_RE[nz] * np.log(p_RE[nz] / outer_RE[nz]))
  return float(max(mi, 0.0))  # rounding can give -1e-17


def normalized_mutual_information(counts) -> float:
  """I(label; expert) / H(label), in [0, 1].

  The share of the label's entropy the expert choice explains: 1 iff each
  expert sees one label only, 0 iff independent. NaN when H(label) = 0 (a
  single label: nothing to explain).
  """
  p_R = _joint(counts).sum(1)
  h_label = float(-np.sum(p_R[p_R > 0] * np.log(p_R[p_R > 0])))
  return mutual_information(counts) / h_label if h_label > 0 else float("nan")


def _test(observed, chance) -> PermutationTest:
  chance = np.asarray(chance, np.float64)
  p_value = (1 + np.sum(chance >= observed)) / (1 + len(chance))
  return PermutationTest(
    float(observed), float(chance.mean()), float(chance.std()), float(p_value)
  )


def permutation_baseline(
  expert_index,
  labels,
  mask,
  num_experts,
  num_labels,
  num_permutations=100,
  seed=0,
  shuffle="tokens",
) -> PermutationTest:
  """I(label; expert) of the data against the same with labels shuffled.

  Shuffling keeps both marginals (label frequencies, expert loads) and breaks
  only their link, so chance_mean is the MI that finite-sample noise alone
  gives; an observed MI near it is no evidence of specialisation.

  Arguments as in `expert_by_label`. shuffle="tokens" permutes the labels
  across all real tokens; "sequences" permutes per-sequence labels (`[B]`)
  across sequences. A sequence's tokens share their context and are not
  independent draws, so "sequences" is the more conservative reference for
  a per-sequence label such as the domain. Returns a `PermutationTest` of
  the MI in nats over `num_permutations` shuffles drawn from `seed`.
  """
  if shuffle not in ("tokens", "sequences"):
    raise ValueError(f"shuffle={shuffle!r}; allowed: 'tokens', 'sequences'.")
  expert_N, mask_BL = _first_choices(expert_index, mask, num_experts)
  labels = np.asarray(labels)
  if shuffle == "sequences" and labels.shape != mask_BL.shape[:1]:
    raise ValueError(
      f"shuffle='sequences' needs one label per sequence, shape "
      f"{mask_BL.shape[:1]}; got {labels.shape}."
    )
  labels_N = _per_token("labels", labels, mask_BL, num_labels)
  rng = np.random.default_rng(seed)

  def mi(labels_N):
    table = _table(labels_N, expert_N, num_labels, num_experts)
    return mutual_information(table)

  def shuffled():
    if shuffle == "tokens":
      return rng.permutation(labels_N)
    return _per_token("labels", rng.permutation(labels), mask_BL, num_labels)

  chance = [mi(shuffled()) for _ in range(num_permutations)]
  return _test(mi(labels_N), chance)


def _purity(token_N, expert_N, vocab_size, num_experts):
  counts_VE = _table(token_N, expert_N, vocab_size, num_experts)
  return float(counts_VE.max(axis=1).sum() / max(len(token_N), 1))


def token_id_purity(expert_index, token_ids, mask, num_experts, vocab_size):
  """How far the first choice is a function of the token id (OpenMoE):

    purity = sum_v n_v (max_e c_{v,e} / n_v) / N = sum_v max_e c_{v,e} / N,

  c_{v,e} = real tokens with id v whose first choice is e, n_v = sum_e
  c_{v,e}, N = sum_v n_v: the share of an id's occurrences that go to its
  most frequent expert, averaged with weight n_v. 1 when routing depends on
  the id alone; near the largest expert load (1/E if balanced) when it
  ignores the id, but only for frequent ids: an id seen once is pure by
  definition. Compare with `token_id_purity_baseline`. token_ids `[B, L]`
  are the routed tokens (the model's inputs), in 0 .. vocab_size - 1.
  """
  expert_N, mask_BL = _first_choices(expert_index, mask, num_experts)
  token_N = _per_token("token_ids", token_ids, mask_BL, vocab_size)
  return _purity(token_N, expert_N, vocab_size, num_experts)


def token_id_purity_baseline(
  expert_index,
  token_ids,
  mask,
  num_experts,
  vocab_size,
  num_permutations=20,
  seed=0,
) -> PermutationTest:
  """Token-id purity against routing that ignores the id.

  The chance level shuffles the first choices across the real tokens, which
  keeps each id's frequency and each expert's load.
  """
  expert_N, mask_BL = _first_choices(expert_index, mask, num_experts)
  token_N = _per_token("token_ids", token_ids, mask_BL, vocab_size)
  rng = np.random.default_rng(seed)
  chance = [
    _purity(token_N, rng.permutation(expert_N), vocab_size, num_experts)
    for _ in range(num_permutations)
  ]
  return _test(_purity(token_N, expert_N, vocab_size, num_experts), chance)


def usage_entropy(counts_E):
  """Normalised usage entropy H(f) / log E, f = counts / sum(counts).

  1 for a uniform load, 0 when one expert takes every token (REFERENCE (f);
  ST-MoE Table 14 reports H(f) per token class). Reduces the last axis, so
  an `expert_by_label` table gives one value per label; NaN for a row
  without counts.
  """
  counts_E = np.asarray(counts_E, np.float64)
  if counts_E.shape[-1] < 2:
    raise ValueError(f"usage_entropy needs >= 2 experts; got {counts_E.shape}.")
  total = counts_E.sum(-1, keepdims=True)
  f_E = counts_E / np.where(total > 0, total, 1.0)
  h = -np.sum(f_E * np.log(np.where(f_E > 0, f_E, 1.0)), axis=-1)
  h = np.where(total[..., 0] > 0, h / np.log(counts_E.shape[-1]), np.nan)
  return float(h) if h.ndim == 0 else h


def routing_agreement(expert_index_a, expert_index_b, mask) -> float:
  """Share of real tokens whose first choice is the same in a and b.

  Meaningful between checkpoints of one run (expert e keeps its identity);
  runs from different seeds number their experts arbitrarily: match experts
  first. Compare with `chance_agreement`."""
  any_expert = np.iinfo(np.int64).max
  a_N, _ = _first_choices(expert_index_a, mask, any_expert)
  b_N, _ = _first_choices(expert_index_b, mask, any_expert)
  return float(np.mean(a_N == b_N)) if len(a_N) else float("nan")


def chance_agreement(expert_index_a, expert_index_b, mask, num_experts):
  """sum_e f_a(e) f_b(e): the expected agreement of two independent routings
  with the observed first-choice loads f_a, f_b (1/E when either is
  balanced)."""
  a_N, _ = _first_choices(expert_index_a, mask, num_experts)
  b_N, _ = _first_choices(expert_index_b, mask, num_experts)
  f_a = np.bincount(a_N, minlength=num_experts) / max(len(a_N), 1)
  f_b = np.bincount(b_N, minlength=num_experts) / max(len(b_N), 1)
  return float(np.sum(f_a * f_b))
