"""Byte-level tokenizer: every UTF-8 byte is one token, plus three specials.

Ids:

  0         PAD  (padding; never a real target)
  1         BOS  (begin of a document)
  2         EOS  (end of a document)
  3 .. 258  the bytes 0 .. 255 (byte b has id b + 3)

so `VOCAB_SIZE` is 259. Any text in any language round-trips exactly, with no
vocabulary file to download or version.
"""

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3  # id of byte 0
VOCAB_SIZE = 256 + BYTE_OFFSET  # 259


def encode(
  text: str | bytes, *, bos: bool = False, eos: bool = False
) -> np.ndarray:
  """Encodes text (str as UTF-8, or raw bytes) into byte token ids.

  Args:
    text: the text; a `str` is encoded as UTF-8, `bytes` are used as they are.
    bos: prepend BOS_ID.
    eos: append EOS_ID.

  Returns:
    ids_L: int32 array of length len(bytes) + bos + eos.
  """
  if isinstance(text, str):
    data = text.encode("utf-8")
  elif isinstance(text, (bytes, bytearray, memoryview)):
    data = bytes(text)
  else:
    raise TypeError(
      f"encode expects str or bytes, got {type(text).__name__}: {text!r:.80}"
    )
  ids_L = np.empty(len(data) + bos + eos, dtype=np.int32)
  ids_L[bos : bos + len(data)] = np.frombuffer(data, dtype=np.uint8)
  ids_L[bos : bos + len(data)] += BYTE_OFFSET
  if bos:
    ids_L[0] = BOS_ID
  if eos:
    ids_L[-1] = EOS_ID
  return ids_L


def decode(ids) -> str:
  """Decodes token ids back to text; PAD/BOS/EOS are dropped.

  Byte sequences that are not valid UTF-8 (for example a window cut in the
  middle of a character) decode with U+FFFD replacement characters.

  Args:
    ids: a sequence or array of ints in [0, VOCAB_SIZE).

  Returns:
    The decoded string.
  """
  ids_L = np.asarray(ids).reshape(-1)
  if ids_L.size and not np.issubdtype(ids_L.dtype, np.integer):
    raise TypeError(f"decode expects integer ids, got dtype {ids_L.dtype}")
  bad = (ids_L < 0) | (ids_L >= VOCAB_SIZE)
  if np.any(bad):
    raise ValueError(
      f"token id {int(ids_L[bad][0])} is out of range: ids must be in "
      f"[0, {VOCAB_SIZE})"
    )
  byte_ids = ids_L[ids_L >= BYTE_OFFSET] - BYTE_OFFSET
  return byte_ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
