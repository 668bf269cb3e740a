"""Byte-level tokenizer: UTF-8 bytes are ids 0..255, then three special ids.

Bytes need no vocabulary file, cover every language (Korean is 3 bytes a syllable) and every
string round-trips exactly. The specials sit above the bytes so a byte value is its own id.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

NUM_BYTES = 256
PAD_ID = 256  # right padding; weight 0 in the loss, skipped by decode
BOS_ID = 257  # start of a document / of a decoder target
EOS_ID = 258  # end of a document / of a decoder target; decode stops here
VOCAB_SIZE = 259


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus PAD_ID=256, BOS_ID=257, EOS_ID=258 (vocab_size 259).

    Stateless; frozen so it can be a default argument or a static argument to `jax.jit`.
    """

    pad_id: int = dataclasses.field(default=PAD_ID, init=False)
    bos_id: int = dataclasses.field(default=BOS_ID, init=False)
    eos_id: int = dataclasses.field(default=EOS_ID, init=False)
    vocab_size: int = dataclasses.field(default=VOCAB_SIZE, init=False)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        """Encodes `text` as its UTF-8 bytes.

        Args:
          text: any str without lone surrogates (they have no UTF-8 encoding).
          bos: prepend BOS_ID.
          eos: append EOS_ID.

        Returns:
          int32 [T] with T = len(text.encode("utf-8")) + bos + eos.
        """
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"text is not encodable as UTF-8 (lone surrogate at index {err.start}): "
                f"{text[max(0, err.start - 10):err.end + 10]!r}"
            ) from None
        ids = np.empty(len(data) + int(bos) + int(eos), np.int32)
        start = int(bos)
        ids[start:start + len(data)] = np.frombuffer(data, np.uint8)
        if bos:
            ids[0] = BOS_ID
        if eos:
            ids[-1] = EOS_ID
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decodes ids to text: PAD and BOS are skipped, the first EOS ends the text.

        Invalid UTF-8 (a model can emit any byte sequence) becomes U+FFFD rather than an error.

        Args:
          ids: a 1-D sequence of ints (list, tuple, or integer numpy/JAX array) in [0, 259).

        Returns:
          the decoded str.
        """
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {arr.shape}; decode one row at a time")
        if arr.size == 0:
            return ""
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
        bad = (arr < 0) | (arr >= VOCAB_SIZE)
        if bad.any():
            values = sorted(set(arr[bad].tolist()))
            shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
            raise ValueError(f"ids outside [0, {VOCAB_SIZE}): {shown}")
        eos_at = np.flatnonzero(arr == EOS_ID)
        if eos_at.size:
            arr = arr[: eos_at[0]]
        data = arr[arr < NUM_BYTES].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")
