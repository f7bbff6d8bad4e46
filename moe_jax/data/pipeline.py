"""Input pipeline: batches of byte-token windows, deterministic and resumable.

Dimensions: B batch, L sequence length (`config.data.seq_len`), V vocabulary.

Each example is a window of L + 1 tokens cut into

  inputs   int32   [L]  tokens 0 .. L-1 of the window
  targets  int32   [L]  tokens 1 .. L (next-token targets)
  mask     float32 [L]  1 where the target is a real token, 0 on padding
  domain   int32   []   index into corpus.DOMAINS; -1 for TFDS corpora

and padded positions have inputs = targets = PAD = 0.

Windows never cross a record, so the model never attends across documents:

* Embedded corpus (`source="embedded"`): a record is a chunk of <= 8 KiB of
  one document (see tfds_builder), tokenised as [BOS] bytes [EOS], with BOS
  only on a document's first chunk and EOS only on its last. Its windows
  start at 0, L, 2L, ... so every token after the first is the target of
  exactly one window; the last window of a record is padded (mask 0).
* Instructions (`source="instructions"`): each example of
  `moe_jax.data.instructions` (tasks `data.instruction_tasks`, cut from the
  embedded corpus' documents) gives one window, [BOS] instruction response
  [EOS], padded; mask = 1 on the response's targets only, so the loss (and
  the eval loss) is the response's. Examples whose instruction does not fit
  are left out (`instructions.fits`).
* TFDS corpus (`source="tfds"`): each record of an already prepared dataset
  gives one window, the first L + 1 tokens of [BOS] text [EOS], padded.
  Suited to sentence-level corpora such as lm1b; longer documents are cut.

Training: `grain.MapDataset.source(windows).seed(seed).shuffle().repeat()
.map(read).batch(B)`, run in this process (no worker processes). Each epoch
is a fresh permutation derived from (seed, epoch); the iterator's state is
the number of batches consumed, so `set_state` resumes exactly.

Evaluation: a fixed list of batches whose windows are evenly spaced over the
validation split (they wrap around if the split has fewer windows).
"""

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np
import tensorflow_datasets as tfds

from moe_jax.data import corpus, instructions, tfds_builder, tokenizer

SOURCES = ("embedded", "tfds", "instructions")
TFDS_DOMAIN_ID = -1
# TFDS corpora: the unigram baseline counts at most this many training
# records, evenly spaced (lm1b has 30M).
UNIGRAM_MAX_RECORDS = 20_000
_READ_BLOCK = 512  # records per batched read when indexing a split
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


class _Split(NamedTuple):
  """One split as grain sees it.

  Attributes:
    name: identifies the data, for checkpoint checks.
    keys: random-access source with one key per window (the grain source).
    to_example: maps a key to an example dict (the grain map).
    target_counts: returns int64 [V] counts of the split's target tokens.
  """

  name: str
  keys: Sequence[Any]
  to_example: Callable[[Any], dict]
  target_counts: Callable[[], np.ndarray]


def _window_example(tokens_T: np.ndarray, start: int, seq_len: int, domain):
  """Cuts tokens[start : start + L + 1] into inputs/targets/mask, padded."""
  window = tokens_T[start : start + seq_len + 1]
  n = max(len(window) - 1, 0)
  inputs_L = np.zeros(seq_len, np.int32)
  targets_L = np.zeros(seq_len, np.int32)
  mask_L = np.zeros(seq_len, np.float32)
  inputs_L[:n] = window[:n]
  targets_L[:n] = window[1 : n + 1]
  mask_L[:n] = 1.0
  return {
    "inputs": inputs_L,
    "targets": targets_L,
    "mask": mask_L,
    "domain": np.int32(domain),
  }


