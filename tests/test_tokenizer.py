"""ByteTokenizer: exact round trips, special ids, and validation of ids."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxdec.data import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer

TOK = ByteTokenizer()


@given(st.text())
def test_round_trip_arbitrary_text(text):
    ids = TOK.encode(text)
    assert ids.dtype == np.int32
    assert ids.shape == (len(text.encode("utf-8")),)
    assert TOK.decode(ids) == text
    assert TOK.decode(TOK.encode(text, bos=True, eos=True)) == text


@given(st.binary())
def test_decode_never_raises_on_any_bytes(data):
    # A model may emit invalid UTF-8; decode replaces it instead of raising.
    assert TOK.decode(list(data)) == data.decode("utf-8", errors="replace")


def test_korean_exact():
    text = "[SOS] 나는 학교에"
    ids = TOK.encode(text, bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    # 6 ASCII bytes "[SOS] ", 5 Hangul syllables of 3 bytes each, 1 space, BOS and EOS.
    assert ids.shape == (6 + 5 * 3 + 1 + 2,)
    assert ids[1:-1].tolist() == list(text.encode("utf-8"))
    assert TOK.decode(ids) == text


def test_constants():
    assert (PAD_ID, BOS_ID, EOS_ID, VOCAB_SIZE) == (256, 257, 258, 259)
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id, TOK.vocab_size) == (256, 257, 258, 259)
    assert hash(TOK) == hash(ByteTokenizer())  # usable as a jit static argument


def test_encode_specials():
    assert TOK.encode("").shape == (0,)
    assert TOK.encode("", bos=True).tolist() == [BOS_ID]
    assert TOK.encode("", eos=True).tolist() == [EOS_ID]
    assert TOK.encode("A", bos=True, eos=True).tolist() == [BOS_ID, 65, EOS_ID]


def test_decode_skips_pad_bos_and_stops_at_eos():
    ids = [BOS_ID, 104, PAD_ID, 105, EOS_ID, 120, 121, PAD_ID]
    assert TOK.decode(ids) == "hi"
    assert TOK.decode(np.array(ids, np.int64)) == "hi"
    assert TOK.decode([EOS_ID, 65]) == ""
    assert TOK.decode([]) == ""
    assert TOK.decode([PAD_ID] * 3) == ""


def test_decode_replaces_invalid_utf8():
    assert TOK.decode([0xFF, 65]) == "\ufffdA"
    # A Korean syllable cut short (as at a max-length stop) decodes to a replacement char.
    assert TOK.decode(TOK.encode("가")[:2]) == "\ufffd"


@pytest.mark.parametrize("bad", [[-1], [VOCAB_SIZE], [65, 300, 1000]])
def test_decode_rejects_ids_outside_vocab(bad):
    with pytest.raises(ValueError, match=r"outside \[0, 259\)") as err:
        TOK.decode(bad)
    assert str(max(bad) if max(bad) >= VOCAB_SIZE else min(bad)) in str(err.value)


def test_decode_rejects_bad_arrays():
    with pytest.raises(ValueError, match="1-D"):
        TOK.decode(np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="integers"):
        TOK.decode(np.array([65.0]))


def test_encode_rejects_non_text():
    with pytest.raises(ValueError, match="str"):
        TOK.encode(b"bytes")
    with pytest.raises(ValueError, match="surrogate"):
        TOK.encode("a\ud800b")
