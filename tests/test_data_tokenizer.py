"""Tests for moe_jax.data.tokenizer (byte-level ids: 0 PAD, 1 BOS, 2 EOS)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moe_jax.data import tokenizer


def test_vocab_and_special_ids():
  assert tokenizer.VOCAB_SIZE == 259
  assert (tokenizer.PAD_ID, tokenizer.BOS_ID, tokenizer.EOS_ID) == (0, 1, 2)


def test_encode_by_hand():
  # "Hé": 'H' = 0x48 = 72 -> 75; 'é' = UTF-8 C3 A9 = 195, 169 -> 198, 172.
  ids = tokenizer.encode("Hé", bos=True, eos=True)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, [1, 75, 198, 172, 2])
  np.testing.assert_array_equal(tokenizer.encode(""), np.zeros(0, np.int32))
  np.testing.assert_array_equal(tokenizer.encode(b"\x00\xff"), [3, 258])


@given(st.text())
def test_roundtrip_any_text(text):
  ids = tokenizer.encode(text, bos=True, eos=True)
  assert ids.min(initial=3) >= 0 and ids.max(initial=0) < 259
  assert len(ids) == len(text.encode("utf-8")) + 2
  assert tokenizer.decode(ids) == text


@given(st.binary())
def test_bytes_map_to_ids_plus_three(data):
  ids = tokenizer.encode(data)
  np.testing.assert_array_equal(
    ids, np.frombuffer(data, np.uint8).astype(np.int64) + 3
  )


def test_decode_drops_specials_and_replaces_broken_utf8():
  # PAD, BOS, 'a', EOS, PAD -> "a"
  assert tokenizer.decode([0, 1, 100, 2, 0]) == "a"
  # A lone lead byte 0xC3 (id 198) is not valid UTF-8.
  assert tokenizer.decode(np.array([198, 100])) == "\ufffda"


@pytest.mark.parametrize("bad", [259, -1, 1000])
def test_decode_rejects_out_of_range_ids(bad):
  with pytest.raises(ValueError, match=f"token id {bad} is out of range"):
    tokenizer.decode([100, bad])


def test_encode_rejects_non_text():
  with pytest.raises(TypeError, match="str or bytes"):
    tokenizer.encode(123)
