"""Tests for moe_jax.data.pipeline and the public API in moe_jax.data."""

import importlib.util
import json
import math
import os
import pathlib
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import moe_jax.data as data
from moe_jax.data import corpus, tfds_builder, tokenizer

_BASE = pathlib.Path(__file__).parents[1] / "configs" / "base.py"


def _base_data_config():
  spec = importlib.util.spec_from_file_location("_moe_jax_base_config", _BASE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_base_config().data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def make_config(data_dir):
  def make(**overrides):
    small = dict(
      data_dir=data_dir,
      domains=("code", "prose"),
      max_code_bytes=60_000,
      seq_len=64,
      batch_size=8,
      eval_batch_size=4,
      num_eval_batches=3,
    )
    # A fresh ConfigDict, so that tests may also set values of wrong types.
    base = _base_data_config().to_dict()
    return ml_collections.ConfigDict({**base, **small, **overrides})

  return make


def _as_text(ids) -> str:
  """Token ids as a str with one character per token (for substring tests)."""
  return "".join(chr(0x100 + int(i)) for i in ids)


def _window_rows(batch):
  """Each row's window: inputs then the last real target, as _as_text."""
  rows = []
  for inputs, targets, mask in zip(
    batch["inputs"], batch["targets"], batch["mask"], strict=True
  ):
    n = int(mask.sum())
    rows.append(_as_text(list(inputs[:n]) + [targets[n - 1]]))
  return rows


def _expected_windows(config, split):
  """Windows of a split, computed from the documents (not the records)."""
  rows = []
  for doc in corpus.load_documents(config.domains, config.max_code_bytes):
    if corpus.split_of(doc.doc_id, config.validation_fraction) != split:
      continue
    chunks = tfds_builder.chunk_text(doc.text)
    for i, chunk in enumerate(chunks):
      ids = tokenizer.encode(chunk, bos=i == 0, eos=i == len(chunks) - 1)
      for start in range(0, len(ids) - 1, config.seq_len):
        rows.append(_as_text(ids[start : start + config.seq_len + 1]))
  return rows


def test_public_api():
  assert data.VOCAB_SIZE == 259
  assert data.DOMAINS == ("code", "prose", "dialog")
  for name in ("create_train_iterator", "create_eval_batches"):
    assert callable(getattr(data, name))


def test_batch_layout(make_config):
  config = make_config()
  batch = next(data.create_train_iterator(config, seed=0))
  assert set(batch) == {"inputs", "targets", "mask", "domain"}
  for key in ("inputs", "targets", "mask"):
    assert batch[key].shape == (8, 64)
  assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
  assert batch["mask"].dtype == np.float32
  assert batch["domain"].shape == (8,) and batch["domain"].dtype == np.int32
  assert set(batch["domain"].tolist()) <= {0, 1}
  pad = batch["mask"] == 0
  assert np.all(batch["inputs"][pad] == 0) and np.all(
    batch["targets"][pad] == 0
  )
  # Targets are the inputs shifted by one wherever both are real.
  both = batch["mask"][:, 1:] == 1
  np.testing.assert_array_equal(
    batch["targets"][:, :-1][both], batch["inputs"][:, 1:][both]
  )
  assert np.all(batch["targets"][batch["mask"] == 1] != 0)


def test_one_epoch_is_every_training_window_once(make_config):
  config = make_config(
    domains=("prose",), max_code_bytes=0, seq_len=512, batch_size=1
  )
  it = data.create_train_iterator(config, seed=3)
  expected = _expected_windows(config, corpus.TRAIN)
  assert it.windows_per_epoch == len(expected) > 100
  epochs = [
    [_window_rows(next(it))[0] for _ in range(len(expected))] for _ in range(2)
  ]
  assert sorted(epochs[0]) == sorted(expected)
  assert sorted(epochs[1]) == sorted(expected)
  assert epochs[0] != epochs[1]  # each epoch has its own order


def test_same_seed_same_batches_other_seed_other_batches(make_config):
  config = make_config()
  a, b = (data.create_train_iterator(config, seed=7) for _ in range(2))
  for _ in range(3):
    batch_a, batch_b = next(a), next(b)
    for key in batch_a:
      np.testing.assert_array_equal(batch_a[key], batch_b[key])
  other = next(data.create_train_iterator(config, seed=8))
  assert not np.array_equal(other["inputs"], next(a)["inputs"])


@pytest.mark.parametrize("where", ["start", "first_epoch", "third_epoch"])
def test_set_state_resumes_exactly(make_config, where):
  # Prose only, 4096-token windows: ~150 windows, ~18 batches an epoch.
  config = make_config(
    domains=("prose",), max_code_bytes=0, seq_len=4096, batch_size=8
  )
  reference = data.create_train_iterator(config, seed=1)
  batches_per_epoch = reference.windows_per_epoch // 8
  third_epoch = 2 * batches_per_epoch + 1
  stop = {"start": 0, "first_epoch": 5, "third_epoch": third_epoch}[where]
  batches = [next(reference) for _ in range(stop + batches_per_epoch)]
  interrupted = data.create_train_iterator(config, seed=1)
  for _ in range(stop):
    next(interrupted)
  state = json.loads(json.dumps(interrupted.get_state()))
  resumed = data.create_train_iterator(config, seed=1)
  resumed.set_state(state)
  for expected in batches[stop:]:  # a whole epoch's worth, across a boundary
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])


