"""Pre-tokenized token files: a corpus too large for memory, read through `np.memmap`.

The format. `NAME.bin` holds the token ids and nothing else: little-endian uint16 or uint32,
one after another (nanoGPT's train.bin layout, so such a file can be used as it is). Beside it,
`NAME.bin.json` says how to read it:

    {"format": "jaxdec-tokens", "version": 1, "dtype": "uint16", "tokens": 1234567,
     "held_out_start": 1172839, "vocab_size": 49152, "eos_id": 2, "tokenizer": "sha256:...",
     "name": "...", "documents": [1700, 90]}

`dtype` ("uint16" or "uint32") and `held_out_start` (the split: tokens before it train, the rest
are held out) are required; `tokens`, when given, must match the file's size; `vocab_size`,
`eos_id` and `tokenizer` (which tokenizer wrote it: "bytes" for jaxdec's byte tokenizer, else a
hash of the tokenizer's JSON) let a run refuse a file made for another model. A sidecar rather
than a header keeps the .bin byte-compatible with nanoGPT's files: writing the JSON beside one
is all it takes.

Reading. `open_token_file` maps the file read-only; `TokenFile.train` and `.held_out` are views
of the map. `jaxdec.data.sample_batch` and `eval_batches` index only the windows they take, so
a batch reads B x (T + 1) ids from disk whatever the file's size, and batches stay a pure
function of (seed, step): the same as from the same tokens held in memory.

Writing. `write_token_file` encodes the documents of `jaxdec.data.read_*_documents` (the same
split by file as the in-memory corpus: train documents first, then held-out ones) part by part,
appending to the file, so the token stream never sits in memory whole. From the command line,
with the byte tokenizer:

    python -m jaxdec.data.tokens write --data PATH out.bin     # PATH: a file or folder; none: stdlib
    python -m jaxdec.data.tokens info out.bin

and with a pretrained model's tokenizer, `python -m jaxdec.hf tokens --gguf FILE --data PATH out.bin`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
from typing import Iterable

import numpy as np

from jaxdec.data.corpus import (DocumentSplit, Part, STREAM_DTYPE, encode_byte_parts, read_stdlib_documents,
                                read_text_documents, stream_dtype)
from jaxdec.data.tokenizer import EOS_ID, VOCAB_SIZE

FORMAT = "jaxdec-tokens"
VERSION = 1
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
BYTES = "bytes"  # the byte tokenizer's name in a sidecar


def sidecar(path: str | os.PathLike) -> pathlib.Path:
    """NAME.bin -> NAME.bin.json."""
    path = pathlib.Path(path)
    return path.with_name(path.name + ".json")


def is_token_file(path: str | os.PathLike) -> bool:
    """A file with its sidecar JSON beside it."""
    return pathlib.Path(path).is_file() and sidecar(path).is_file()


@dataclasses.dataclass(frozen=True, eq=False)
class TokenFile:
    """A token file mapped read-only.

    Attributes:
      path: the .bin file.
      tokens: the whole file, np.memmap [N] of its dtype (nothing is read until indexed).
      held_out_start: tokens[:held_out_start] train, tokens[held_out_start:] are held out.
      meta: the sidecar JSON.
    """

    path: pathlib.Path
    tokens: np.ndarray
    held_out_start: int
    meta: dict

    @property
    def train(self) -> np.ndarray:
        return self.tokens[: self.held_out_start]

    @property
    def held_out(self) -> np.ndarray:
        return self.tokens[self.held_out_start:]

    @property
    def vocab_size(self) -> int | None:
        return self.meta.get("vocab_size")

    @property
    def tokenizer(self) -> str | None:
        return self.meta.get("tokenizer")


def open_token_file(path: str | os.PathLike) -> TokenFile:
    """Maps NAME.bin as its sidecar NAME.bin.json says (module docstring); reads no token.

    Raises:
      ValueError: no sidecar, an unreadable one, an unknown dtype, a size that is not a whole
        number of tokens or differs from the sidecar's count, or a split outside the file.
    """
    path = pathlib.Path(path)
    side = sidecar(path)
    if not path.is_file():
        raise ValueError(f"token file {str(path)!r} does not exist")
    if not side.is_file():
        raise ValueError(f"token file {str(path)!r} has no sidecar {side.name!r} saying its dtype and split "
                         "(write one with python -m jaxdec.data.tokens write, or by hand: see its docstring)")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise ValueError(f"{side}: not a readable token-file sidecar: {err}") from None
    dtype = DTYPES.get(meta.get("dtype"))
    if dtype is None:
        raise ValueError(f"{side}: dtype {meta.get('dtype')!r} is not one of {sorted(DTYPES)}")
    size = path.stat().st_size
    if size % dtype.itemsize or size == 0:
        raise ValueError(f"{path}: {size} bytes is not a positive whole number of {meta['dtype']} tokens")
    n = size // dtype.itemsize
    if "tokens" in meta and meta["tokens"] != n:
        raise ValueError(f"{path}: holds {n} tokens, but {side.name} says tokens={meta['tokens']} "
                         "(a cut-off or replaced file?)")
    start = meta.get("held_out_start")
    if not isinstance(start, int) or isinstance(start, bool) or not 0 < start < n:
        raise ValueError(f"{side}: held_out_start must be an int in (0, {n}) (tokens before it train, the "
                         f"rest are held out), got {start!r}")
    return TokenFile(path=path, tokens=np.memmap(path, dtype=dtype, mode="r", shape=(n,)),
                     held_out_start=start, meta=meta)


def _chunks(parts: list[Part], size: int) -> Iterable[list[Part]]:
    for i in range(0, len(parts), size):
        yield parts[i:i + size]


def write_token_file(out: str | os.PathLike, split: DocumentSplit, tokenizer=None, *,
                     chunk: int = 64) -> TokenFile:
    """Writes a split's documents as a token file (train, then held-out) and its sidecar.

    tokenizer: None for the byte tokenizer, else an object with `vocab_size`, `eos_id`,
      `fingerprint` and `encode_parts(parts)` (`jaxdec.hf.TextTokenizer`).
    chunk: parts encoded at a time; only one chunk's tokens are in memory at once.

    The sidecar is written last, through a temporary name: a file whose writing was cut off
    has no sidecar and is refused by `open_token_file`.
    """
    out = pathlib.Path(out)
    if tokenizer is None:
        encode, dtype, vocab, eos, name = encode_byte_parts, np.dtype(STREAM_DTYPE), VOCAB_SIZE, EOS_ID, BYTES
    else:
        encode, dtype = tokenizer.encode_parts, stream_dtype(tokenizer.vocab_size)
        vocab, eos, name = tokenizer.vocab_size, tokenizer.eos_id, tokenizer.fingerprint
    dtype = dtype.newbyteorder("<")
    side = sidecar(out)
    side.unlink(missing_ok=True)  # the old sidecar must not describe the new, partial file
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = []
    with open(out, "wb") as f:
        for parts in (split.train, split.held_out):
            n = 0
            for group in _chunks(parts, chunk):
                for ids in encode(group):
                    f.write(np.asarray(ids).astype(dtype).tobytes())
                    n += len(ids)
            counts.append(n)
    meta = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "tokens": sum(counts),
            "held_out_start": counts[0], "vocab_size": int(vocab), "eos_id": int(eos), "tokenizer": name,
            "name": split.name, "documents": [len(split.train), len(split.held_out)]}
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(tmp, side)
    return open_token_file(out)


def read_documents(data: str | None, held_out_fraction: float = 0.05, separator: str | None = None) -> DocumentSplit:
    """The documents a run with this --data trains on: the stdlib's sources for None."""
    if data is None:
        return read_stdlib_documents(held_out_fraction=held_out_fraction)
    return read_text_documents(data, held_out_fraction=held_out_fraction, separator=separator)


