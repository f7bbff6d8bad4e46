"""Measuring what routers learned: specialisation, purity, agreement.

  python -m moe_jax.analysis --workdir=runs/switch [--step=N]
      [--num_permutations=100] [--seed=0] [--output_dir=DIR]

(or `analyze_run(workdir, step)`) routes a run's validation batches with
its checkpoints and writes <workdir>/analysis/report.md (the summary in
words, with its numbers), analysis.json (every number) and PNGs (expert x
domain and x token category, token vs context, drops and load by
position, how early routing settles). A bad workdir or step is one line,
`error: ...`, and exit status 2.

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

import argparse
import functools
import json
import keyword
import os
import re
import string
import sys
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging as absl_logging
from matplotlib.figure import Figure

from moe_jax import data, errors, models, train, writers
from moe_jax.checkpoint import Checkpointer
from moe_jax.data import tokenizer


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


# ---------------------------------------------------------------------------
# Token categories of the byte-level tokenizer.

CATEGORIES = (
  "letter",
  "digit",
  "whitespace",
  "punctuation",
  "non_ascii",
  "special",
  "keyword",
  "identifier",
)
"""Token categories (`token_categories`), in the order of their indices."""

_WORD = re.compile(rb"(?<![A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]*")
_KEYWORDS = frozenset(word.encode() for word in keyword.kwlist)


def _byte_class_table() -> np.ndarray:
  """int64 `[VOCAB_SIZE]`: the category of each token id by itself."""
  table = np.full(tokenizer.VOCAB_SIZE, CATEGORIES.index("special"), np.int64)
  for byte in range(256):
    char = chr(byte)
    if byte >= 0x80:
      name = "non_ascii"
    elif char in string.ascii_letters:
      name = "letter"
    elif char in string.digits:
      name = "digit"
    elif char in string.whitespace:
      name = "whitespace"
    elif char in string.punctuation:
      name = "punctuation"
    else:
      name = "special"  # the other control bytes
    table[byte + tokenizer.BYTE_OFFSET] = CATEGORIES.index(name)
  return table


_BYTE_CLASS = _byte_class_table()


def token_categories(inputs_BL, domain_B=None) -> np.ndarray:
  """int64 `[B, L]`: the index in `CATEGORIES` of each token.

  By the byte alone (`moe_jax.data.tokenizer`: id = byte + 3):
    letter       ASCII a-z, A-Z
    digit        0-9
    whitespace   space, \\t, \\n, \\r, \\v, \\f
    punctuation  the 32 ASCII punctuation characters (string.punctuation)
    non_ascii    bytes 0x80-0xff (pieces of multi-byte UTF-8 characters)
    special      PAD, BOS, EOS and the other control bytes
  and in sequences of the "code" domain (`domain_B`, indices into
  `data.DOMAINS`), by the word around the byte: every byte of a word, a
  maximal run of [A-Za-z0-9_] that starts with a letter or "_", is
    keyword      when the word is a Python keyword (keyword.kwlist)
    identifier   otherwise.
  Lexical only, no parser: words in comments and strings are identifiers,
  and a word cut by the window's edge is judged by its visible part.
  """
  inputs_BL = np.asarray(inputs_BL)
  if inputs_BL.ndim != 2:
    raise ValueError(f"inputs must be [B, L]; got shape {inputs_BL.shape}.")
  _check_range("inputs", inputs_BL.reshape(-1), tokenizer.VOCAB_SIZE)
  categories_BL = _BYTE_CLASS[inputs_BL]
  if domain_B is None:
    return categories_BL
  domain_B = np.asarray(domain_B)
  if domain_B.shape != inputs_BL.shape[:1]:
    raise ValueError(
      f"domain must be [B] = {inputs_BL.shape[:1]}; got {domain_B.shape}."
    )
  code = data.DOMAINS.index("code")
  keyword_id, identifier_id = (CATEGORIES.index(n) for n in CATEGORIES[6:])
  for b in np.flatnonzero(domain_B == code):
    ids_L = inputs_BL[b]
    # Specials become NUL, which no word holds.
    text = bytes(np.where(ids_L >= 3, ids_L - 3, 0).astype(np.uint8))
    for word in _WORD.finditer(text):
      is_keyword = word.group() in _KEYWORDS
      categories_BL[b, word.start() : word.end()] = (
        keyword_id if is_keyword else identifier_id
      )
  return categories_BL


# ---------------------------------------------------------------------------
# A run's analysis: `analyze_run` and `python -m moe_jax.analysis`.

ABOVE_CHANCE_Z = 3.0
ABOVE_CHANCE_P = 0.05
DOMINANCE_RATIO = 2.0
SPECIALIST_LIFT = 2.0
PREFERENCE_LIFT = 1.25
MIN_LABEL_TOKENS = 50
POSITION_DROP_GAP = 0.01
POSITION_DROP_RATIO = 1.25
SETTLED_AGREEMENT = 0.9


def _test_dict(test: PermutationTest) -> dict:
  return {k: float(v) for k, v in test._asdict().items()}


def above_chance(test: dict, num_permutations: int) -> bool:
  """The summary's rule for "above chance": observed >= chance_mean +
  ABOVE_CHANCE_Z x chance_std (> chance_mean when the std is 0), and
  p <= ABOVE_CHANCE_P (or p at its floor 1 / (1 + num_permutations) when
  fewer shuffles cannot reach it)."""
  margin = ABOVE_CHANCE_Z * test["chance_std"]
  z_ok = (
    test["observed"] >= test["chance_mean"] + margin
    if margin > 0
    else test["observed"] > test["chance_mean"]
  )
  p_floor = 1.0 / (1 + num_permutations)
  return z_ok and test["p_value"] <= max(ABOVE_CHANCE_P, p_floor) + 1e-12


def _load_run(workdir, step):
  """(config, model, saved steps, restore(step) -> state, eval batches)."""
  workdir = os.fspath(workdir)
  if not os.path.isdir(workdir):
    raise errors.ConfigError(f"--workdir={workdir} is not a directory.")
  config_path = os.path.join(workdir, writers.CONFIG_FILE)
  if not os.path.exists(config_path):
    raise errors.ConfigError(
      f"--workdir={workdir} holds no {writers.CONFIG_FILE}: not a run "
      "directory of python -m moe_jax.train."
    )
  with open(config_path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = (
    sorted(int(p) for p in os.listdir(ckpt_dir) if p.isdigit())
    if os.path.isdir(ckpt_dir)
    else []
  )
  if not steps:
    raise errors.ConfigError(
      f"--workdir={workdir} holds no checkpoint (no step folder in "
      f"{ckpt_dir}); train first."
    )
  if step is not None and step not in steps:
    raise errors.ConfigError(
      f"--step={step} has no checkpoint in {ckpt_dir}; saved steps are {steps}."
    )
  with errors.config_errors():
    model = models.TransformerLM(
      models.TransformerConfig.from_config(config, data.VOCAB_SIZE)
    )
    tx, _ = train.make_optimizer(config.optimizer, config.train.num_steps)
    eval_batches = data.create_eval_batches(config.data)
  template = jax.eval_shape(
    lambda: train.init_state(config, model, tx, eval_batches[0])
  )
  checkpointer = Checkpointer(
    ckpt_dir,
    max_to_keep=max(len(steps), 1),
    save_interval_steps=config.train.checkpoint_every,
  )

  def restore(s):
    return checkpointer.restore(template, s)[0]

  return config, model, checkpointer, restore, eval_batches


def _route(state, model, eval_batches):
  """{layer: {"expert_index", "kept"}}, each [N_B * B, L, K]."""
  decisions = [
    routing_decisions(state.params, model, batch, state.router_state)
    for batch in eval_batches
  ]
  return {
    layer: {
      k: np.concatenate([d[layer][k] for d in decisions])
      for k in ("expert_index", "kept")
    }
    for layer in decisions[0]
  }


def _label_table(expert_BLK, labels, mask_BL, E, names, n, seed, shuffle):
  counts = expert_by_label(expert_BLK, labels, mask_BL, E, len(names))
  test = permutation_baseline(
    expert_BLK, labels, mask_BL, E, len(names), n, seed, shuffle=shuffle
  )
  present = [i for i in range(len(names)) if counts[i].sum() > 0]
  return {
    "labels": [names[i] for i in present],
    "counts": counts[present].tolist(),
    "usage_entropy": [float(h) for h in usage_entropy(counts[present])],
    "mutual_information": _test_dict(test),
    "chance_shuffles": shuffle,
  }


def _by_position(expert_BLK, kept_BLK, mask_BL, E):
  real_BL = np.asarray(mask_BL) > 0
  tokens_L = real_BL.sum(0)
  first_kept_L = (kept_BLK[..., 0] & real_BL).sum(0)
  all_kept_L = (kept_BLK & real_BL[..., None]).sum((0, 2))
  K = kept_BLK.shape[-1]
  with np.errstate(invalid="ignore", divide="ignore"):
    drop_L = np.where(tokens_L > 0, 1 - first_kept_L / tokens_L, np.nan)
    drop_all_L = np.where(tokens_L > 0, 1 - all_kept_L / (K * tokens_L), np.nan)
  load_LE = np.zeros((real_BL.shape[1], E), np.int64)
  for l in range(real_BL.shape[1]):
    load_LE[l] = np.bincount(
      expert_BLK[real_BL[:, l], l, 0].astype(np.int64), minlength=E
    )
  return {
    "tokens": tokens_L.tolist(),
    "drop_rate_first_choice": [float(v) for v in drop_L],
    "drop_rate_all_choices": [float(v) for v in drop_all_L],
    "load_counts": load_LE.tolist(),
  }


def analyze_run(
  workdir,
  step: int | None = None,
  *,
  num_permutations: int = 100,
  seed: int = 0,
  output_dir=None,
  plots: bool = True,
) -> dict:
  """Measures what the routers of a trained run learned, on its validation
  batches (`data.create_eval_batches(config.data)`, as the trainer
  evaluates), and writes a report.

  For the checkpoint of `step` (default: the newest) and each MoE layer:

  * expert x domain and expert x token category (`token_categories`)
    tables of first choices, with I(label; expert) and its chance level
    (`permutation_baseline`; domains shuffled across whole sequences, the
    fair reference for a per-sequence label; categories across tokens);
  * token id: `token_id_purity` and I(token id; expert), each against
    shuffled routing, to tell routing by token from routing by context;
  * by position in the sequence: the drop rate of first choices and of all
    choices at the eval capacity factor, and the expert load. Capacity is
    decided within groups of model.moe.group_size tokens taken from the
    [B, L] batch in order, so what a position loses depends on the
    layer's drop priority and on where it falls in its group;
  * settling: `routing_agreement` of every other kept checkpoint with this
    one, next to `chance_agreement` (keep checkpoints with
    train.keep_checkpoint_steps).

  The plain-words summary (`summarize`) is generated from these numbers
  with the thresholds of this module: a measure is "above chance" by
  `above_chance` (z >= ABOVE_CHANCE_Z, p <= ABOVE_CHANCE_P); routing
  "follows token identity more than domain" when the excess I over chance
  of one is >= DOMINANCE_RATIO times the other's (both above chance);
  an expert is a "specialist" of a label (>= MIN_LABEL_TOKENS tokens) when
  P(expert | label) / P(expert) >= SPECIALIST_LIFT, shows a "preference"
  from PREFERENCE_LIFT; late tokens are "dropped more" when the last
  quarter of positions loses POSITION_DROP_GAP more of its first choices
  than the first quarter and POSITION_DROP_RATIO times as many; routing has
  "settled" at the first kept step from which every kept checkpoint agrees
  with the analysed one on >= SETTLED_AGREEMENT of the tokens.

  Args:
    workdir: a run directory of `python -m moe_jax.train`.
    step: the checkpoint to analyse; None = the newest.
    num_permutations: shuffles behind each chance level (>= 1).
    seed: of the shuffles.
    output_dir: where report.md, analysis.json and the PNGs go; default
      <workdir>/analysis.
    plots: write the PNGs (the figures are also `plot_*(result)`).

  Returns:
    The contents of analysis.json (see the README's "Analysis").

  Raises:
    errors.ConfigError: no such workdir, no config.json or checkpoint in
      it, no checkpoint of `step`, a model without MoE layers, or
      num_permutations < 1.
  """
  if (
    isinstance(num_permutations, bool)
    or not isinstance(num_permutations, int)
    or num_permutations < 1
  ):
    raise errors.ConfigError(
      f"num_permutations={num_permutations!r} must be an integer >= 1."
    )
  config, model, checkpointer, restore, eval_batches = _load_run(workdir, step)
  try:
    steps = checkpointer.all_steps()
    step = steps[-1] if step is None else step
    states = {s: restore(s) for s in steps}
  finally:
    checkpointer.close()
  routed = {s: _route(states[s], model, eval_batches) for s in steps}
  final = routed[step]
  if not final:
    raise errors.ConfigError(
      f"the model of {workdir} has no MoE layer: nothing to analyse."
    )
  inputs_BL, mask_BL, domain_B = (
    np.concatenate([b[k] for b in eval_batches])
    for k in ("inputs", "mask", "domain")
  )
  real_BL = mask_BL > 0
  has_domains = bool((domain_B >= 0).all())
  categories_BL = token_categories(inputs_BL, domain_B if has_domains else None)
  E = config.model.moe.num_experts
  n, V = num_permutations, data.VOCAB_SIZE
  result = {
    "workdir": os.path.abspath(os.fspath(workdir)),
    "step": step,
    "kept_steps": steps,
    "num_sequences": int(len(domain_B)),
    "num_real_tokens": int(real_BL.sum()),
    "num_experts": E,
    "num_permutations": n,
    "seed": seed,
    "layers": {},
  }
  for layer, decision in final.items():
    expert_BLK = decision["expert_index"]
    out = {}
    present = sorted({int(d) for d in domain_B}) if has_domains else []
    if len(present) >= 2:
      out["expert_by_domain"] = _label_table(
        expert_BLK, domain_B, mask_BL, E, data.DOMAINS, n, seed, "sequences"
      )
    out["expert_by_category"] = _label_table(
      expert_BLK, categories_BL, mask_BL, E, CATEGORIES, n, seed, "tokens"
    )
    out["token_id"] = {
      "purity": _test_dict(
        token_id_purity_baseline(expert_BLK, inputs_BL, mask_BL, E, V, n, seed)
      ),
      "mutual_information": _test_dict(
        permutation_baseline(expert_BLK, inputs_BL, mask_BL, E, V, n, seed)
      ),
    }
    out["position"] = _by_position(expert_BLK, decision["kept"], mask_BL, E)
    out["agreement"] = [
      {
        "step": s,
        "agreement": routing_agreement(
          routed[s][layer]["expert_index"], expert_BLK, mask_BL
        ),
        "chance": chance_agreement(
          routed[s][layer]["expert_index"], expert_BLK, mask_BL, E
        ),
      }
      for s in steps
      if s != step
    ]
    result["layers"][layer] = out
  result["summary"] = summarize(result)
  output_dir = os.fspath(output_dir or os.path.join(workdir, "analysis"))
  os.makedirs(output_dir, exist_ok=True)
  result["files"] = []
  if plots:
    for name, plot in PLOTS.items():
      fig = plot(result)
      if fig is not None:
        path = os.path.join(output_dir, f"{name}.png")
        fig.savefig(path, dpi=100)
        result["files"].append(os.path.basename(path))
  with open(os.path.join(output_dir, "analysis.json"), "w") as f:
    json.dump(result, f, indent=1, allow_nan=True)
  with open(os.path.join(output_dir, "report.md"), "w") as f:
    f.write(report_markdown(result))
  return result


# ---------------------------------------------------------------------------
# The summary in words.


def _mi_words(test, n):
  return (
    f"I = {test['observed']:.4f} nats vs chance {test['chance_mean']:.4f}"
    + ("" if above_chance(test, n) else ", at chance")
  )


def _specialist(table):
  """The (label, expert, P(e | label), P(e), lift) of the largest lift
  over labels with >= MIN_LABEL_TOKENS tokens; None if there is none."""
  counts = np.asarray(table["counts"], np.float64)
  load_E = counts.sum(0) / counts.sum()
  best = None
  for label, row in zip(table["labels"], counts):
    if row.sum() < MIN_LABEL_TOKENS:
      continue
    share_E = row / row.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
      lift_E = np.where(load_E > 0, share_E / load_E, 0.0)
    e = int(np.argmax(lift_E))
    if best is None or lift_E[e] > best[4]:
      best = (label, e, float(share_E[e]), float(load_E[e]), float(lift_E[e]))
  return best


def _label_words(name, table, n):
  test = table["mutual_information"]
  found = _specialist(table)
  if not above_chance(test, n) or found is None:
    return f"routing does not depend on the {name} ({_mi_words(test, n)})"
  label, e, share, load, lift = found
  if lift >= SPECIALIST_LIFT:
    kind = f"expert {e} is a {label} specialist"
  elif lift >= PREFERENCE_LIFT:
    kind = f"expert {e} mildly prefers {label}"
  else:
    return (
      f"routing depends weakly on the {name} ({_mi_words(test, n)}): no "
      f"expert takes over {PREFERENCE_LIFT}x its average share of any {name}"
    )
  return (
    f"{kind}: it takes {share:.0%} of the {label} tokens against {load:.0%} "
    f"of all tokens ({lift:.1f}x; {_mi_words(test, n)})"
  )


def _token_vs_context(out, n):
  token = out["token_id"]
  mi_t, purity = token["mutual_information"], token["purity"]
  t_words = (
    f"token identity (purity {purity['observed']:.2f} vs chance "
    f"{purity['chance_mean']:.2f}; I(token; expert) = "
    f"{mi_t['observed']:.3f} nats vs chance {mi_t['chance_mean']:.3f})"
  )
  if "expert_by_domain" not in out:
    verdict = "follows" if above_chance(mi_t, n) else "does not follow"
    return f"routing {verdict} {t_words}; no domains to compare"
  mi_d = out["expert_by_domain"]["mutual_information"]
  d_words = (
    f"domain (I = {mi_d['observed']:.4f} nats vs chance "
    f"{mi_d['chance_mean']:.4f})"
  )
  t_up, d_up = above_chance(mi_t, n), above_chance(mi_d, n)
  t_excess = mi_t["observed"] - mi_t["chance_mean"]
  d_excess = mi_d["observed"] - mi_d["chance_mean"]
  if t_up and d_up:
    if t_excess >= DOMINANCE_RATIO * d_excess:
      return f"routing follows {t_words} more than {d_words}"
    if d_excess >= DOMINANCE_RATIO * t_excess:
      return f"routing follows {d_words} more than {t_words}"
    return f"routing follows {t_words} and {d_words} about equally"
  if t_up:
    return f"routing follows {t_words}; the {d_words} is at chance"
  if d_up:
    return f"routing follows {d_words}; {t_words} is at chance"
  return f"routing follows neither {t_words} nor {d_words} beyond chance"


def _position_words(position):
  drop_L = np.asarray(position["drop_rate_first_choice"], np.float64)
  tokens_L = np.asarray(position["tokens"], np.float64)
  quarter = max(len(drop_L) // 4, 1)

  def mean(part):
    w = tokens_L[part]
    return float(np.nansum(drop_L[part] * w) / max(w.sum(), 1))

  first, last = mean(slice(0, quarter)), mean(slice(-quarter, None))
  overall = mean(slice(None))
  numbers = (
    f"first-choice drop rate {first:.3f} in the first quarter of positions, "
    f"{last:.3f} in the last"
  )
  if overall == 0:
    return "no first choice is dropped at the eval capacity factor"
  if last - first > POSITION_DROP_GAP and last > POSITION_DROP_RATIO * first:
    return f"late tokens are dropped more ({numbers})"
  if first - last > POSITION_DROP_GAP and first > POSITION_DROP_RATIO * last:
    return f"early tokens are dropped more ({numbers})"
  return f"drops do not depend on the position ({numbers})"


def _settling_words(out, step):
  rows = sorted(out["agreement"], key=lambda r: r["step"])
  earlier = [r for r in rows if r["step"] < step]
  if not earlier:
    return (
      "only one checkpoint up to this step: keep more with "
      "train.keep_checkpoint_steps to see when routing settles"
    )
  settled = None
  for r in reversed(earlier):
    if r["agreement"] < SETTLED_AGREEMENT:
      break
    settled = r
  first = earlier[0]
  if settled is None:
    last = earlier[-1]
    return (
      f"routing was still changing: step {last['step']} routes "
      f"{last['agreement']:.0%} of the tokens as step {step} does (chance "
      f"{last['chance']:.0%})"
    )
  return (
    f"routing settled by step {settled['step']} of {step}: it routes "
    f"{settled['agreement']:.0%} of the tokens as step {step} does "
    f"(chance {settled['chance']:.0%}; step {first['step']}: "
    f"{first['agreement']:.0%})"
  )


def summarize(result: dict) -> list[str]:
  """One line per MoE layer and topic, in words with their numbers,
  generated from `result` (`analyze_run`) by the thresholds named in
  `analyze_run`'s docstring."""
  n, lines = result["num_permutations"], []
  for layer, out in result["layers"].items():
    lines.append(f"{layer}: {_token_vs_context(out, n)}.")
    if "expert_by_domain" in out:
      words = _label_words("domain", out["expert_by_domain"], n)
      lines.append(f"{layer}: {words}.")
    words = _label_words("token category", out["expert_by_category"], n)
    lines.append(f"{layer}: {words}.")
    lines.append(f"{layer}: {_position_words(out['position'])}.")
    lines.append(f"{layer}: {_settling_words(out, result['step'])}.")
  return lines


def _markdown_table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def report_markdown(result: dict) -> str:
  """report.md: the summary, then each layer's numbers and the figures."""
  n = result["num_permutations"]
  parts = [
    f"# Routing analysis of step {result['step']}",
    "",
    f"Run `{result['workdir']}`; {result['num_sequences']} validation "
    f"sequences, {result['num_real_tokens']} real tokens; chance levels from "
    f"{n} shuffles; kept checkpoints {result['kept_steps']}. Generated by "
    "`python -m moe_jax.analysis` (thresholds: `moe_jax.analysis."
    "analyze_run`).",
    "",
    "## Summary",
    "",
    *[f"- {line}" for line in result["summary"]],
  ]
  for layer, out in result["layers"].items():
    parts += ["", f"## {layer}", ""]
    rows = []
    for name, key in (
      ("domain", "expert_by_domain"),
      ("token category", "expert_by_category"),
    ):
      if key in out:
        t = out[key]["mutual_information"]
        rows.append(
          [
            f"I({name}; expert), nats",
            f"{t['observed']:.4f}",
            f"{t['chance_mean']:.4f} ± {t['chance_std']:.4f}",
            f"{t['p_value']:.3f}",
          ]
        )
    for name, key in (
      ("I(token id; expert), nats", "mutual_information"),
      ("token-id purity", "purity"),
    ):
      t = out["token_id"][key]
      rows.append(
        [
          name,
          f"{t['observed']:.4f}",
          f"{t['chance_mean']:.4f} ± {t['chance_std']:.4f}",
          f"{t['p_value']:.3f}",
        ]
      )
    parts.append(_markdown_table(["measure", "observed", "chance", "p"], rows))
    for key in ("expert_by_domain", "expert_by_category"):
      if key not in out:
        continue
      table = out[key]
      counts = np.asarray(table["counts"], np.float64)
      share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
      parts += ["", f"P(expert | {key.split('_by_')[1]}), first choices:", ""]
      header = ["label", "tokens"] + [f"e{e}" for e in range(counts.shape[1])]
      parts.append(
        _markdown_table(
          header + ["H(f)/log E"],
          [
            [label, int(c.sum()), *(f"{v:.2f}" for v in s), f"{h:.2f}"]
            for label, c, s, h in zip(
              table["labels"], counts, share, table["usage_entropy"]
            )
          ],
        )
      )
    if out["agreement"]:
      parts += ["", "Agreement with this step's routing:", ""]
      parts.append(
        _markdown_table(
          ["step", "agreement", "chance"],
          [
            [r["step"], f"{r['agreement']:.3f}", f"{r['chance']:.3f}"]
            for r in out["agreement"]
          ],
        )
      )
  if result.get("files"):
    parts += ["", "## Figures", ""]
    parts += [f"![{name}]({name})" for name in result["files"]]
  return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------
# Figures (matplotlib's object API: no display, pyplot left alone).


def plot_expert_by_label(result: dict, key: str = "expert_by_domain"):
  """Heatmaps of P(expert | label), one per MoE layer, on one colour scale;
  the title gives I(label; expert) and its chance level. None when no
  layer has the table (`key`: "expert_by_domain" or "expert_by_category").
  """
  layers = [(l, o[key]) for l, o in result["layers"].items() if key in o]
  if not layers:
    return None
  shares = []
  for _, table in layers:
    counts = np.asarray(table["counts"], np.float64)
    shares.append(counts / np.maximum(counts.sum(1, keepdims=True), 1))
  vmax = max(float(s.max()) for s in shares)
  rows = len(layers[0][1]["labels"])
  fig = Figure(
    figsize=(4.5 * len(layers) + 1, 0.45 * rows + 1.6), layout="constrained"
  )
  axes = np.atleast_1d(fig.subplots(1, len(layers)))
  for ax, (layer, table), share in zip(axes, layers, shares):
    image = ax.imshow(share, vmin=0, vmax=vmax, cmap="viridis", aspect="auto")
    test = table["mutual_information"]
    ax.set_title(
      f"{layer}: I = {test['observed']:.3f} nats\n"
      f"(chance {test['chance_mean']:.3f})",
      fontsize=10,
    )
    ax.set_xlabel("expert")
    ax.set_xticks(range(share.shape[1]))
    ax.set_yticks(range(share.shape[0]), table["labels"])
    if share.size <= 160:
      for (i, j), v in np.ndenumerate(share):
        ax.text(
          j,
          i,
          f"{v:.2f}",
          ha="center",
          va="center",
          fontsize=7,
          color="white" if v < 0.6 * vmax else "black",
        )
  fig.colorbar(image, ax=list(axes), label="P(expert | label)")
  return fig


def plot_token_vs_context(result: dict):
  """Per layer: I(token id; expert) and I(domain; expert) and token-id
  purity, each next to its chance level (grey)."""
  layers = list(result["layers"])
  fig = Figure(figsize=(11, 3.6), layout="constrained")
  ax_mi, ax_purity = fig.subplots(1, 2)
  x = np.arange(len(layers))
  for offset, name, get in (
    (-0.2, "token id", lambda o: o["token_id"]["mutual_information"]),
    (
      0.2,
      "domain",
      lambda o: o.get("expert_by_domain", {}).get("mutual_information"),
    ),
  ):
    tests = [get(result["layers"][layer]) for layer in layers]
    if any(t is None for t in tests):
      continue
    observed = [t["observed"] for t in tests]
    chance = [t["chance_mean"] for t in tests]
    ax_mi.bar(x + offset - 0.1, observed, 0.2, label=f"I({name}; expert)")
    ax_mi.bar(
      x + offset + 0.1,
      chance,
      0.2,
      color="lightgray",
      edgecolor="gray",
      label=f"chance ({name})",
    )
  ax_mi.set(xticks=x, ylabel="nats", title="what the expert choice reveals")
  ax_mi.set_xticks(x, layers)
  ax_mi.legend(fontsize=8)
  purity = [result["layers"][l]["token_id"]["purity"] for l in layers]
  ax_purity.bar(
    x - 0.15, [t["observed"] for t in purity], 0.3, label="token-id purity"
  )
  ax_purity.bar(
    x + 0.15,
    [t["chance_mean"] for t in purity],
    0.3,
    color="lightgray",
    label="routing that ignores the id",
  )
  ax_purity.axhline(
    1 / result["num_experts"],
    color="gray",
    linestyle="--",
    linewidth=1,
    label="1/E",
  )
  ax_purity.set_xticks(x, layers)
  ax_purity.set(ylim=(0, 1), title="token-id purity")
  ax_purity.legend(fontsize=8)
  return fig


def plot_position(result: dict):
  """Top: the first-choice drop rate by position in the sequence, per
  layer. Bottom: P(expert | position) per layer, one colour scale."""
  layers = list(result["layers"])
  fig = Figure(figsize=(4.5 * len(layers) + 1, 6), layout="constrained")
  axes = fig.subplots(2, len(layers), squeeze=False)
  loads = []
  for layer in layers:
    counts = np.asarray(
      result["layers"][layer]["position"]["load_counts"], np.float64
    )
    loads.append(counts / np.maximum(counts.sum(1, keepdims=True), 1))
  vmax = max(float(s.max()) for s in loads)
  for j, (layer, load_LE) in enumerate(zip(layers, loads)):
    position = result["layers"][layer]["position"]
    ax = axes[0, j]
    ax.plot(position["drop_rate_first_choice"], label="first choices")
    ax.plot(
      position["drop_rate_all_choices"], label="all choices", linestyle="--"
    )
    ax.set(
      xlabel="position in the sequence",
      ylabel="dropped",
      title=f"{layer}: drop rate (eval capacity)",
    )
    ax.legend(fontsize=8)
    image = axes[1, j].imshow(
      load_LE.T,
      vmin=0,
      vmax=vmax,
      aspect="auto",
      cmap="viridis",
      interpolation="nearest",
    )
    axes[1, j].set(
      xlabel="position in the sequence",
      ylabel="expert",
      title=f"{layer}: P(expert | position)",
    )
    axes[1, j].set_yticks(range(load_LE.shape[1]))
  fig.colorbar(image, ax=list(axes[1]), label="share of first choices")
  return fig


def plot_settling(result: dict):
  """Agreement of each kept checkpoint's routing with the analysed one,
  against step, per layer; dashed: the chance agreement. None with a
  single checkpoint."""
  layers = [l for l, o in result["layers"].items() if o["agreement"]]
  if not layers:
    return None
  fig = Figure(figsize=(6, 3.6), layout="constrained")
  ax = fig.subplots()
  for layer in layers:
    rows = sorted(result["layers"][layer]["agreement"], key=lambda r: r["step"])
    steps = [r["step"] for r in rows] + [result["step"]]
    (line,) = ax.plot(
      steps, [r["agreement"] for r in rows] + [1.0], marker="o", label=layer
    )
    ax.plot(
      steps[:-1],
      [r["chance"] for r in rows],
      linestyle="--",
      color=line.get_color(),
      label=f"{layer}: chance",
    )
  ax.axhline(SETTLED_AGREEMENT, color="gray", linewidth=1, linestyle=":")
  ax.set(
    xlabel="step",
    ylabel="same first choice as the final step",
    ylim=(0, 1.02),
    title=f"how early routing settles (vs step {result['step']})",
  )
  ax.legend(fontsize=8)
  return fig


PLOTS = {
  "expert_by_domain": lambda r: plot_expert_by_label(r, "expert_by_domain"),
  "expert_by_category": lambda r: plot_expert_by_label(r, "expert_by_category"),
  "token_vs_context": plot_token_vs_context,
  "position": plot_position,
  "settling": plot_settling,
}
"""The PNGs of `analyze_run`: file name (without .png) -> figure maker."""


# ---------------------------------------------------------------------------
# The command line.


class _ArgumentParser(argparse.ArgumentParser):
  def error(self, message):
    _exit_config_error(message)


def _exit_config_error(message: str):
  """A mistake in the command: one line on stderr, exit status 2."""
  print(f"error: {errors.one_line(message)}", file=sys.stderr)
  sys.exit(2)


def main(argv=None):
  """python -m moe_jax.analysis --workdir=DIR [--step=N]
  [--num_permutations=N] [--seed=N] [--output_dir=DIR]"""
  parser = _ArgumentParser(
    prog="python -m moe_jax.analysis",
    description="Measures what a run's routers learned; writes "
    "<workdir>/analysis/report.md, analysis.json and PNGs.",
  )
  parser.add_argument("--workdir", required=True, help="the run's directory")
  parser.add_argument(
    "--step",
    type=int,
    default=None,
    help="checkpoint to analyse (default: the newest)",
  )
  parser.add_argument(
    "--num_permutations",
    type=int,
    default=100,
    help="shuffles behind each chance level",
  )
  parser.add_argument("--seed", type=int, default=0, help="of the shuffles")
  parser.add_argument(
    "--output_dir", default=None, help="default: <workdir>/analysis"
  )
  args = parser.parse_args(argv)
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs at INFO
  try:
    result = analyze_run(
      args.workdir,
      args.step,
      num_permutations=args.num_permutations,
      seed=args.seed,
      output_dir=args.output_dir,
    )
  except errors.ConfigError as e:
    _exit_config_error(str(e))
  print("\n".join(result["summary"]))
  out = args.output_dir or os.path.join(args.workdir, "analysis")
  print(
    f"wrote {os.path.join(out, 'report.md')}, analysis.json and "
    f"{len(result['files'])} PNGs"
  )


if __name__ == "__main__":
  main()
