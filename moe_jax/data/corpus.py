"""The embedded default corpus: text that ships with every Python installation.

Nothing is downloaded. Three domains, so that experts have something to
specialise on:

  code    the standard library's `.py` sources (no test suites, no
          site-packages, idlelib, turtledemo or pydoc_data), capped at
          `max_code_bytes`;
          one document per file, id "code/<path relative to the stdlib>".
  prose   the English language-reference topics in `pydoc_data/topics.py`;
          one document per topic, id "prose/<topic>".
  dialog  (optional, `pip install -e .[multilingual]`) the YAML files of the
          `chatterbot-corpus` package, short conversations in ~28 languages;
          one document per file, id "dialog/<language>/<file stem>".

The code cap orders files by the SHA-256 of their relative path (a spread
over the whole library rather than its alphabetical head) and takes them until
the next one would pass `max_code_bytes`, so a larger cap only ever adds files.

Documents are assigned to the train or validation split by hashing their id
(`split_of`), which is stable across runs, machines and Python versions.
"""

import dataclasses
import hashlib
import importlib
import os
import sys
import sysconfig
from collections.abc import Iterable, Sequence

DOMAINS = ("code", "prose", "dialog")
TRAIN = "train"
VALIDATION = "validation"

# Folders of the standard library that are not library source; pydoc_data
# holds the "prose" topics as one big dict literal (no leaks across domains).
_EXCLUDED_DIRS = frozenset(
  {
    "pydoc_data",
    "__pycache__",
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "turtledemo",
    "site-packages",
    "dist-packages",
  }
)
_MULTILINGUAL_HINT = "pip install -e .[multilingual]"


@dataclasses.dataclass(frozen=True)
class Document:
  """One document of the corpus.

  Attributes:
    doc_id: stable, unique id, e.g. "code/json/decoder.py" or "prose/assert".
    domain: one of DOMAINS.
    language: "python" for code, "en" for prose, the chatterbot-corpus folder
      name (e.g. "english", "japanese") for dialog.
    text: the document text.
  """

  doc_id: str
  domain: str
  language: str
  text: str


def canonical_domains(domains: str | Iterable[str]) -> tuple[str, ...]:
  """Validates domain names and returns them deduplicated, in DOMAINS order.

  Args:
    domains: domain names, or one comma-separated string ("code,prose").

  Returns:
    The domains as a tuple ordered like DOMAINS.
  """
  if isinstance(domains, str):
    domains = [d.strip() for d in domains.split(",") if d.strip()]
  domains = list(domains)
  for domain in domains:
    if domain not in DOMAINS:
      raise ValueError(
        f"unknown domain {domain!r} in domains={tuple(domains)}; allowed "
        f"domains are {DOMAINS}"
      )
  if not domains:
    raise ValueError(f"domains is empty; choose at least one of {DOMAINS}")
  return tuple(d for d in DOMAINS if d in domains)


def stdlib_dir() -> str:
  """Returns the directory of the standard library's Python sources."""
  return sysconfig.get_path("stdlib") or os.path.dirname(os.__file__)


def _stdlib_py_files(root: str) -> list[str]:
  """Relative POSIX paths of the library's .py files, in sorted walk order."""
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
    for name in sorted(filenames):
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, name), root)
        paths.append(rel.replace(os.sep, "/"))
  return paths


def _path_rank(rel_path: str) -> bytes:
  return hashlib.sha256(rel_path.encode("utf-8")).digest()


def code_documents(
  max_code_bytes: int, root: str | None = None
) -> list[Document]:
  """Standard-library sources, at most `max_code_bytes` bytes in total.

  Args:
    max_code_bytes: cap on the summed file sizes; 0 gives no documents.
    root: library directory to read; defaults to `stdlib_dir()`.

  Returns:
    Documents sorted by id.
  """
  if not isinstance(max_code_bytes, int) or max_code_bytes < 0:
    raise ValueError(
      f"max_code_bytes={max_code_bytes!r} must be an integer >= 0"
    )
  root = stdlib_dir() if root is None else root
  taken, total = [], 0
  for rel in sorted(_stdlib_py_files(root), key=_path_rank):
    path = os.path.join(root, rel)
    if total + os.path.getsize(path) > max_code_bytes:
      break
    with open(path, "rb") as f:
      data = f.read()
    if data.strip():
      taken.append((rel, data))
      total += len(data)
  docs = [
    Document(f"code/{rel}", "code", "python", data.decode("utf-8", "replace"))
    for rel, data in taken
  ]
  return sorted(docs, key=lambda d: d.doc_id)