def test_set_state_rejects_other_data(make_config):
  config = make_config()
  state = data.create_train_iterator(config, seed=1).get_state()
  with pytest.raises(ValueError, match="seed=1.*seed=2"):
    data.create_train_iterator(config, seed=2).set_state(state)
  with pytest.raises(ValueError, match="not a TrainIterator"):
    data.create_train_iterator(config, seed=1).set_state({"next_index": 3})


def test_windows_come_from_their_split(make_config):
  config = make_config()
  train_text = "|".join(_expected_windows(config, corpus.TRAIN))
  valid_text = "|".join(_expected_windows(config, corpus.VALIDATION))
  for row in _window_rows(next(data.create_train_iterator(config, seed=0))):
    assert row in train_text
  eval_batches = data.create_eval_batches(config)
  assert len(eval_batches) == 3
  for batch in eval_batches:
    assert batch["inputs"].shape == (4, 64)
    for row in _window_rows(batch):
      assert row in valid_text


def test_eval_batches_are_fixed(make_config):
  config = make_config()
  first, second = (
    data.create_eval_batches(config),
    data.create_eval_batches(config),
  )
  for a, b in zip(first, second, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_unigram_baseline_matches_float64_reference(make_config):
  config = make_config()
  counts = np.zeros(259)
  for row in _expected_windows(config, corpus.TRAIN):
    counts += np.bincount([ord(c) - 0x100 for c in row[1:]], minlength=259)
  log_p = np.log((counts + 1) / (counts.sum() + 259))
  nll, n = 0.0, 0.0
  for batch in data.create_eval_batches(config):
    nll -= (log_p[batch["targets"]] * batch["mask"]).sum()
    n += batch["mask"].sum()
  baseline = data.unigram_baseline(config)
  assert baseline == pytest.approx(nll / n, rel=1e-9)
  assert 2.0 < baseline < math.log(259)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (
      {"source": "hf"},
      r"data.source='hf' is not one of \('embedded', 'tfds', 'instructions'\)",
    ),
    ({"seq_len": 0}, "data.seq_len=0 must be > 0"),
    ({"batch_size": -2}, "data.batch_size=-2 must be > 0"),
    ({"seq_len": "64"}, "data.seq_len='64' must be a positive integer"),
    ({"seq_len": 10_000}, "data.seq_len=10000 exceeds"),
    ({"domains": ("code", "poetry")}, "unknown domain 'poetry'"),
    ({"domains": ("code",), "max_code_bytes": 0}, "no train documents"),
    ({"validation_fraction": 0.0}, r"validation_fraction=0.0 must be in"),
    ({"source": "tfds", "tfds_name": ""}, "needs data.tfds_name"),
  ],
)
def test_bad_config_is_a_clear_error(make_config, overrides, message):
  with pytest.raises(ValueError, match=message):
    data.create_train_iterator(make_config(**overrides), seed=0)


