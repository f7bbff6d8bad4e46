"""Tests for moe_jax.data.corpus: what the embedded corpus holds, and splits."""

import os
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moe_jax.data import corpus


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def fake_stdlib(tmp_path_factory):
  """A small library tree: 4 real modules, plus folders that must be skipped."""
  root = tmp_path_factory.mktemp("fake_stdlib") / "lib"
  _write(root / "a.py", "a = 1\n" * 10)  # 60 bytes
  _write(root / "pkg" / "__init__.py", "")  # empty: skipped
  _write(root / "pkg" / "b.py", "b = 2\n" * 20)  # 120 bytes
  _write(root / "pkg" / "c.py", "# c\n" * 5)  # 20 bytes
  _write(root / "z.py", "z = 'ü'\n")  # 9 bytes (ü is 2 bytes)
  _write(root / "notes.txt", "not python")
  for skipped in (
    "test",
    "pkg/tests",
    "idlelib",
    "site-packages",
    "pydoc_data",
    "turtledemo",
  ):
    _write(root / skipped / "x.py", "x = 0\n")
  return str(root)


def test_code_documents_skip_tests_and_empty_files(fake_stdlib):
  docs = corpus.code_documents(10_000, root=fake_stdlib)
  assert [d.doc_id for d in docs] == [
    "code/a.py",
    "code/pkg/b.py",
    "code/pkg/c.py",
    "code/z.py",
  ]
  assert {(d.domain, d.language) for d in docs} == {("code", "python")}
  assert docs[-1].text == "z = 'ü'\n"


@given(st.integers(0, 250), st.integers(0, 250))
def test_code_cap_is_respected_and_monotonic(fake_stdlib, cap_a, cap_b):
  small, large = sorted([cap_a, cap_b])
  docs_small = corpus.code_documents(small, root=fake_stdlib)
  docs_large = corpus.code_documents(large, root=fake_stdlib)
  assert sum(len(d.text.encode()) for d in docs_small) <= small
  # A larger cap only adds files; cap 209 (= 60 + 120 + 20 + 9) takes all.
  assert {d.doc_id for d in docs_small} <= {d.doc_id for d in docs_large}
  if large >= 209:
    assert len(docs_large) == 4


def test_code_documents_reject_negative_cap():
  with pytest.raises(ValueError, match="max_code_bytes=-1"):
    corpus.code_documents(-1)


def test_real_stdlib_code_is_capped_and_has_no_tests():
  docs = corpus.code_documents(300_000)
  sizes = [len(d.text.encode("utf-8")) for d in docs]
  assert 0 < sum(sizes) <= 300_000
  assert len(docs) >= 5
  for doc in docs:
    assert doc.doc_id.startswith("code/") and doc.doc_id.endswith(".py")
    parts = doc.doc_id.split("/")
    assert not {"test", "tests", "idlelib", "pydoc_data"} & set(parts)
  assert docs == corpus.code_documents(300_000)  # deterministic


def test_prose_documents_are_the_reference_topics():
  docs = corpus.prose_documents()
  ids = [d.doc_id for d in docs]
  assert len(docs) > 50 and len(set(ids)) == len(ids) and ids == sorted(ids)
  by_id = {d.doc_id: d for d in docs}
  assert "assert" in by_id["prose/assert"].text
  assert {(d.domain, d.language) for d in docs} == {("prose", "en")}


def test_canonical_domains():
  assert corpus.canonical_domains(["prose", "code", "prose"]) == (
    "code",
    "prose",
  )
  assert corpus.canonical_domains("dialog, code") == ("code", "dialog")
  with pytest.raises(ValueError, match="unknown domain 'poetry'"):
    corpus.canonical_domains(("code", "poetry"))
  with pytest.raises(ValueError, match="domains is empty"):
    corpus.canonical_domains(())