def prose_documents() -> list[Document]:
  """The language-reference topics of `pydoc_data.topics`, one per topic."""
  try:
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      "domain 'prose' needs pydoc_data.topics from the standard library, "
      f"which this Python ({sys.version.split()[0]}) lacks; drop 'prose' "
      "from config.data.domains"
    ) from e
  return [
    Document(f"prose/{name}", "prose", "en", text)
    for name, text in sorted(topics.topics.items())
    if text.strip()
  ]


def _conversations_text(conversations) -> str:
  """Renders chatterbot conversations: one utterance per line, blank between."""
  blocks = []
  for conversation in conversations or ():
    if isinstance(conversation, (list, tuple)):
      lines = [str(u).strip() for u in conversation if u is not None]
      blocks.append("\n".join(line for line in lines if line))
  return "\n\n".join(b for b in blocks if b)


def dialog_documents() -> list[Document]:
  """The `chatterbot-corpus` YAML files, one document per file."""
  try:
    package = importlib.import_module("chatterbot_corpus")
    import yaml  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      f"domain 'dialog' needs the chatterbot-corpus and PyYAML packages "
      f"({e}); install them with `{_MULTILINGUAL_HINT}` or drop 'dialog' "
      "from config.data.domains"
    ) from e
  # yaml.safe_load's loader, in C when PyYAML has libyaml (10x faster).
  loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
  data_dir = os.path.join(os.path.dirname(package.__file__), "data")
  if not os.path.isdir(data_dir):
    raise ImportError(
      f"chatterbot_corpus at {package.__file__} has no data/ folder; "
      f"reinstall it with `{_MULTILINGUAL_HINT}`"
    )
  docs = []
  for language in sorted(os.listdir(data_dir)):
    lang_dir = os.path.join(data_dir, language)
    if not os.path.isdir(lang_dir):
      continue
    for name in sorted(os.listdir(lang_dir)):
      stem, ext = os.path.splitext(name)
      if ext not in (".yml", ".yaml"):
        continue
      with open(os.path.join(lang_dir, name), encoding="utf-8") as f:
        content = yaml.load(f, Loader=loader)
      if not isinstance(content, dict):
        continue
      text = _conversations_text(content.get("conversations"))
      if text:
        docs.append(
          Document(f"dialog/{language}/{stem}", "dialog", language, text)
        )
  return docs


def load_documents(
  domains: str | Iterable[str], max_code_bytes: int
) -> list[Document]:
  """All documents of the requested domains, in DOMAINS order, then by id."""
  loaders = {
    "code": lambda: code_documents(max_code_bytes),
    "prose": prose_documents,
    "dialog": dialog_documents,
  }
  docs = []
  for domain in canonical_domains(domains):
    docs.extend(loaders[domain]())
  return docs


def split_of(doc_id: str, validation_fraction: float) -> str:
  """TRAIN or VALIDATION, from the SHA-256 of the document id.

  The first 8 bytes of the digest, read as a fraction of 2**64, fall below
  `validation_fraction` for about that fraction of documents.
  """
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(
      f"validation_fraction={validation_fraction!r} must be in (0, 1)"
    )
  digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
  position = int.from_bytes(digest[:8], "big") / 2.0**64
  return VALIDATION if position < validation_fraction else TRAIN


def fingerprint(documents: Sequence[Document], *extra) -> str:
  """SHA-256 hex digest of every document (id, domain, language, text).

  Args:
    documents: the documents, in order.
    *extra: further values (options) whose repr is mixed into the digest.

  Returns:
    64 hex characters that change whenever any text or option changes.
  """
  h = hashlib.sha256(repr(extra).encode("utf-8"))
  for doc in documents:
    for field in (doc.doc_id, doc.domain, doc.language, doc.text):
      data = field.encode("utf-8")
      h.update(len(data).to_bytes(8, "big"))
      h.update(data)
  return h.hexdigest()