def describe(tf: TokenFile) -> str:
    m = tf.meta
    return (f"{tf.path}: {len(tf.tokens):,} {m['dtype']} tokens ({tf.held_out_start:,} train, "
            f"{len(tf.tokens) - tf.held_out_start:,} held out), vocab_size {m.get('vocab_size')}, "
            f"eos_id {m.get('eos_id')}, tokenizer {m.get('tokenizer')}, from {m.get('name')}")


def add_write_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="the token file to write, e.g. data/train.bin (and its .bin.json sidecar)")
    p.add_argument("--data", default=None, help="a text file or folder (default: the Python standard library's source)")
    p.add_argument("--held-out-fraction", type=float, default=0.05, help="share of files (or of one file's bytes) held out")
    p.add_argument("--separator", default=None, help="cut files into documents at this string")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxdec.data.tokens",
                                description="Write or describe a token file (byte tokenizer; for a pretrained "
                                            "model's tokenizer use python -m jaxdec.hf tokens).")
    sub = p.add_subparsers(dest="command", required=True)
    add_write_arguments(sub.add_parser("write", help="tokenize text into a token file"))
    sub.add_parser("info", help="describe a token file").add_argument("path")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "write":
            split = read_documents(args.data, args.held_out_fraction, args.separator)
            print(describe(write_token_file(args.out, split)))
        else:
            print(describe(open_token_file(args.path)))
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
