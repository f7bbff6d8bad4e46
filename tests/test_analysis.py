"""Tests for `moe_jax.analysis`: specialisation measures and their chance
references.

Expected values are hand arithmetic, written out in the comments; nothing
here calls the code under test to produce an expected value.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import analysis, data, errors, train
from moe_jax.layers import MoeConfig
from moe_jax.models import TransformerConfig, TransformerLM

LN2 = math.log(2.0)

# ---------------------------------------------------------------------------
# expert_by_label.


def test_expert_by_label_counts_first_choices_of_real_tokens():
  # Rank 1 holds junk to show that only rank 0 counts.
  expert_index_BLK = np.array(
    [[[0, 9], [1, 9], [1, 9]], [[2, 9], [2, 9], [0, 9]]]
  )
  domain_B = np.array([1, 0])
  mask_BL = np.array([[1, 1, 0], [1, 1, 1]])
  # Sequence 0 (label 1): experts 0, 1; its third token is padding.
  # Sequence 1 (label 0): experts 2, 2, 0.
  want = np.array([[1, 0, 2], [1, 1, 0]])
  counts = analysis.expert_by_label(
    expert_index_BLK, domain_B, mask_BL, num_experts=3, num_labels=2
  )
  np.testing.assert_array_equal(counts, want)
  # Per-token labels [B, L] give the same table when they repeat the domain.
  labels_BL = np.repeat(domain_B[:, None], 3, axis=1)
  np.testing.assert_array_equal(
    analysis.expert_by_label(expert_index_BLK, labels_BL, mask_BL, 3, 2), want
  )


def test_expert_by_label_ignores_invalid_values_on_padding_only():
  expert_index_BL = np.array([[0, 7]])  # 7 is out of range but padded
  labels_BL = np.array([[1, -1]])  # -1 (TFDS domain) likewise
  mask_BL = np.array([[1, 0]])
  counts = analysis.expert_by_label(expert_index_BL, labels_BL, mask_BL, 2, 2)
  np.testing.assert_array_equal(counts, [[0, 0], [1, 0]])
  with pytest.raises(ValueError, match="labels holds values in \\[-1"):
    analysis.expert_by_label(expert_index_BL, [[-1, 0]], mask_BL, 2, 2)
  with pytest.raises(ValueError, match="must both be \\[B, L\\]"):
    analysis.expert_by_label(np.zeros((1, 3), int), [0], mask_BL, 2, 2)


# ---------------------------------------------------------------------------
# Mutual information.


def test_mutual_information_of_an_independent_table_is_zero():
  # p(l) = (1/3, 2/3), p(e) = (1/6, 1/3, 1/2): every cell is p(l) p(e),
  # e.g. 2/18 = (1/3)(1/3), so every log term is log 1 = 0.
  counts = np.array([[1, 2, 3], [2, 4, 6]])
  assert analysis.mutual_information(counts) == pytest.approx(0.0, abs=1e-12)
  assert analysis.normalized_mutual_information(counts) == pytest.approx(
    0.0, abs=1e-12
  )


def test_mutual_information_of_a_dependent_table_is_the_label_entropy():
  # Labels 0, 1, 2 go to experts 0, 2, 3 only; p(label) = (1/4, 1/2, 1/4):
  # H(label) = 2 (1/4) ln 4 + (1/2) ln 2 = 1.5 ln 2 = 1.0397 nats = I.
  counts = np.array([[3, 0, 0, 0], [0, 0, 6, 0], [0, 0, 0, 3]])
  assert analysis.mutual_information(counts) == pytest.approx(1.5 * LN2)
  assert analysis.normalized_mutual_information(counts) == pytest.approx(1.0)
  # Label 0 split over experts 0 and 1, label 1 on expert 2: each expert
  # still sees one label, so I = H(label) = ln 2 and the NMI is 1.
  counts = np.array([[2, 3, 0], [0, 0, 5]])
  assert analysis.mutual_information(counts) == pytest.approx(LN2)
  assert analysis.normalized_mutual_information(counts) == pytest.approx(1.0)


def test_mutual_information_of_a_mixed_table():
  # counts [[2, 2], [0, 4]], N = 8: p(l) = (1/2, 1/2), p(e) = (1/4, 3/4).
  # I = 1/4 ln((1/4)/(1/8)) + 1/4 ln((1/4)/(3/8)) + 1/2 ln((1/2)/(3/8))
  #   = 0.25 ln 2 + 0.25 ln(2/3) + 0.5 ln(4/3)
  #   = 0.173287 - 0.101366 + 0.143841 = 0.215762 nats.
  counts = np.array([[2, 2], [0, 4]])
  assert analysis.mutual_information(counts) == pytest.approx(0.215762, 1e-5)
  # H(label) = ln 2: NMI = 0.215762 / 0.693147 = 0.311279.
  assert analysis.normalized_mutual_information(counts) == pytest.approx(
    0.311279, 1e-5
  )


def test_normalized_mutual_information_is_nan_for_a_single_label():
  assert math.isnan(analysis.normalized_mutual_information([[3, 1, 0]]))
  with pytest.raises(ValueError, match="positive total"):
    analysis.mutual_information(np.zeros((2, 2)))


# ---------------------------------------------------------------------------
# Permutation baseline.


def test_permutation_baseline_is_near_zero_for_a_large_sample():
  # Independent labels (R = 2) and experts (E = 4) over N = 100000 tokens:
  # the plug-in bias is about (R - 1)(E - 1) / 2N = 3 / 200000 = 1.5e-5.
  rng = np.random.default_rng(0)
  expert_BL = rng.integers(0, 4, (100, 1000))
  labels_BL = rng.integers(0, 2, (100, 1000))
  mask_BL = np.ones((100, 1000))
  test = analysis.permutation_baseline(
    expert_BL, labels_BL, mask_BL, 4, 2, num_permutations=50, seed=1
  )
  assert 0 < test.chance_mean < 5e-5
  assert test.observed < 1e-4


def test_permutation_baseline_is_large_for_a_tiny_sample():
  # 8 tokens, labels 0 0 0 0 1 1 1 1, each expert on two tokens (one of each
  # label): observed I = 0. A shuffle leaves an expert's pair "unsplit" (both
  # tokens one label) with probability 2 (4/8)(3/7) = 3/7; an unsplit pair
  # adds 2/8 ln((2/8) / ((1/2)(2/8))) = (1/4) ln 2, a split one 0. So
  # E[I] = 4 (3/7) (1/4) ln 2 = (3/7) ln 2 = 0.29706 nats.
  expert_BL = np.array([[0, 1, 2, 3, 0, 1, 2, 3]])
  labels_BL = np.array([[0, 0, 0, 0, 1, 1, 1, 1]])
  mask_BL = np.ones((1, 8))
  test = analysis.permutation_baseline(
    expert_BL, labels_BL, mask_BL, 4, 2, num_permutations=4000, seed=0
  )
  assert test.observed == pytest.approx(0.0, abs=1e-12)
  assert test.chance_mean == pytest.approx(3 / 7 * LN2, abs=0.01)
  assert test.p_value == 1.0  # every shuffle gives I >= 0


def test_perfect_split_of_a_tiny_sample_is_not_significant():
  # Experts 0 0 1 1 2 2 3 3 and labels 0 0 0 0 1 1 1 1: observed I = ln 2.
  # A shuffle reaches ln 2 iff all pairs stay unsplit: choose which 2 of the
  # 4 pairs carry label 0, C(4, 2) = 6 of C(8, 4) = 70 labelings, p = 0.0857.
  expert_BL = np.array([[0, 0, 1, 1, 2, 2, 3, 3]])
  labels_BL = np.array([[0, 0, 0, 0, 1, 1, 1, 1]])
  test = analysis.permutation_baseline(
    expert_BL, labels_BL, np.ones((1, 8)), 4, 2, num_permutations=4000
  )
  assert test.observed == pytest.approx(LN2)
  assert test.p_value == pytest.approx(6 / 70, abs=0.015)


def test_sequence_shuffle_keeps_the_tokens_of_a_sequence_together():
  # 4 sequences of 2 tokens; sequence b always routes to expert b and has
  # label [0, 0, 1, 1][b]. Each expert sees one label: I = ln 2. Permuting
  # whole sequences' labels keeps that true, so every shuffle gives ln 2 and
  # the sequence-level chance is ln 2 itself (p = 1): 4 sequences cannot
  # show specialisation. Token-level shuffles split pairs, so their chance
  # level is lower: E = (3/7) ln 2 as in the test above.
  expert_BL = np.array([[0, 0], [1, 1], [2, 2], [3, 3]])
  domain_B = np.array([0, 0, 1, 1])
  mask_BL = np.ones((4, 2))
  by_sequence = analysis.permutation_baseline(
    expert_BL, domain_B, mask_BL, 4, 2, 200, shuffle="sequences"
  )
  assert by_sequence.chance_mean == pytest.approx(LN2)
  assert by_sequence.chance_std == pytest.approx(0.0, abs=1e-12)
  assert by_sequence.p_value == 1.0
  by_token = analysis.permutation_baseline(
    expert_BL, domain_B, mask_BL, 4, 2, 4000, shuffle="tokens"
  )
  assert by_token.chance_mean == pytest.approx(3 / 7 * LN2, abs=0.01)
  with pytest.raises(ValueError, match="one label per sequence"):
    analysis.permutation_baseline(
      expert_BL, expert_BL, mask_BL, 4, 4, shuffle="sequences"
    )
  with pytest.raises(ValueError, match="allowed: 'tokens', 'sequences'"):
    analysis.permutation_baseline(
      expert_BL, domain_B, mask_BL, 4, 2, shuffle="groups"
    )


def test_permutation_baseline_excludes_padding():
  # The real tokens are independent ([[1, 1], [1, 1]] table, I = 0); padded
  # tokens, all label 1 on expert 1, would make the table dependent.
  expert_BL = np.array([[0, 1, 0, 1, 1, 1, 1, 1]])
  labels_BL = np.array([[0, 0, 1, 1, 1, 1, 1, 1]])
  mask_BL = np.array([[1, 1, 1, 1, 0, 0, 0, 0]])
  test = analysis.permutation_baseline(
    expert_BL, labels_BL, mask_BL, 2, 2, num_permutations=10
  )
  assert test.observed == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------
# Token-id purity.


def test_purity_is_one_when_the_id_decides_the_expert():
  rng = np.random.default_rng(0)
  ids_BL = rng.integers(0, 16, (8, 64))
  expert_BL = ids_BL % 4
  assert analysis.token_id_purity(
    expert_BL, ids_BL, np.ones((8, 64)), 4, 16
  ) == pytest.approx(1.0)


def test_purity_of_a_hand_built_mixed_case():
  # id 5: experts 0 0 0 1 -> max count 3 of 4; id 7: experts 2 3 -> 1 of 2;
  # id 9: expert 1 -> 1 of 1. Padded tokens (id 5 on expert 3) don't count.
  # purity = (3 + 1 + 1) / 7 = 0.714286, i.e. the frequency-weighted mean of
  # the per-id purities 3/4, 1/2, 1/1 with weights 4/7, 2/7, 1/7.
  ids_BL = np.array([[5, 5, 7, 5, 9], [7, 5, 5, 5, 5]])
  expert_BL = np.array([[0, 0, 2, 0, 1], [3, 1, 3, 3, 3]])
  mask_BL = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
  purity = analysis.token_id_purity(expert_BL, ids_BL, mask_BL, 4, 10)
  assert purity == pytest.approx(5 / 7)


def test_purity_baseline_separates_id_routing_from_chance():
  # 16 ids, each ~256 times, routed by id to 4 balanced experts: purity 1.
  # Shuffling the experts makes each id's counts ~ Multinomial(256, 1/4):
  # the top count is a little above 256/4, so chance is near 0.3 and far
  # below 1.
  rng = np.random.default_rng(0)
  ids_BL = rng.integers(0, 16, (64, 64))
  test = analysis.token_id_purity_baseline(
    ids_BL % 4, ids_BL, np.ones((64, 64)), 4, 16, num_permutations=20
  )
  assert test.observed == pytest.approx(1.0)
  assert 0.25 < test.chance_mean < 0.35
  assert test.p_value == pytest.approx(1 / 21)


def test_purity_of_ids_seen_once_is_one_even_by_chance():
  # Every id occurs once: each is "pure" whatever the routing, so the
  # observed purity and its chance level are both exactly 1.
  ids_BL = np.arange(8).reshape(1, 8)
  expert_BL = np.array([[0, 1, 2, 3, 0, 1, 2, 3]])
  test = analysis.token_id_purity_baseline(
    expert_BL, ids_BL, np.ones((1, 8)), 4, 8, num_permutations=5
  )
  assert (test.observed, test.chance_mean) == (1.0, 1.0)


# ---------------------------------------------------------------------------
# Usage entropy and agreement.


def test_usage_entropy():
  assert analysis.usage_entropy([5, 5, 5, 5]) == pytest.approx(1.0)
  assert analysis.usage_entropy([0, 12, 0, 0]) == pytest.approx(0.0)
  # f = (1/2, 1/2, 0, 0): H = ln 2, divided by ln 4 = 0.5.
  assert analysis.usage_entropy([3, 3, 0, 0]) == pytest.approx(0.5)
  # One value per row of an [R, E] table; a row without tokens gives NaN.
  rows = analysis.usage_entropy(np.array([[1, 1, 1, 1], [0, 4, 0, 0], [0] * 4]))
  np.testing.assert_allclose(rows, [1.0, 0.0, np.nan])
  with pytest.raises(ValueError, match=">= 2 experts"):
    analysis.usage_entropy([3])


def test_routing_agreement_and_its_chance_level():
  a_BLK = np.array([[[0], [1], [2], [3]]])
  b_BLK = np.array([[[0], [1], [3], [3]]])
  # 3 of 4 first choices agree.
  assert analysis.routing_agreement(a_BLK, b_BLK, np.ones((1, 4))) == 0.75
  # Masking the disagreeing token leaves 3 of 3.
  mask_BL = np.array([[1, 1, 0, 1]])
  assert analysis.routing_agreement(a_BLK, b_BLK, mask_BL) == 1.0
  # f_a = (1/4, 1/4, 1/4, 1/4) is balanced: chance = 1/E = 0.25 whatever f_b.
  assert analysis.chance_agreement(
    a_BLK, b_BLK, np.ones((1, 4)), 4
  ) == pytest.approx(0.25)
  # f_a = (1/2, 1/2, 0, 0), f_b = (1/2, 0, 1/2, 0): sum f_a f_b = 1/4.
  a_BL, b_BL = np.array([[0, 0, 1, 1]]), np.array([[0, 2, 0, 2]])
  assert analysis.chance_agreement(
    a_BL, b_BL, np.ones((1, 4)), 4
  ) == pytest.approx(0.25)
  # ... and they agree on 1 of 4 tokens.
  assert analysis.routing_agreement(a_BL, b_BL, np.ones((1, 4))) == 0.25


# ---------------------------------------------------------------------------
# routing_decisions on a tiny model.


def test_routing_decisions_of_a_tiny_model():
  # Two blocks, both MoE (moe_every = 1), GShard top-2 over 4 experts, one
  # group of 2 x 8 = 16 tokens. The eval capacity factor 0.5 gives
  # C = ceil(2 * 16 * 0.5 / 4) = 4 slots for 2 * 13 real choices, so some
  # choices must be dropped.
  moe = MoeConfig(
    num_experts=4,
    top_k=2,
    router="gshard",
    expert_dim=16,
    group_size=16,
    capacity_factor=1.0,
    eval_capacity_factor=0.5,
    capacity_rule="gshard",
    min_capacity=0,
  )
  model = TransformerLM(
    TransformerConfig(
      vocab_size=32,
      max_len=8,
      d_model=16,
      num_layers=2,
      num_heads=2,
      mlp_dim=16,
      moe_every=1,
      moe=moe,
    )
  )
  inputs_BL = jax.random.randint(jax.random.key(1), (2, 8), 1, 32)
  mask_BL = jnp.array([[1] * 8, [1] * 5 + [0] * 3], jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), inputs_BL)["params"]
  decisions = analysis.routing_decisions(
    params, model, {"inputs": inputs_BL, "mask": mask_BL}
  )
  assert sorted(decisions) == ["layer_00", "layer_01"]
  real_BL = np.asarray(mask_BL) > 0
  for layer in decisions.values():
    assert sorted(layer) == ["expert_index", "gates", "kept"]
    index_BLK, gates_BLK, kept_BLK = (
      layer[k] for k in ("expert_index", "gates", "kept")
    )
    assert all(isinstance(v, np.ndarray) for v in layer.values())
    assert index_BLK.shape == gates_BLK.shape == kept_BLK.shape == (2, 8, 2)
    assert ((0 <= index_BLK) & (index_BLK < 4)).all()
    assert (index_BLK[..., 0] != index_BLK[..., 1]).all()
    # Padded tokens get no expert; dropped pairs have weight exactly 0.
    assert not kept_BLK[~real_BL].any()
    assert (gates_BLK[~kept_BLK] == 0).all()
    assert (gates_BLK[kept_BLK] > 0).all()
    # C = 4 slots per expert: at most 16 of the 26 real choices are kept.
    assert 0 < kept_BLK.sum() <= 16
    for e in range(4):
      assert (kept_BLK & (index_BLK == e)).sum() <= 4
  # The layer's own metrics, computed inside the model, tell the same story.
  apply = jax.jit(
    lambda p: model.apply(
      {"params": p},
      inputs_BL,
      mask_BL > 0,
      deterministic=True,
      mutable=["moe_metrics"],
    )
  )
  _, sown = apply(params)
  for name, layer in decisions.items():
    metrics = sown["moe_metrics"][name]["moe"]
    for k in range(2):
      dropped = 1.0 - layer["kept"][..., k][real_BL].mean()
      assert float(metrics[f"drop_fraction_rank_{k + 1}"][0]) == (
        pytest.approx(dropped)
      )


# ---------------------------------------------------------------------------
# Token categories.


def test_token_categories_of_hand_picked_bytes():
  # Ids are byte + 3 (moe_jax.data.tokenizer); 1 = BOS, 0 = PAD.
  prose = [1, *(b + 3 for b in b"a7 ,"), 0xC3 + 3, 0]
  code = [*(b + 3 for b in b"def x1(1e5)"), 2]
  inputs_BL = np.array([prose + [0] * (len(code) - len(prose)), code])
  domain_B = np.array([data.DOMAINS.index("prose"), data.DOMAINS.index("code")])
  names = [
    [analysis.CATEGORIES[i] for i in row]
    for row in analysis.token_categories(inputs_BL, domain_B)
  ]
  assert names[0][:7] == [
    "special",  # BOS
    "letter",  # a
    "digit",  # 7
    "whitespace",
    "punctuation",  # ,
    "non_ascii",  # 0xC3
    "special",  # PAD
  ]
  # In code: "def" is a keyword, "x1" an identifier (its digit too), "1e5"
  # is no word (it starts with a digit), so 1, e, 5 keep their byte class.
  assert names[1] == [
    *["keyword"] * 3,
    "whitespace",
    *["identifier"] * 2,
    "punctuation",
    "digit",
    "letter",
    "digit",
    "punctuation",
    "special",  # EOS
  ]
  # Without domains, no byte is a keyword or an identifier.
  plain = analysis.token_categories(inputs_BL)
  assert [analysis.CATEGORIES[i] for i in plain[1][:3]] == ["letter"] * 3


# ---------------------------------------------------------------------------
# The summary's wording follows its thresholds.


def _test(observed, chance_mean, chance_std=0.001, p_value=0.01):
  return {
    "observed": observed,
    "chance_mean": chance_mean,
    "chance_std": chance_std,
    "p_value": p_value,
  }


def test_summary_words_follow_the_thresholds():
  layer = {
    "token_id": {
      "purity": _test(0.82, 0.41),
      "mutual_information": _test(0.30, 0.05),
    },
    # Excess 0.048 - 0.002 = 0.046 nats < 0.25 / 2: token identity wins.
    "expert_by_domain": {
      "labels": ["code", "prose"],
      # P(e0) = 100/200 = 0.5; P(e0 | code) = 90/100 = 0.9: lift 1.8,
      # P(e1 | prose) = 90/100 = 0.9, P(e1) = 0.5: lift 1.8 too, so a mild
      # preference (1.25 <= 1.8 < 2).
      "counts": [[90, 10], [10, 90]],
      "mutual_information": _test(0.048, 0.002),
    },
    "expert_by_category": {
      "labels": ["letter", "digit"],
      "counts": [[100, 100], [5, 5]],
      "mutual_information": _test(0.0, 0.003, p_value=1.0),
    },
    # Tokens 10 per position; first quarter (positions 0, 1) drops 0,
    # last quarter (6, 7) drops 0.2: late tokens dropped more.
    "position": {
      "tokens": [10] * 8,
      "drop_rate_first_choice": [0, 0, 0.1, 0.1, 0.1, 0.1, 0.2, 0.2],
    },
    "agreement": [
      {"step": 10, "agreement": 0.5, "chance": 0.3},
      {"step": 20, "agreement": 0.95, "chance": 0.3},
      {"step": 30, "agreement": 0.92, "chance": 0.3},
    ],
  }
  result = {"num_permutations": 100, "step": 40, "layers": {"layer_01": layer}}
  lines = analysis.summarize(result)
  assert lines[0].startswith(
    "layer_01: routing follows token identity (purity 0.82 vs chance 0.41"
  )
  assert "more than domain (I = 0.0480 nats vs chance 0.0020)" in lines[0]
  assert (
    "expert 0 mildly prefers code: it takes 90% of the code tokens"
    in (lines[1])
  )
  assert "does not depend on the token category" in lines[2]
  assert "late tokens are dropped more" in lines[3]
  assert (
    "0.000 in the first quarter of positions, 0.200 in the last" in (lines[3])
  )
  assert "settled by step 20 of 40" in lines[4]
  # Below 3 chance standard deviations the domain is "at chance".
  layer["expert_by_domain"]["mutual_information"] = _test(0.003, 0.002)
  assert (
    "the domain (I = 0.0030 nats vs chance 0.0020) is at chance"
    in (analysis.summarize(result)[0])
  )


# ---------------------------------------------------------------------------
# analyze_run and `python -m moe_jax.analysis` on a tiny trained run.

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """configs/switch_top1.py shrunk (tests/tiny.py; one MoE layer, layer_01),
  12 steps, checkpoints kept at 4 and 8 and the last, 12. The code cap of
  4 MB puts code and prose into the validation split."""
  sys.path.insert(0, str(REPO / "configs"))
  import switch_top1
  import tiny

  workdir = tmp_path_factory.mktemp("run")
  config = tiny.shrink(
    switch_top1.get_config(),
    tmp_path_factory.mktemp("tfds"),
    num_steps=12,
    log_every=6,
    eval_every=100,
    checkpoint_every=12,
    max_checkpoints_to_keep=1,
    keep_checkpoint_steps=(4, 8),
  )
  config.data.max_code_bytes = 4_000_000
  train.train_and_evaluate(config, str(workdir))
  return workdir, config


def _cli(*args):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join(
      [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    ),
  )
  return subprocess.run(
    [sys.executable, "-m", "moe_jax.analysis", *args],
    capture_output=True,
    text=True,
    env=env,
  )


def test_command_line_writes_the_report(tiny_run):
  workdir, config = tiny_run
  done = _cli(f"--workdir={workdir}", "--num_permutations=20")
  assert done.returncode == 0, done.stderr[-3000:]
  out = workdir / "analysis"
  result = json.loads((out / "analysis.json").read_text())
  assert sorted(p.name for p in out.iterdir()) == sorted(
    ["analysis.json", "report.md"] + [f"{n}.png" for n in analysis.PLOTS]
  )
  assert result["step"] == 12 and result["kept_steps"] == [4, 8, 12]
  # Independent counts from the same validation batches.
  batches = data.create_eval_batches(config.data)
  mask_BL = np.concatenate([b["mask"] for b in batches]) > 0
  inputs_BL = np.concatenate([b["inputs"] for b in batches])
  domain_B = np.concatenate([b["domain"] for b in batches])
  assert result["num_real_tokens"] == mask_BL.sum()
  (layer,) = result["layers"].values()  # switch_top1 tiny: layer_01 only
  table = layer["expert_by_domain"]
  counts_RE = np.array(table["counts"], np.float64)
  assert table["labels"] == ["code", "prose"]
  assert counts_RE.shape == (2, 4)
  for label, row in zip(table["labels"], counts_RE):
    real = mask_BL[domain_B == data.DOMAINS.index(label)].sum()
    assert row.sum() == real > 0
  # I(domain; expert) from the table by the formula, in float64.
  p_RE = counts_RE / counts_RE.sum()
  p_R, p_E = p_RE.sum(1), p_RE.sum(0)
  mi = sum(
    p_RE[r, e] * math.log(p_RE[r, e] / (p_R[r] * p_E[e]))
    for r in range(2)
    for e in range(4)
    if p_RE[r, e] > 0
  )
  assert table["mutual_information"]["observed"] == pytest.approx(mi)
  categories = layer["expert_by_category"]
  whitespace = np.isin(inputs_BL - 3, list(b" \t\n\r\x0b\x0c")) & mask_BL
  row = categories["labels"].index("whitespace")
  assert sum(categories["counts"][row]) == whitespace.sum()
  assert sum(map(sum, categories["counts"])) == mask_BL.sum()
  for test in (
    table["mutual_information"],
    categories["mutual_information"],
    *layer["token_id"].values(),
  ):
    assert 0 <= test["chance_mean"] and 0 < test["p_value"] <= 1
    assert math.isfinite(test["observed"])
  assert 0 < layer["token_id"]["purity"]["observed"] <= 1
  position = layer["position"]
  assert position["tokens"] == mask_BL.sum(0).tolist()
  assert [sum(row) for row in position["load_counts"]] == position["tokens"]
  assert all(0 <= v <= 1 for v in position["drop_rate_first_choice"])
  assert [r["step"] for r in layer["agreement"]] == [4, 8]
  assert all(0 <= r["chance"] <= 1 for r in layer["agreement"])
  assert all(0 <= r["agreement"] <= 1 for r in layer["agreement"])
  # The words carry the numbers and the summary is printed and reported.
  assert len(result["summary"]) == 5
  assert "vs chance" in result["summary"][0]
  report = (out / "report.md").read_text()
  assert all(line in report for line in result["summary"])
  assert result["summary"][0] in done.stdout


def test_bad_input_is_one_line_or_a_config_error(tiny_run, tmp_path):
  workdir, _ = tiny_run
  done = _cli(f"--workdir={tmp_path / 'nope'}")
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
    f"error: --workdir={tmp_path / 'nope'} is not a directory."
  ]
  with pytest.raises(errors.ConfigError, match=r"saved steps are \[4, 8, 12\]"):
    analysis.analyze_run(workdir, step=5)
  (tmp_path / "config.json").write_text((workdir / "config.json").read_text())
  with pytest.raises(errors.ConfigError, match="holds no checkpoint"):
    analysis.analyze_run(tmp_path)
  with pytest.raises(errors.ConfigError, match="num_permutations=0"):
    analysis.analyze_run(workdir, num_permutations=0)
