"""The sentences the report shows, and byte tokens as text: tick labels, the characters their
UTF-8 bytes spell, readable strings. No plotting here."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxdec.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer


TOKENIZER = ByteTokenizer()

# The sentences. SEED: the causal mask; PADDED: a batch of unequal lengths.
SEED_SENTENCE = "나는 학교에 간다"
PADDED_SENTENCES = ("오늘 어디에 갈꺼니?", SEED_SENTENCE)
DEFAULT_LM_TEXT = 'print("나는 학교에 간다")'
DEFAULT_DATES_TEXT = "2026년 11월 23일 월요일"


SPECIAL_NAMES = {BOS_ID: "SOS", EOS_ID: "EOS", PAD_ID: "PAD"}  # "[SOS]" is the tokenizer's BOS
_SHOWN_ASCII = {" ": "SP", "\n": "¶", "\t": "→"}


@dataclasses.dataclass(frozen=True)
class Unit:
    """One displayed character: token ids [start, stop) and its text ("" for a lone byte)."""

    start: int
    stop: int
    text: str


def _utf8_width(lead: int) -> int:
    """Bytes in the UTF-8 sequence a lead byte starts (1 for ASCII or a stray byte)."""
    return 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF8 else 1


def units(ids: Sequence[int]) -> list[Unit]:
    """Groups byte ids into characters: the UTF-8 bytes of one syllable form one Unit.

    ids: token ids (bytes 0..255 and the specials). A malformed sequence leaves its bytes as
    single-byte units with no text.
    """
    ids = [int(i) for i in ids]
    out, i = [], 0
    while i < len(ids):
        width = _utf8_width(ids[i]) if ids[i] < 256 else 1
        chunk = ids[i : i + width]
        text = ""
        if width > 1 and len(chunk) == width and all(0x80 <= b < 0xC0 for b in chunk[1:]):
            try:
                text = bytes(chunk).decode("utf-8")
            except UnicodeDecodeError:
                text = ""
        if width > 1 and not text:
            width = 1
        out.append(Unit(i, i + width, text))
        i += width
    return out


def byte_label(token: int, in_group: bool) -> str:
    """One tick label: a special's name, a printable ASCII byte as itself, else two hex digits."""
    if token in SPECIAL_NAMES:
        return SPECIAL_NAMES[token]
    if token >= 256:
        return str(token)
    if in_group or token >= 0x80:
        return f"{token:02X}"
    char = chr(token)
    if char in _SHOWN_ASCII:
        return _SHOWN_ASCII[char]
    return char if char.isprintable() else f"{token:02X}"


def token_labels(ids: Sequence[int]) -> tuple[list[str], list[Unit]]:
    """Per-token tick labels and the multi-byte characters to draw under them."""
    groups = [u for u in units(ids) if u.stop - u.start > 1]
    grouped = {i for u in groups for i in range(u.start, u.stop)}
    return [byte_label(int(t), i in grouped) for i, t in enumerate(ids)], groups


def text_of(ids: Sequence[int]) -> str:
    """ids as readable text: specials as [SOS] / [EOS] / [PAD], bytes decoded (invalid ones as \\xNN),
    ids beyond the byte tokenizer's (a pretrained model's vocabulary, after --init) as [id]."""
    parts, run = [], []
    for t in (int(i) for i in ids):
        if t in SPECIAL_NAMES or t >= 256:
            parts.append(bytes(run).decode("utf-8", errors="backslashreplace"))
            parts.append(f"[{SPECIAL_NAMES.get(t, t)}]")
            run = []
        else:
            run.append(t)
    parts.append(bytes(run).decode("utf-8", errors="backslashreplace"))
    return "".join(parts)


def encode_sentence(text: str) -> np.ndarray:
    """[SOS] + UTF-8 bytes of text: int32 [T]."""
    return TOKENIZER.encode(text, bos=True)


def padded_batch(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """[SOS] + bytes of each text, right-padded with PAD: tokens int32 [B, T], lengths int32 [B]."""
    rows = [encode_sentence(t) for t in texts]
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), PAD_ID, np.int32)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    return tokens, np.array([len(r) for r in rows], np.int32)
