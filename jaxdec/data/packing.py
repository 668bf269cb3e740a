"""Packed documents: whole documents laid into fixed rows of T + 1 tokens, with segment ids.

Cutting random windows from one long stream makes most rows start mid-document and lets a
position attend across a document boundary into an unrelated document. Packing keeps each
document (or, for one longer than a row, each row-sized piece of it) whole inside one row,
several to a row, and marks them: `segment_ids` int32 [R, T + 1] numbers the pieces of a row
1, 2, ... in the order they sit, and is 0 on padding. A model that masks attention and the loss
by segment sees each piece on its own, as if it were the only one in its row.

A document is split into pieces of exactly T + 1 tokens from its start, the last piece holding
the rest; full pieces fill a row alone, the shorter ones are placed best-fit decreasing (longest
first, each into the open row with the least room that still holds it, else a new row), so rows
are nearly full. The order of rows and of pieces within rows is a pure function of the document
lengths, so packing the same documents always gives the same rows.

`padding_fraction` is the share of the R x (T + 1) row tokens that are padding;
`unpacked_padding_fraction` the share one piece per row would waste, the layout without packing.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Packed:
    """Documents packed into rows.

    Attributes:
      tokens: int32 [R, T + 1], padding = pad_id.
      segment_ids: int32 [R, T + 1]: 1, 2, ... per piece within a row, 0 on padding.
      pieces: int64 [P, 5], one row per piece: (document index, start in the document, length,
        row, column where it begins). Enough to put every document back together.
    """

    tokens: np.ndarray
    segment_ids: np.ndarray
    pieces: np.ndarray

    @property
    def row_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def padding_fraction(self) -> float:
        """Padding tokens over all row tokens, packed."""
        return float(np.mean(self.segment_ids == 0))

    @property
    def unpacked_padding_fraction(self) -> float:
        """Padding tokens over all row tokens with one piece per row (no packing)."""
        return float(1.0 - self.pieces[:, 2].sum() / (len(self.pieces) * self.row_len))


def _check_row_len(row_len: int) -> None:
    if not isinstance(row_len, (int, np.integer)) or isinstance(row_len, bool) or row_len < 2:
        raise ValueError(f"row_len (seq_len + 1) must be an int >= 2, got {row_len!r}")


def split_pieces(lengths: Sequence[int], row_len: int) -> np.ndarray:
    """int64 [P, 3]: (document, start, length) of each piece, documents cut every row_len tokens."""
    out = []
    for doc, n in enumerate(lengths):
        for start in range(0, int(n), row_len):
            out.append((doc, start, min(row_len, int(n) - start)))
    return np.array(out, np.int64).reshape(-1, 3)


def _place(lengths: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing: (row, column) of each piece of the given lengths."""
    order = np.lexsort((np.arange(len(lengths)), -lengths))  # longest first, ties by index
    rows, cols = np.empty(len(lengths), np.int64), np.empty(len(lengths), np.int64)
    # Open rows by remaining room: `rooms` sorted ascending, `open_rows[room]` a stack of rows.
    rooms: list[int] = []
    open_rows: dict[int, list[int]] = {}
    used: list[int] = []  # tokens filled per row
    for i in order:
        n = int(lengths[i])
        at = bisect.bisect_left(rooms, n)
        if at < len(rooms):
            room = rooms[at]
            row = open_rows[room].pop()
            if not open_rows[room]:
                del open_rows[room]
                rooms.pop(at)
        else:
            row, room = len(used), row_len
            used.append(0)
        rows[i], cols[i] = row, used[row]
        used[row] += n
        left = room - n
        if left > 0:
            if left not in open_rows:
                bisect.insort(rooms, left)
                open_rows[left] = []
            open_rows[left].append(row)
    return rows, cols


def pack_documents(documents: Sequence[np.ndarray], row_len: int, pad_id: int) -> Packed:
    """Packs documents (1-D integer token arrays, each ending with its EOS) into rows.

    Args:
      documents: non-empty 1-D integer arrays, in corpus order.
      row_len: T + 1, tokens per row.
      pad_id: the id written at padding positions.

    Returns:
      a `Packed`; every token of every document appears exactly once.
    """
    _check_row_len(row_len)
    if len(documents) == 0:
        raise ValueError("pack_documents needs at least one document, got none")
    for i, d in enumerate(documents):
        if not isinstance(d, np.ndarray) or d.ndim != 1 or d.size == 0 or not np.issubdtype(d.dtype, np.integer):
            raise ValueError(f"document {i} must be a non-empty 1-D integer array, got "
                             f"{type(d).__name__} {getattr(d, 'dtype', '')} {getattr(d, 'shape', '')}")
    pieces = split_pieces([d.size for d in documents], row_len)
    rows, cols = _place(pieces[:, 2], row_len)
    R = int(rows.max()) + 1
    tokens = np.full((R, row_len), pad_id, np.int32)
    segment_ids = np.zeros((R, row_len), np.int32)
    # Segment ids follow the column order within each row.
    rank = np.lexsort((cols, rows))
    seg = np.empty(len(pieces), np.int32)
    first = np.r_[True, rows[rank][1:] != rows[rank][:-1]]
    counter = np.arange(len(rank)) - np.maximum.accumulate(np.where(first, np.arange(len(rank)), 0))
    seg[rank] = counter + 1
    for (doc, start, n), r, c, s in zip(pieces, rows, cols, seg):
        tokens[r, c:c + n] = documents[doc][start:start + n]
        segment_ids[r, c:c + n] = s
    return Packed(tokens=tokens, segment_ids=segment_ids,
                  pieces=np.concatenate([pieces, rows[:, None], cols[:, None]], axis=1))


def documents_of(stream: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """The documents of a stream, stream[offsets[i]:offsets[i + 1]] (views)."""
    return [stream[a:b] for a, b in zip(offsets[:-1], offsets[1:]) if b > a]


def sample_packed_batch(packed: Packed, *, batch_size: int, seed: int, step: int) -> dict[str, np.ndarray]:
    """B random packed rows, a pure function of (packed, seed, step), as `batching.sample_batch`.

    Returns:
      {"tokens": int32 [B, T + 1], "segment_ids": int32 [B, T + 1]}.
    """
    for name, value in (("batch_size", batch_size), ("seed", seed), ("step", step)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < (name == "batch_size"):
            raise ValueError(f"{name} must be a {'positive' if name == 'batch_size' else 'non-negative'} int, "
                             f"got {value!r}")
    rng = np.random.default_rng([int(seed), int(step)])
    rows = rng.integers(0, len(packed.tokens), size=batch_size)  # [B]
    return {"tokens": packed.tokens[rows], "segment_ids": packed.segment_ids[rows]}


def packed_eval_batches(packed: Packed, *, batch_size: int, max_batches: int | None) -> list[dict[str, np.ndarray]]:
    """The packed rows in order, B at a time (the last batch may be smaller), at most max_batches."""
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    R = len(packed.tokens) if max_batches is None else min(len(packed.tokens), max_batches * batch_size)
    return [{"tokens": packed.tokens[i:i + batch_size], "segment_ids": packed.segment_ids[i:i + batch_size]}
            for i in range(0, R, batch_size)]