def test_split_of_fraction_and_stability():
  ids = [f"doc/{i}" for i in range(4000)]
  at_05 = {i for i in ids if corpus.split_of(i, 0.05) == corpus.VALIDATION}
  at_20 = {i for i in ids if corpus.split_of(i, 0.2) == corpus.VALIDATION}
  # Binomial(4000, 0.05): mean 200, sd ~14.
  assert 140 < len(at_05) < 260
  assert 680 < len(at_20) < 920
  # Raising the fraction only moves documents into validation.
  assert at_05 <= at_20
  assert all(corpus.split_of(i, 0.05) == corpus.split_of(i, 0.05) for i in ids)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 2])
def test_split_of_rejects_bad_fraction(fraction):
  with pytest.raises(ValueError, match="validation_fraction"):
    corpus.split_of("x", fraction)


def test_fingerprint_changes_with_text_and_options():
  docs = [corpus.Document("prose/x", "prose", "en", "hello")]
  base = corpus.fingerprint(docs, 1)
  assert base == corpus.fingerprint(list(docs), 1)
  assert base != corpus.fingerprint(docs, 2)
  other = [corpus.Document("prose/x", "prose", "en", "hello!")]
  assert base != corpus.fingerprint(other, 1)
  # Field boundaries count: ("ab", "c") differs from ("a", "bc").
  assert corpus.fingerprint(
    [corpus.Document("ab", "c", "x", "")]
  ) != corpus.fingerprint([corpus.Document("a", "bc", "x", "")])


# ---- dialog (chatterbot-corpus), with a fake package ----------------------


def make_fake_chatterbot(root, num_files_per_language=1):
  """Writes a chatterbot_corpus package with english and german YAML files."""
  package = root / "chatterbot_corpus"
  _write(package / "__init__.py", "")
  for language, (hello, reply) in {
    "english": ("Hello", "Hi there"),
    "german": ("Hallo", "Grüß dich"),
  }.items():
    for i in range(num_files_per_language):
      _write(
        package / "data" / language / f"topic{i:02d}.yml",
        "categories:\n- greetings\nconversations:\n"
        f"- - {hello} {i}\n  - {reply}\n- - How are you?\n  - Fine.\n",
      )
  _write(package / "data" / "english" / "README.md", "not yaml")
  return str(root)


@pytest.fixture
def fake_chatterbot(tmp_path, monkeypatch):
  root = make_fake_chatterbot(tmp_path / "site")
  monkeypatch.syspath_prepend(root)
  monkeypatch.delitem(sys.modules, "chatterbot_corpus", raising=False)
  return root


def test_dialog_documents_from_yaml(fake_chatterbot):
  pytest.importorskip("yaml")
  docs = corpus.dialog_documents()
  assert [(d.doc_id, d.language) for d in docs] == [
    ("dialog/english/topic00", "english"),
    ("dialog/german/topic00", "german"),
  ]
  assert docs[1].text == "Hallo 0\nGrüß dich\n\nHow are you?\nFine."
  assert all(d.domain == "dialog" for d in docs)
  assert os.path.dirname(sys.modules["chatterbot_corpus"].__file__).startswith(
    fake_chatterbot
  )


def test_dialog_without_package_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "chatterbot_corpus", None)
  with pytest.raises(ImportError, match=r"pip install -e \.\[multilingual\]"):
    corpus.load_documents(("prose", "dialog"), 0)


def test_code_documents_read_binary_and_non_utf8_files(tmp_path):
  """A .py file of binary garbage or Latin-1 bytes is read, not an error:
  each byte that is not UTF-8 becomes U+FFFD (documented handling)."""
  (tmp_path / "latin1.py").write_bytes(b"caf\xe9 = 1\n")
  (tmp_path / "garbage.py").write_bytes(b"\x00\xff\x80ok")
  docs = {d.doc_id: d.text for d in corpus.code_documents(100, root=tmp_path)}
  assert docs == {
    "code/garbage.py": "\x00\ufffd\ufffdok",
    "code/latin1.py": "caf\ufffd = 1\n",
  }
