"""Tests for moe_jax.data.instructions and the "instructions" source of the
pipeline: each task's format on hand-written documents, the split by
document, the response-only mask, determinism and config errors."""

import importlib.util
import pathlib

import numpy as np
import pytest

from moe_jax import errors, finetune
from moe_jax.data import corpus, instructions, pipeline, tokenizer
from moe_jax.data.instructions import INSTRUCTIONS, Example

_BASE = pathlib.Path(__file__).parents[1] / "configs" / "base.py"

CODE = '''class A:
    def get(self, key):
        """Return the value.

        More text.
        """
        value = self.d[key]
        return value

    def one(self): return 1

def top(x,
        y):
    return x + y
'''

PROSE = (
  "The assert statement is a way to insert checks. It has two forms.\n\n"
  "  Short.\n\n"
  "Another paragraph here, long enough! And more\n   text follows."
)


def _docs():
  return [
    corpus.Document("prose/assert", "prose", "en", PROSE),
    corpus.Document("code/a.py", "code", "python", CODE),
  ]


def test_code_tasks_format_by_hand():
  got = [e for e in instructions.build_examples(_docs(), instructions.TASKS)]
  code = [e for e in got if e.doc_id == "code/a.py"]
  doc = '    """Return the value.\n\n    More text.\n    """'
  body = "    value = self.d[key]\n    return value"
  assert code == [
    # get: body, name, docstring; `one` is a one-line def: skipped
    Example(
      "code_body",
      "code/a.py",
      INSTRUCTIONS["code_body"] + "def get(self, key):\n" + doc + "\n",
      body,
    ),
    Example(
      "code_name",
      "code/a.py",
      INSTRUCTIONS["code_name"] + "value = self.d[key]\nreturn value\n",
      "get",
    ),
    Example(
      "code_docstring",
      "code/a.py",
      INSTRUCTIONS["code_docstring"] + "def get(self, key):\n",
      "Return the value.",
    ),
    # top: a two-line header, no docstring (so no docstring task)
    Example(
      "code_body",
      "code/a.py",
      INSTRUCTIONS["code_body"] + "def top(x,\n        y):\n",
      "    return x + y",
    ),
    Example(
      "code_name",
      "code/a.py",
      INSTRUCTIONS["code_name"] + "return x + y\n",
      "top",
    ),
  ]


def test_prose_tasks_format_by_hand():
  got = instructions.build_examples(_docs(), ("prose_topic", "prose_continue"))
  first = "The assert statement is a way to insert checks."
  assert got == [
    Example(
      "prose_topic",
      "prose/assert",
      INSTRUCTIONS["prose_topic"] + first + "\n",
      "assert",
    ),
    Example(
      "prose_continue",
      "prose/assert",
      INSTRUCTIONS["prose_continue"] + first + "\n",
      "It has two forms.",
    ),
    # "Short." has no sentence with text after it; whitespace collapses
    Example(
      "prose_continue",
      "prose/assert",
      INSTRUCTIONS["prose_continue"] + "Another paragraph here, long enough!\n",
      "And more text follows.",
    ),
  ]


def test_tasks_select_and_validate():
  only = instructions.build_examples(_docs(), "code_name")
  assert [e.response for e in only] == ["get", "top"]
  assert instructions.canonical_tasks(["prose_topic", "code_body"]) == (
    "code_body",
    "prose_topic",
  )
  assert instructions.domains_of(("prose_topic",)) == ("prose",)
  with pytest.raises(ValueError, match="unknown instruction task 'poem'"):
    instructions.canonical_tasks(("poem",))
  with pytest.raises(ValueError, match="is empty"):
    instructions.canonical_tasks(())


