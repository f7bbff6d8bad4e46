"""Tests for moe_jax.data.tfds_builder: records, config names, preparation."""

import collections
import os
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moe_jax.data import corpus, tfds_builder

DOMAINS = ("code", "prose")
MAX_CODE_BYTES = 60_000
FRACTION = 0.1


@given(st.text(), st.integers(4, 40))
def test_chunk_text_cuts_on_character_boundaries(text, max_bytes):
  pieces = tfds_builder.chunk_text(text, max_bytes)
  assert "".join(pieces) == text
  assert all(0 < len(p.encode("utf-8")) <= max_bytes for p in pieces)


def test_chunk_text_by_hand():
  # "aé€" is 1 + 2 + 3 bytes; a 4-byte cut would split the euro sign.
  assert tfds_builder.chunk_text("aé€", 4) == ["aé", "€"]
  assert tfds_builder.chunk_text("", 4) == []
  with pytest.raises(ValueError, match="max_bytes=3"):
    tfds_builder.chunk_text("abc", 3)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builder = tfds_builder.prepared_corpus_builder(
    DOMAINS, MAX_CODE_BYTES, FRACTION, data_dir
  )
  return builder, data_dir


def test_records_reassemble_every_document(prepared):
  builder, _ = prepared
  documents = corpus.load_documents(DOMAINS, MAX_CODE_BYTES)
  for split in (corpus.TRAIN, corpus.VALIDATION):
    chunks = collections.defaultdict(list)
    for record in builder.as_data_source(split=split):
      assert len(record["text"]) <= tfds_builder.RECORD_BYTES
      chunks[record["doc_id"].decode()].append(record)
    expected = {
      d.doc_id: d
      for d in documents
      if corpus.split_of(d.doc_id, FRACTION) == split
    }
    assert set(chunks) == set(expected) and expected
    for doc_id, records in chunks.items():
      doc = expected[doc_id]
      assert [r["chunk_index"] for r in records] == list(range(len(records)))
      assert {r["num_chunks"] for r in records} == {len(records)}
      assert b"".join(r["text"] for r in records).decode() == doc.text
      assert corpus.DOMAINS[records[0]["domain"]] == doc.domain
      assert records[0]["language"].decode() == doc.language


def test_config_name_tracks_python_and_options(prepared):
  builder, data_dir = prepared
  name = builder.builder_config.name
  python = "".join(map(str, sys.version_info[:3]))
  assert name.startswith(f"code_prose_py{python}_{MAX_CODE_BYTES}b_val0100_")
  again = tfds_builder.corpus_builder(
    DOMAINS, MAX_CODE_BYTES, FRACTION, data_dir
  )
  assert again.builder_config.name == name and again.is_prepared()
  other = tfds_builder.corpus_builder(
    DOMAINS, MAX_CODE_BYTES + 1, FRACTION, data_dir
  )
  assert other.builder_config.name != name and not other.is_prepared()


def test_reads_back_without_the_builder_class(prepared):
  builder, _ = prepared
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  read_only = tfds.builder_from_directory(builder.data_dir)
  records = read_only.as_data_source(split="validation")
  assert len(records) == builder.info.splits["validation"].num_examples > 0
  assert read_only.info.file_format.value == "array_record"


def test_failed_preparation_is_not_used(tmp_path, monkeypatch):
  data_dir = str(tmp_path)
  builder = tfds_builder.corpus_builder(("prose",), 0, 0.2, data_dir)
  version_root = os.path.dirname(builder.data_dir)
  # Leftover of a preparation killed earlier (TFDS's temporary folder name).
  os.makedirs(os.path.join(version_root, "incomplete.XYZ_1.0.0"))
  original = tfds_builder.MoeJaxCorpus._generate_examples

  def crash_midway(self, documents):
    for i, example in enumerate(original(self, documents)):
      if i == 5:
        raise RuntimeError("disk full")
      yield example

  monkeypatch.setattr(
    tfds_builder.MoeJaxCorpus, "_generate_examples", crash_midway
  )
  with pytest.raises(RuntimeError, match="disk full"):
    builder.download_and_prepare()
  assert not builder.is_prepared()
  assert not os.path.exists(builder.data_dir)

  monkeypatch.setattr(tfds_builder.MoeJaxCorpus, "_generate_examples", original)
  fresh = tfds_builder.prepared_corpus_builder(("prose",), 0, 0.2, data_dir)
  assert fresh.is_prepared()
  total = sum(s.num_examples for s in fresh.info.splits.values())
  num_docs = len(corpus.prose_documents())
  assert total >= num_docs


def test_empty_split_is_a_clear_error(tmp_path):
  with pytest.raises(
    ValueError, match=r"no train documents.*domains=\('code',\)"
  ):
    tfds_builder.corpus_builder(("code",), 0, 0.05, str(tmp_path))


def test_default_data_dir():
  assert tfds_builder.resolve_data_dir("") == os.path.expanduser(
    "~/.cache/moe_jax/tensorflow_datasets"
  )
  assert tfds_builder.resolve_data_dir("/x/y") == "/x/y"
