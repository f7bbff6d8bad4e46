"""TFDS builder that stores the embedded corpus as ArrayRecord files.

A record is a chunk of at most RECORD_BYTES bytes of one document, cut on a
UTF-8 character boundary, with the fields

  text         the chunk (str)
  domain       index into corpus.DOMAINS (ClassLabel)
  language     "python", "en" or the chatterbot-corpus language
  doc_id       the document id (see moe_jax.data.corpus)
  chunk_index  position of this chunk within its document
  num_chunks   how many chunks the document has

so a document's tokens are [BOS] + bytes + [EOS] spread over its chunks, and
the input pipeline cuts training windows out of single records by random
access (`builder.as_data_source()`); TensorFlow is never needed.

Every corpus option and the SHA-256 of all document texts go into the builder
config name, e.g. `code_prose_py3117_4000000b_val0050_1a2b3c4d5e6f7a8b`: a
different Python (hence a different standard library), a new
chatterbot-corpus or another option gets its own prepared folder and is never
served from a stale one. Preparation takes about a second and runs on first
use; TFDS writes into a temporary `incomplete.*` folder and renames it only
when done, so a half-prepared dataset is never read.
"""

import logging
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from moe_jax.data import corpus

RECORD_BYTES = 8192  # largest chunk of a document stored in one record
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "moe_jax", "tensorflow_datasets")
# Bump when the record layout or chunking changes.
_FORMAT_VERSION = "1.0.0"


class CorpusConfig(tfds.core.BuilderConfig):
  """Builder config: which documents, and how they are split.

  Attributes:
    domains: canonical domain tuple (see corpus.canonical_domains).
    max_code_bytes: cap on the standard-library source bytes.
    validation_fraction: fraction of documents (by id hash) in "validation".
  """

  def __init__(
    self,
    *,
    domains: tuple[str, ...],
    max_code_bytes: int,
    validation_fraction: float,
    content_hash: str,
  ):
    python = "".join(str(v) for v in sys.version_info[:3])
    name = (
      f"{'_'.join(domains)}_py{python}_{max_code_bytes}b_"
      f"val{round(validation_fraction * 1000):04d}_{content_hash[:16]}"
    )
    super().__init__(
      name=name,
      version=_FORMAT_VERSION,
      description=(
        f"domains={domains}, max_code_bytes={max_code_bytes}, "
        f"validation_fraction={validation_fraction}, python="
        f"{sys.version.split()[0]}, record_bytes={RECORD_BYTES}, "
        f"content sha256={content_hash}"
      ),
    )
    self.domains = domains
    self.max_code_bytes = max_code_bytes
    self.validation_fraction = validation_fraction


def chunk_text(text: str, max_bytes: int = RECORD_BYTES) -> list[str]:
  """Cuts text into pieces of at most max_bytes UTF-8 bytes.

  Cuts fall on character boundaries (never inside a multi-byte character), and
  the pieces concatenate back to `text`.

  Args:
    text: the document text.
    max_bytes: the largest piece in bytes; must be >= 4 (one UTF-8 char).

  Returns:
    The pieces, none empty (an empty text gives an empty list).
  """
  if max_bytes < 4:
    raise ValueError(f"max_bytes={max_bytes} must be >= 4")
  data = text.encode("utf-8")
  pieces, start = [], 0
  while start < len(data):
    end = min(start + max_bytes, len(data))
    # Step back over UTF-8 continuation bytes (0b10xxxxxx).
    while end < len(data) and data[end] & 0xC0 == 0x80:
      end -= 1
    pieces.append(data[start:end].decode("utf-8"))
    start = end
  return pieces


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """DatasetInfo that never looks for precomputed metadata in TFDS's bucket.

  A builder whose data is not prepared yet calls `initialize_from_bucket`,
  which makes (and leaves behind) an empty /tmp/tmp*tfds folder before it
  finds GCS disabled. Nothing of ours is there, so skip it.
  """

  def initialize_from_bucket(self) -> None:
    pass


