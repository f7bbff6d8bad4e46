"""Multi-task instruction data, built offline from the embedded corpus.

Instruction tuning (FLAN, Wei et al. 2022; for MoE models Shen et al.
2023, "Mixture-of-Experts Meets Instruction Tuning") trains on many tasks
phrased as instruction -> response. We have no instruction corpus and
download nothing, so the tasks are cut out of the documents we ship
(`moe_jax.data.corpus`), each by a fixed rule:

  code_body       "Complete this Python function:\\n" + the function's
                  header (its `def` line(s)) and docstring, as written
                  -> the rest of the function (its statements)
  code_name       "Name the Python function with this body:\\n" + the
                  statements -> the function's name
  code_docstring  "Write a one-line docstring for:\\n" + the header -> the
                  first line of the docstring (functions that have one)
  prose_continue  "Continue this paragraph:\\n" + a paragraph's first
                  sentence -> the rest of the paragraph
  prose_topic     "Name the language-reference topic of:\\n" + the topic's
                  first sentence -> the topic's name (e.g. "assert")

A "function" is every `def` / `async def` in a code document (methods and
nested functions included), found with `ast`, its source lines dedented to
the `def`. Whitespace in prose is collapsed to single spaces; a paragraph is
a block between blank lines; a sentence ends at ". ", "? " or "! " after at
least MIN_SENTENCE_CHARS characters. The dialog domain (chatterbot-corpus) would
give an "Answer in <language>:" task; it is optional and not installed
where these suites run, so no task uses it.

An example is one sequence, [BOS] instruction response [EOS] as bytes
(`encode`): the loss is on the response only. Its window holds the first
L + 1 tokens (L = data.seq_len); mask = 1 exactly where the target is a
response byte or the closing EOS, 0 on the instruction and on padding, so
the instruction is read, never predicted. An example is used only when its
instruction and at least MIN_RESPONSE_TOKENS response targets (all of them
if the response is shorter) fit in the window (`fits`); a longer response
is cut at the window's end. Which examples fit therefore depends on L.

Train / held-out: by source document, with the corpus' own rule
(`corpus.split_of` on the document id, `data.validation_fraction`), so no
document gives examples to both sides, and the held-out documents are the
ones a model pretrained on the embedded corpus never trained on.

Everything is deterministic: the same documents and tasks give the same
examples in the same order (documents by id, then position in the
document); the training order is the pipeline's seeded shuffle.
"""

import ast
import dataclasses
import re
import textwrap
from collections.abc import Iterable, Sequence

import numpy as np

from moe_jax.data import corpus, tokenizer

TASKS = (
  "code_body",
  "code_name",
  "code_docstring",
  "prose_continue",
  "prose_topic",
)
# The corpus domain each task is cut from.
TASK_DOMAIN = {
  "code_body": "code",
  "code_name": "code",
  "code_docstring": "code",
  "prose_continue": "prose",
  "prose_topic": "prose",
}
INSTRUCTIONS = {
  "code_body": "Complete this Python function:\n",
  "code_name": "Name the Python function with this body:\n",
  "code_docstring": "Write a one-line docstring for:\n",
  "prose_continue": "Continue this paragraph:\n",
  "prose_topic": "Name the language-reference topic of:\n",
}
# A window must hold the instruction and this many response targets (or
# the whole response with its EOS, if shorter).
MIN_RESPONSE_TOKENS = 16
MIN_SENTENCE_CHARS = 20
_SENTENCE_END = re.compile(r"[.?!] ")


@dataclasses.dataclass(frozen=True)
class Example:
  """One instruction -> response example.

  Attributes:
    task: one of TASKS.
    doc_id: the source document's id (decides the split).
    prompt: the instruction, with its input (ends with a newline).
    response: what the model must produce.
  """

  task: str
  doc_id: str
  prompt: str
  response: str