def _stack(examples: Sequence[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _check_positive_int(data_config, field: str) -> int:
  value = getattr(data_config, field)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"data.{field}={value!r} must be a positive integer")
  if value <= 0:
    raise ValueError(f"data.{field}={value} must be > 0")
  return int(value)


def check_config(data_config) -> None:
  """Raises ValueError on a bad key of `config.data` (the source, the
  sizes, seq_len against the embedded corpus's records, the instruction
  tasks); reads no data."""
  if data_config.source not in SOURCES:
    raise ValueError(
      f"data.source={data_config.source!r} is not one of {SOURCES}"
    )
  for field in ("seq_len", "batch_size", "eval_batch_size", "num_eval_batches"):
    _check_positive_int(data_config, field)
  if data_config.source == "instructions":
    instructions.canonical_tasks(data_config.instruction_tasks)
  if (
    data_config.source == "embedded"
    and data_config.seq_len > tfds_builder.RECORD_BYTES
  ):
    raise ValueError(
      f"data.seq_len={data_config.seq_len} exceeds the embedded corpus record "
      f"size of {tfds_builder.RECORD_BYTES} bytes; windows never cross "
      "records, so use seq_len <= that"
    )


# ---- embedded corpus -------------------------------------------------------


def _record_tokens(record: dict) -> np.ndarray:
  """[BOS] on a document's first chunk, [EOS] on its last."""
  return tokenizer.encode(
    record["text"],
    bos=record["chunk_index"] == 0,
    eos=record["chunk_index"] == record["num_chunks"] - 1,
  )


def _read_all(records) -> list[dict]:
  out = []
  for start in range(0, len(records), _READ_BLOCK):
    stop = min(start + _READ_BLOCK, len(records))
    out.extend(records.__getitems__(list(range(start, stop))))
  return out


class _EmbeddedWindow:
  """Reads one window of a record by random access."""

  def __init__(self, records, seq_len: int):
    self._records = records
    self._seq_len = seq_len

  def __call__(self, key_2: np.ndarray) -> dict:
    record = self._records[int(key_2[0])]
    return _window_example(
      _record_tokens(record), int(key_2[1]), self._seq_len, record["domain"]
    )


def _embedded_split(data_config, split: str) -> _Split:
  builder = tfds_builder.prepared_corpus_builder(
    data_config.domains,
    data_config.max_code_bytes,
    data_config.validation_fraction,
    data_config.data_dir,
  )
  records = builder.as_data_source(split=split)
  seq_len = data_config.seq_len
  # The grain source: (record index, first token) of every window, [W, 2].
  keys_W2 = [np.zeros((0, 2), np.int64)]
  for index, record in enumerate(_read_all(records)):
    num_tokens = len(_record_tokens(record))
    # Windows start every L tokens while a target remains.
    starts = np.arange(0, num_tokens - 1, seq_len)
    keys_W2.append(np.stack([np.full(len(starts), index), starts], axis=1))

  def target_counts() -> np.ndarray:
    counts_V = np.zeros(tokenizer.VOCAB_SIZE, np.int64)
    for record in _read_all(records):
      counts_V += np.bincount(
        _record_tokens(record)[1:], minlength=tokenizer.VOCAB_SIZE
      )
    return counts_V

  return _Split(
    name=f"embedded/{builder.builder_config.name}/{split}",
    keys=np.concatenate(keys_W2),
    to_example=_EmbeddedWindow(records, seq_len),
    target_counts=target_counts,
  )


# ---- instructions ----------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _instruction_examples(
  tasks: tuple, max_code_bytes: int, validation_fraction: float
) -> dict:
  """The split examples of `tasks` (built once per process: ~2 s for 4 MB
  of code)."""
  docs = corpus.load_documents(instructions.domains_of(tasks), max_code_bytes)
  return instructions.split_examples(
    instructions.build_examples(docs, tasks), validation_fraction
  )


class _InstructionWindow:
  """Key (an index into the split's fitting examples) -> window."""

  def __init__(self, examples, seq_len: int):
    self._examples = examples
    self._seq_len = seq_len

  def __call__(self, key) -> dict:
    return instructions.window(self._examples[int(key)], self._seq_len)


def _instruction_split(data_config, split: str) -> _Split:
  tasks = instructions.canonical_tasks(data_config.instruction_tasks)
  seq_len = data_config.seq_len
  examples = [
    ex
    for ex in _instruction_examples(
      tasks, data_config.max_code_bytes, data_config.validation_fraction
    )[split]
    if instructions.fits(ex, seq_len)
  ]
  to_example = _InstructionWindow(examples, seq_len)

  def target_counts() -> np.ndarray:  # the response targets only
    counts_V = np.zeros(tokenizer.VOCAB_SIZE, np.int64)
    for index in range(len(examples)):
      w = to_example(index)
      counts_V += np.bincount(
        w["targets"][w["mask"] > 0], minlength=tokenizer.VOCAB_SIZE
      )
    return counts_V

  identity = corpus.fingerprint(
    [],
    tasks,
    data_config.max_code_bytes,
    data_config.validation_fraction,
    seq_len,
  )[:16]
  return _Split(
    name=f"instructions/{'+'.join(tasks)}/{identity}/{split}",
    keys=np.arange(len(examples)),
    to_example=to_example,
    target_counts=target_counts,
  )