def test_window_masks_only_the_response():
  # [BOS] Q : \n a b [EOS]: the response starts at token 4
  ex = Example("code_name", "code/x.py", "Q:\n", "ab")
  tokens, start = instructions.encode(ex)
  assert start == 4 and len(tokens) == 7
  w = instructions.window(ex, 8)
  b = tokenizer.BYTE_OFFSET
  assert w["inputs"].tolist() == [
    1,
    b + 81,
    b + 58,
    b + 10,
    b + 97,
    b + 98,
    0,
    0,
  ]
  assert w["targets"].tolist() == [
    b + 81,
    b + 58,
    b + 10,
    b + 97,
    b + 98,
    2,
    0,
    0,
  ]
  # targets a, b, EOS only
  assert w["mask"].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
  assert int(w["domain"]) == corpus.DOMAINS.index("code")
  # cut at the window's end: targets Q : \n a b, the response's a b
  cut = instructions.window(ex, 5)
  assert cut["mask"].tolist() == [0, 0, 0, 1, 1]


def test_fits_needs_the_instruction_and_some_response():
  # prompt of 10 bytes: start = 11; response of 40 bytes + EOS = 41 targets
  ex = Example("prose_continue", "prose/x", "p" * 9 + "\n", "r" * 40)
  # needs start + 16 <= L + 1, i.e. L >= 26
  assert instructions.fits(ex, 26) and not instructions.fits(ex, 25)
  short = Example("prose_topic", "prose/x", "p" * 9 + "\n", "abc")
  # response + EOS = 4 targets: L >= 14
  assert instructions.fits(short, 14) and not instructions.fits(short, 13)


def test_split_is_by_document():
  docs = corpus.code_documents(150_000) + corpus.prose_documents()
  examples = instructions.build_examples(docs, instructions.TASKS)
  split = instructions.split_examples(examples, 0.2)
  train = {e.doc_id for e in split[corpus.TRAIN]}
  held_out = {e.doc_id for e in split[corpus.VALIDATION]}
  assert train and held_out and not train & held_out
  for doc_id in held_out:
    assert corpus.split_of(doc_id, 0.2) == corpus.VALIDATION
  assert len(split[corpus.TRAIN]) + len(split[corpus.VALIDATION]) == len(
    examples
  )
  assert {e.task for e in examples} == set(instructions.TASKS)
  # the same documents give the same examples
  assert instructions.build_examples(docs, instructions.TASKS) == examples


def _config(**overrides):
  spec = importlib.util.spec_from_file_location("_base", _BASE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_base_config()
  config.data.source = "instructions"
  config.data.max_code_bytes = 150_000
  config.data.batch_size = 4
  config.data.eval_batch_size = 4
  config.data.num_eval_batches = 2
  for key, value in overrides.items():
    config.data[key] = value
  return config


def test_pipeline_batches_are_deterministic_and_masked():
  config = _config(instruction_tasks=("code_name", "prose_topic"))
  batch = next(pipeline.create_train_iterator(config.data, 3))
  again = next(pipeline.create_train_iterator(config.data, 3))
  for key in batch:
    np.testing.assert_array_equal(batch[key], again[key])
  other = next(pipeline.create_train_iterator(config.data, 4))
  assert not np.array_equal(batch["inputs"], other["inputs"])
  # every row: the masked targets decode to a response of the train split
  train = instructions.split_examples(
    instructions.build_examples(
      corpus.load_documents(("code", "prose"), 150_000),
      ("code_name", "prose_topic"),
    ),
    config.data.validation_fraction,
  )[corpus.TRAIN]
  responses = {e.response for e in train}
  for targets, mask in zip(batch["targets"], batch["mask"]):
    ids = targets[mask > 0]
    assert ids[-1] == tokenizer.EOS_ID  # names are short: never cut
    assert tokenizer.decode(ids[:-1]) in responses
  evals = pipeline.create_eval_batches(config.data)
  assert len(evals) == 2 and evals[0]["mask"].sum() > 0


def test_bad_tasks_are_config_errors():
  config = _config(instruction_tasks=("code_body", "haiku"))
  with pytest.raises(errors.ConfigError, match="unknown instruction task"):
    finetune.check_config(config)
  with pytest.raises(ValueError, match="allowed tasks are"):
    pipeline.create_eval_batches(config.data)
  config.data.source = "instruction"
  with pytest.raises(ValueError, match="is not one of"):
    pipeline.create_eval_batches(config.data)