def canonical_tasks(tasks: str | Iterable[str]) -> tuple[str, ...]:
  """Validates task names; returns them deduplicated, in TASKS order.

  Args:
    tasks: task names, or one comma-separated string.

  Raises:
    ValueError: an unknown name (naming the allowed ones), or none.
  """
  if isinstance(tasks, str):
    tasks = [t.strip() for t in tasks.split(",") if t.strip()]
  tasks = list(tasks)
  for task in tasks:
    if task not in TASKS:
      raise ValueError(
        f"unknown instruction task {task!r} in data.instruction_tasks="
        f"{tuple(tasks)}; allowed tasks are {TASKS}"
      )
  if not tasks:
    raise ValueError(
      f"data.instruction_tasks is empty; choose at least one of {TASKS}"
    )
  return tuple(t for t in TASKS if t in tasks)


def domains_of(tasks: Sequence[str]) -> tuple[str, ...]:
  """The corpus domains the tasks are cut from, in DOMAINS order."""
  needed = {TASK_DOMAIN[t] for t in canonical_tasks(tasks)}
  return tuple(d for d in corpus.DOMAINS if d in needed)


# ---- code ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Function:
  """A function of a code document, its source dedented to the `def`.

  Attributes:
    name: the function's name.
    header: the `def` line(s), up to the first statement of the body.
    docstring_source: the docstring's lines as written ("" without one).
    docstring: the first line of `ast.get_docstring` ("" without one).
    body: the statements after the docstring, as written ("" if none).
  """

  name: str
  header: str
  docstring_source: str
  docstring: str
  body: str


def functions(source: str) -> list[Function]:
  """Every `def` / `async def` of `source`, in source order ([] when it
  does not parse)."""
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return []
  lines = source.splitlines()
  found = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      found.append(node)
  found.sort(key=lambda n: (n.lineno, n.col_offset))
  out = []
  for node in found:
    indent = " " * node.col_offset

    def text(first: int, last: int, indent=indent) -> str:
      """Lines first..last (1-based, inclusive), dedented to the def."""
      return _dedent_by("\n".join(lines[first - 1 : last]), indent)

    first_statement = node.body[0]
    if first_statement.lineno == node.lineno:  # def f(): return 1
      continue
    header = text(node.lineno, first_statement.lineno - 1)
    docstring = ast.get_docstring(node, clean=True)
    doc_source, doc_line, statements = "", "", node.body
    if docstring is not None:
      doc_source = text(first_statement.lineno, first_statement.end_lineno)
      doc_line = docstring.strip().split("\n")[0].strip()
      statements = node.body[1:]
    body = text(statements[0].lineno, node.end_lineno) if statements else ""
    out.append(Function(node.name, header, doc_source, doc_line, body))
  return out


def _dedent_by(text: str, indent: str) -> str:
  """Removes `indent` from the start of every line that has it."""
  if not text:
    return ""
  return "\n".join(
    line[len(indent) :] if line.startswith(indent) else line
    for line in text.split("\n")
  ).rstrip()


def code_examples(doc: corpus.Document, tasks: Sequence[str]) -> list:
  """The code tasks' examples of one code document, by function, then by
  task in TASKS order."""
  out = []
  for fn in functions(doc.text):
    if "code_body" in tasks and fn.body:
      prompt = fn.header + ("\n" + fn.docstring_source if fn.docstring else "")
      out.append(
        Example(
          "code_body",
          doc.doc_id,
          INSTRUCTIONS["code_body"] + prompt + "\n",
          fn.body,
        )
      )
    if "code_name" in tasks and fn.body:
      out.append(
        Example(
          "code_name",
          doc.doc_id,
          INSTRUCTIONS["code_name"] + textwrap.dedent(fn.body) + "\n",
          fn.name,
        )
      )
    if "code_docstring" in tasks and fn.docstring:
      out.append(
        Example(
          "code_docstring",
          doc.doc_id,
          INSTRUCTIONS["code_docstring"] + fn.header + "\n",
          fn.docstring,
        )
      )
  return out


# ---- prose ----------------------------------------------------------------


def paragraphs(text: str) -> list[str]:
  """Blocks between blank lines, whitespace collapsed to single spaces."""
  blocks = re.split(r"\n\s*\n", text)
  return [" ".join(b.split()) for b in blocks if b.split()]