# ---- prepared TFDS corpus --------------------------------------------------


def _tfds_version_dir(name: str, data_dir: str) -> str:
  """The prepared folder of `name` ("lm1b", "c4/en", "lm1b:1.1.0")."""
  base, _, version = name.partition(":")
  root = os.path.join(data_dir, *base.split("/"))
  found = []
  if os.path.isdir(root):
    names = [version] if version else os.listdir(root)
    found = [
      v
      for v in names
      if tfds.core.Version.is_valid(v)
      and os.path.isfile(os.path.join(root, v, "dataset_info.json"))
    ]
  if not found:
    there = sorted(os.listdir(root)) if os.path.isdir(root) else []
    raise ValueError(
      f"data.tfds_name={name!r} is not prepared in data.data_dir="
      f"{data_dir!r} (looked for {root}/<version>/dataset_info.json; found "
      f"{there or 'nothing'}). moe_jax never downloads: prepare it first, "
      f"e.g. tfds.builder({base!r}, data_dir={data_dir!r})"
      ".download_and_prepare(file_format='array_record'), and name a config "
      "if the dataset has several (e.g. 'c4/en')"
    )
  return os.path.join(root, max(found, key=tfds.core.Version))


class _TfdsWindow:
  """One record -> one window: the first L + 1 tokens of [BOS] text [EOS]."""

  def __init__(self, text_key: str, seq_len: int):
    self._text_key = text_key
    self._seq_len = seq_len

  def tokens(self, record: dict) -> np.ndarray:
    tokens_T = tokenizer.encode(record[self._text_key], bos=True, eos=True)
    return tokens_T[: self._seq_len + 1]

  def __call__(self, record: dict) -> dict:
    return _window_example(
      self.tokens(record), 0, self._seq_len, TFDS_DOMAIN_ID
    )