def test_seed_must_be_an_integer(make_config):
  with pytest.raises(ValueError, match="seed=0.5"):
    data.create_train_iterator(make_config(), seed=0.5)


def _fake_chatterbot(root, num_files):
  package = root / "chatterbot_corpus"
  for language, hello in (("english", "Hello"), ("german", "Hallo")):
    (package / "data" / language).mkdir(parents=True)
    for i in range(num_files):
      (package / "data" / language / f"t{i}.yml").write_text(
        f"conversations:\n- - {hello} number {i}\n  - Fine, thanks.\n",
        encoding="utf-8",
      )
  (package / "__init__.py").write_text("")
  return str(root)


def test_dialog_domain_end_to_end(make_config, tmp_path, monkeypatch):
  pytest.importorskip("yaml")
  monkeypatch.syspath_prepend(_fake_chatterbot(tmp_path / "site", 15))
  monkeypatch.delitem(sys.modules, "chatterbot_corpus", raising=False)
  config = make_config(
    domains=("dialog",), validation_fraction=0.3, data_dir=str(tmp_path)
  )
  batch = next(data.create_train_iterator(config, seed=0))
  assert set(batch["domain"].tolist()) == {corpus.DOMAINS.index("dialog")}
  text = tokenizer.decode(data.create_eval_batches(config)[0]["inputs"][0])
  assert "number" in text and ("Hello" in text or "Hallo" in text)


def test_dialog_requested_but_not_installed(make_config, monkeypatch):
  monkeypatch.setitem(sys.modules, "chatterbot_corpus", None)
  with pytest.raises(ImportError, match=r"pip install -e \.\[multilingual\]"):
    data.create_train_iterator(make_config(domains=("dialog",)), seed=0)


# ---- source="tfds": a tiny prepared dataset stands in for lm1b ------------


class _NoBucketInfo(tfds.core.DatasetInfo):
  def initialize_from_bucket(self):  # would leave an empty /tmp/tmp*tfds
    pass


class TinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Two splits of short texts, as lm1b has."""

  VERSION = tfds.core.Version("1.0.0")
  TEXTS = {
    "train": ["ab"],
    "test": ["ab", "x" * 100],
  }

  def _info(self):
    return _NoBucketInfo(
      builder=self,
      features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(t) for s, t in self.TEXTS.items()}

  def _generate_examples(self, texts):
    for i, text in enumerate(texts):
      yield i, {"text": text}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tiny"))
  TinyText(data_dir=root, file_format="array_record").download_and_prepare()
  return root


@pytest.fixture
def tfds_config(make_config, tiny_dir):
  def make(**overrides):
    tiny = dict(source="tfds", tfds_name="tiny_text", data_dir=tiny_dir)
    return make_config(**{**tiny, "seq_len": 8, **overrides})

  return make


def test_tfds_source_one_window_per_record(tfds_config):
  config = tfds_config(batch_size=2)
  batch = next(data.create_train_iterator(config, seed=0))
  # "ab" -> BOS a b EOS = 1, 100, 101, 2: inputs 1 100 101, targets 100 101 2.
  np.testing.assert_array_equal(
    batch["inputs"][0], [1, 100, 101, 0, 0, 0, 0, 0]
  )
  np.testing.assert_array_equal(
    batch["targets"][0], [100, 101, 2, 0, 0, 0, 0, 0]
  )
  np.testing.assert_array_equal(batch["mask"][0], [1, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(batch["domain"], [-1, -1])
  # The 100-byte text is cut to its first L + 1 = 9 tokens.
  eval_batches = data.create_eval_batches(
    tfds_config(eval_batch_size=2, num_eval_batches=1)
  )
  long_row = eval_batches[0]["targets"][1]
  np.testing.assert_array_equal(long_row, [ord("x") + 3] * 8)
  assert eval_batches[0]["mask"][1].sum() == 8


def test_tfds_unigram_baseline_by_hand(tfds_config):
  # Train targets of "ab": a, b, EOS -> each count 1, N = 3, V = 259:
  # p(a) = p(b) = p(EOS) = (1 + 1) / (3 + 259) = 1/131, p("x") = 1/262.
  # Evaluation alternates "ab" (3 targets at 1/131) and "x"*100 (8 targets
  # at 1/262): CE = (3 log 131 + 8 log 262) / 11.
  config = tfds_config(eval_batch_size=2, num_eval_batches=2)
  expected = (3 * math.log(131) + 8 * math.log(262)) / 11
  assert data.unigram_baseline(config) == pytest.approx(expected, rel=1e-12)


def test_tfds_resume(tfds_config):
  config = tfds_config(batch_size=1)
  it = data.create_train_iterator(config, seed=0)
  next(it)
  resumed = data.create_train_iterator(config, seed=0)
  resumed.set_state(it.get_state())
  np.testing.assert_array_equal(next(resumed)["inputs"], next(it)["inputs"])


def test_tfds_errors(tfds_config, tiny_dir, tmp_path):
  with pytest.raises(
    ValueError, match="'lm1b' is not prepared.*never downloads"
  ):
    data.create_train_iterator(tfds_config(tfds_name="lm1b"), seed=0)
  with pytest.raises(ValueError, match=r"'body' is not a feature.*\['text'\]"):
    data.create_train_iterator(tfds_config(tfds_text_key="body"), seed=0)
  with pytest.raises(ValueError, match="split 'validation' is not in"):
    data.create_eval_batches(tfds_config(tfds_eval_split="validation"))
  # The same files, declared as tfrecord (what tfds.load prepares).
  copy = tmp_path / "tiny_text" / "1.0.0"
  copy.mkdir(parents=True)
  source = os.path.join(tiny_dir, "tiny_text", "1.0.0")
  for name in os.listdir(source):
    text = pathlib.Path(source, name).read_bytes()
    if name == "dataset_info.json":
      text = text.replace(b'"array_record"', b'"tfrecord"')
    (copy / name).write_bytes(text)
  with pytest.raises(ValueError, match="prepared as tfrecord.*array_record"):
    data.create_train_iterator(tfds_config(data_dir=str(tmp_path)), seed=0)


class OddText(TinyText, skip_registration=True):
  """An empty text, bytes that are not UTF-8, a 2-byte character."""

  TEXTS = {"train": ["", b"\xff\xfe\x00\xc3", "\u00e9"], "test": [""]}


def test_empty_and_non_utf8_texts_are_tokens_not_errors(make_config, tmp_path):
  """Documented handling: an empty text is one window BOS -> EOS (one real
  target, so a batch never has an all-zero mask from it); bytes that are
  not UTF-8 are byte tokens like any other (id = byte + 3)."""
  OddText(
    data_dir=str(tmp_path), file_format="array_record"
  ).download_and_prepare()
  config = make_config(
    source="tfds",
    tfds_name="odd_text",
    data_dir=str(tmp_path),
    seq_len=8,
    batch_size=3,
    eval_batch_size=2,
    num_eval_batches=1,
  )
  batch = next(data.create_train_iterator(config, seed=0))
  rows = sorted(
    tuple(int(t) for t, m in zip(targets, mask) if m)
    for targets, mask in zip(batch["targets"], batch["mask"])
  )
  assert rows == [
    (2,),  # ""
    (0xC3 + 3, 0xA9 + 3, 2),  # "é" in UTF-8
    (0xFF + 3, 0xFE + 3, 0x00 + 3, 0xC3 + 3, 2),
  ]
  (eval_batch,) = data.create_eval_batches(config)
  np.testing.assert_array_equal(eval_batch["mask"].sum(axis=1), [1, 1])
  assert np.isfinite(data.unigram_baseline(config))