def first_sentence(paragraph: str) -> tuple[str, str]:
  """(the first sentence with its end mark, the rest); ("", paragraph) when
  no sentence ends after MIN_SENTENCE_CHARS characters with text after it."""
  for match in _SENTENCE_END.finditer(paragraph):
    if match.start() + 1 >= MIN_SENTENCE_CHARS:
      head = paragraph[: match.start() + 1]
      rest = paragraph[match.end() :].strip()
      if rest:
        return head, rest
  return "", paragraph


def prose_examples(doc: corpus.Document, tasks: Sequence[str]) -> list:
  """The prose tasks' examples of one prose topic: prose_topic from its
  first paragraph that has a sentence, prose_continue from every paragraph
  that has one with text after it."""
  out, topic_done = [], False
  topic = doc.doc_id.split("/", 1)[1]
  for paragraph in paragraphs(doc.text):
    head, rest = first_sentence(paragraph)
    if not head:
      continue
    if "prose_topic" in tasks and not topic_done:
      out.append(
        Example(
          "prose_topic",
          doc.doc_id,
          INSTRUCTIONS["prose_topic"] + head + "\n",
          topic,
        )
      )
      topic_done = True
    if "prose_continue" in tasks:
      out.append(
        Example(
          "prose_continue",
          doc.doc_id,
          INSTRUCTIONS["prose_continue"] + head + "\n",
          rest,
        )
      )
  return out


# ---- the set -----------------------------------------------------------------


def build_examples(
  documents: Sequence[corpus.Document], tasks: Iterable[str]
) -> list[Example]:
  """Every example of `tasks` from `documents`, documents in id order.

  Args:
    documents: corpus documents (other domains' documents are skipped).
    tasks: task names (`canonical_tasks`).
  """
  tasks = canonical_tasks(tasks)
  out = []
  for doc in sorted(documents, key=lambda d: d.doc_id):
    if doc.domain == "code":
      out.extend(code_examples(doc, tasks))
    elif doc.domain == "prose":
      out.extend(prose_examples(doc, tasks))
  return out


def split_examples(
  examples: Sequence[Example], validation_fraction: float
) -> dict[str, list[Example]]:
  """{corpus.TRAIN: [...], corpus.VALIDATION: [...]}, by source document
  (`corpus.split_of` of the example's doc_id)."""
  out = {corpus.TRAIN: [], corpus.VALIDATION: []}
  for ex in examples:
    out[corpus.split_of(ex.doc_id, validation_fraction)].append(ex)
  return out


def encode(example: Example) -> tuple[np.ndarray, int]:
  """(tokens_T, P): [BOS] prompt response [EOS] as byte ids, and P =
  1 + bytes of the prompt, the index of the first response token."""
  prompt = example.prompt.encode("utf-8")
  tokens_T = tokenizer.encode(
    prompt + example.response.encode("utf-8"), bos=True, eos=True
  )
  return tokens_T, 1 + len(prompt)


def fits(example: Example, seq_len: int) -> bool:
  """Whether the window of L + 1 tokens holds the instruction and at least
  MIN_RESPONSE_TOKENS response targets (all, with EOS, if fewer)."""
  tokens_T, start = encode(example)
  response = len(tokens_T) - start  # response bytes + EOS
  return start + min(response, MIN_RESPONSE_TOKENS) <= seq_len + 1


def window(example: Example, seq_len: int) -> dict:
  """inputs / targets int32 [L], mask float32 [L] (1 on response targets
  only), domain int32 [] of one example, padded with PAD and mask 0."""
  tokens_T, start = encode(example)
  tokens_T = tokens_T[: seq_len + 1]
  n = len(tokens_T) - 1
  inputs_L = np.zeros(seq_len, np.int32)
  targets_L = np.zeros(seq_len, np.int32)
  mask_L = np.zeros(seq_len, np.float32)
  inputs_L[:n] = tokens_T[:n]
  targets_L[:n] = tokens_T[1:]
  # targets_L[t] is token t + 1: a response token from t + 1 = start on.
  mask_L[max(start - 1, 0) : n] = 1.0
  domain = corpus.DOMAINS.index(TASK_DOMAIN[example.task])
  return {
    "inputs": inputs_L,
    "targets": targets_L,
    "mask": mask_L,
    "domain": np.int32(domain),
  }