def _tfds_split(data_config, split: str) -> _Split:
  name = data_config.tfds_name
  if not name:
    raise ValueError('data.source="tfds" needs data.tfds_name, e.g. "lm1b"')
  data_dir = tfds_builder.resolve_data_dir(data_config.data_dir)
  builder = tfds.builder_from_directory(_tfds_version_dir(name, data_dir))
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
      f"{name!r} in {data_dir!r} was prepared as "
      f"{builder.info.file_format.value}; random access needs array_record: "
      "prepare it again with download_and_prepare(file_format="
      "'array_record') into another data_dir"
    )
  text_key = data_config.tfds_text_key
  if text_key not in builder.info.features:
    raise ValueError(
      f"data.tfds_text_key={text_key!r} is not a feature of {name!r}; its "
      f"features are {sorted(builder.info.features)}"
    )
  try:
    builder.info.splits[split]
  except (KeyError, ValueError) as e:
    raise ValueError(
      f"split {split!r} is not in {name!r}; its splits are "
      f"{sorted(builder.info.splits)}"
    ) from e
  records = builder.as_data_source(split=split)
  window = _TfdsWindow(text_key, data_config.seq_len)

  def target_counts() -> np.ndarray:
    num = min(len(records), UNIGRAM_MAX_RECORDS)
    indices = [i * len(records) // num for i in range(num)]
    counts_V = np.zeros(tokenizer.VOCAB_SIZE, np.int64)
    for start in range(0, num, _READ_BLOCK):
      for record in records.__getitems__(indices[start : start + _READ_BLOCK]):
        counts_V += np.bincount(
          window.tokens(record)[1:], minlength=tokenizer.VOCAB_SIZE
        )
    return counts_V

  return _Split(
    name=f"tfds/{builder.info.full_name}/{split}",
    keys=records,
    to_example=window,
    target_counts=target_counts,
  )


def _open_split(data_config, which: str) -> _Split:
  """which: corpus.TRAIN or corpus.VALIDATION."""
  if data_config.source == "embedded":
    split = _embedded_split(data_config, which)
  elif data_config.source == "instructions":
    split = _instruction_split(data_config, which)
  else:
    split = _tfds_split(
      data_config,
      data_config.tfds_train_split
      if which == corpus.TRAIN
      else data_config.tfds_eval_split,
    )
  if not len(split.keys):
    raise ValueError(f"the {which} split {split.name} holds no windows")
  return split


# ---- public API ------------------------------------------------------------


class TrainIterator:
  """Infinite iterator over training batches; its position is checkpointable.

  `get_state()` returns a small JSON-serialisable dict; after `set_state` on a
  fresh iterator built from the same config and seed, the iterator yields
  exactly the batches the original would have yielded next.
  """

  def __init__(self, split: _Split, seed: int, batch_size: int, seq_len: int):
    self.windows_per_epoch = len(split.keys)
    self._identity = {
      "dataset": split.name,
      "seed": seed,
      "batch_size": batch_size,
      "seq_len": seq_len,
    }
    dataset = (
      grain.MapDataset.source(split.keys)
      .seed(seed % 2**32)
      .shuffle()
      .repeat()
      .map(split.to_example)
      .batch(batch_size, drop_remainder=True)
    )
    self._iterator = iter(dataset.to_iter_dataset(_READ_OPTIONS))

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict:
    return next(self._iterator)

  def get_state(self) -> dict:
    return {**self._identity, "grain": self._iterator.get_state()}

  def set_state(self, state: dict) -> None:
    """Moves to the position saved by `get_state` (same data and options)."""
    if not isinstance(state, dict) or "grain" not in state:
      raise ValueError(
        f"state={state!r:.200} is not a TrainIterator.get_state() dict"
      )
    for key, value in self._identity.items():
      if state.get(key) != value:
        raise ValueError(
          f"cannot resume: the saved data state has {key}={state.get(key)!r} "
          f"but this iterator has {key}={value!r}"
        )
    self._iterator.set_state(state["grain"])


def create_train_iterator(data_config, seed: int) -> TrainIterator:
  """Infinite, shuffled, resumable iterator over training batches.

  Args:
    data_config: the `config.data` block (see configs/base.py).
    seed: run seed; sets the order of windows in every epoch.

  Returns:
    A TrainIterator whose `next()` gives inputs/targets int32 [B, L],
    mask float32 [B, L] and domain int32 [B], B = data_config.batch_size.
  """
  check_config(data_config)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f"seed={seed!r} must be an integer")
  split = _open_split(data_config, corpus.TRAIN)
  return TrainIterator(
    split, int(seed), data_config.batch_size, data_config.seq_len
  )


def create_eval_batches(data_config) -> list[dict]:
  """The fixed list of validation batches (same keys as training batches).

  Args:
    data_config: the `config.data` block.

  Returns:
    data_config.num_eval_batches dicts of arrays with B = eval_batch_size;
    the same list on every call, machine and seed.
  """
  check_config(data_config)
  split = _open_split(data_config, corpus.VALIDATION)
  batch_size = data_config.eval_batch_size
  needed = data_config.num_eval_batches * batch_size
  examples = [
    split.to_example(split.keys[i * len(split.keys) // needed])
    for i in range(needed)
  ]
  return [
    _stack(examples[b : b + batch_size]) for b in range(0, needed, batch_size)
  ]


def unigram_baseline(data_config) -> float:
  """Validation cross-entropy (nats/token) of a unigram byte model.

  p(v) = (count_train(v) + 1) / (N_train + V), add-one smoothing over all V
  token ids, counted over the training split's target tokens; the loss is
  -mean log p(target) over the masked positions of `create_eval_batches`.
  A trained LM must get below this.

  Args:
    data_config: the `config.data` block.

  Returns:
    The cross-entropy in nats per token.
  """
  check_config(data_config)
  counts_V = _open_split(data_config, corpus.TRAIN).target_counts()
  log_probs_V = np.log(counts_V + 1.0) - np.log(
    counts_V.sum() + tokenizer.VOCAB_SIZE
  )
  total, weight = 0.0, 0.0
  for batch in create_eval_batches(data_config):
    total -= float(np.sum(log_probs_V[batch["targets"]] * batch["mask"]))
    weight += float(np.sum(batch["mask"]))
  return total / weight