class MoeJaxCorpus(tfds.core.GeneratorBasedBuilder):
  """The embedded corpus (see module docstring), as chunked records."""

  VERSION = tfds.core.Version(_FORMAT_VERSION)
  RELEASE_NOTES = {_FORMAT_VERSION: "Chunked records of the embedded corpus."}

  def __init__(self, *, documents: Sequence[corpus.Document] = (), **kwargs):
    """Builder; `documents` are what `config` names, loaded by the caller."""
    self._documents = tuple(documents)
    super().__init__(**kwargs)

  # TFDS 4.9.x finds a packaged builder's source through the
  # `importlib_resources` backport, which recent etils no longer installs
  # (ModuleNotFoundError in download_and_prepare). The path only serves to
  # look for a checksums file next to the code, so give it directly.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return _LocalDatasetInfo(
      builder=self,
      description=__doc__.split("\n", 1)[0],
      features=tfds.features.FeaturesDict(
        {
          "text": tfds.features.Text(),
          "domain": tfds.features.ClassLabel(names=corpus.DOMAINS),
          "language": tfds.features.Text(),
          "doc_id": tfds.features.Text(),
          "chunk_index": np.int64,
          "num_chunks": np.int64,
        }
      ),
      disable_shuffling=True,  # records keep document order
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    if not self._documents:
      raise ValueError("MoeJaxCorpus needs its documents; use corpus_builder")
    fraction = self.builder_config.validation_fraction
    return {
      split: self._generate_examples(
        [
          d
          for d in self._documents
          if corpus.split_of(d.doc_id, fraction) == split
        ]
      )
      for split in (corpus.TRAIN, corpus.VALIDATION)
    }

  def _generate_examples(
    self, documents: Sequence[corpus.Document]
  ) -> Iterator[tuple[str, dict]]:
    for doc in documents:
      chunks = chunk_text(doc.text)
      for index, chunk in enumerate(chunks):
        yield (
          f"{doc.doc_id}#{index}",
          {
            "text": chunk,
            "domain": doc.domain,
            "language": doc.language,
            "doc_id": doc.doc_id,
            "chunk_index": index,
            "num_chunks": len(chunks),
          },
        )


def resolve_data_dir(data_dir: str) -> str:
  """`data_dir`, or DEFAULT_DATA_DIR when empty, with `~` expanded."""
  return os.path.expanduser(data_dir or DEFAULT_DATA_DIR)


def corpus_builder(
  domains, max_code_bytes: int, validation_fraction: float, data_dir: str
) -> MoeJaxCorpus:
  """Loads the documents and returns the (not yet prepared) builder.

  Args:
    domains: domain names (see corpus.canonical_domains).
    max_code_bytes: cap on the standard-library source bytes.
    validation_fraction: in (0, 1).
    data_dir: TFDS data dir; "" means DEFAULT_DATA_DIR.

  Returns:
    The builder, whose config name identifies exactly these documents.
  """
  domains = corpus.canonical_domains(domains)
  documents = corpus.load_documents(domains, max_code_bytes)
  counts = {corpus.TRAIN: 0, corpus.VALIDATION: 0}
  for doc in documents:
    counts[corpus.split_of(doc.doc_id, validation_fraction)] += 1
  for split, count in counts.items():
    if not count:
      raise ValueError(
        f"the embedded corpus has no {split} documents with domains="
        f"{domains}, max_code_bytes={max_code_bytes}, validation_fraction="
        f"{validation_fraction} ({len(documents)} documents in all); add "
        "domains or raise max_code_bytes / adjust validation_fraction"
      )
  content_hash = corpus.fingerprint(
    documents, domains, max_code_bytes, validation_fraction, RECORD_BYTES
  )
  config = CorpusConfig(
    domains=domains,
    max_code_bytes=max_code_bytes,
    validation_fraction=validation_fraction,
    content_hash=content_hash,
  )
  # TFDS warns "Using custom data configuration" for any config not listed
  # in BUILDER_CONFIGS; ours are made from the options, so that is expected.
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    return MoeJaxCorpus(
      config=config,
      documents=documents,
      data_dir=resolve_data_dir(data_dir),
      file_format="array_record",
    )
  finally:
    absl_logger.setLevel(level)


def prepared_corpus_builder(
  domains, max_code_bytes: int, validation_fraction: float, data_dir: str
) -> MoeJaxCorpus:
  """`corpus_builder`, prepared on disk if it was not already."""
  builder = corpus_builder(
    domains, max_code_bytes, validation_fraction, data_dir
  )
  if not builder.is_prepared():
    builder.download_and_prepare()
  return builder
