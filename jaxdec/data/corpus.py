"""Embedded and user-supplied text corpora as one token stream per split.

Reading and encoding are apart: `read_stdlib_documents` / `read_text_documents` give the
documents of each split as `Part`s (bytes, and whether the part opens and closes its document:
a single file split by bytes has a head that does not close and a tail that does not open), and
`encode_split` turns them into streams with a tokenizer's `encode_parts`. The byte tokenizer
encodes a document as BOS + UTF-8 bytes + EOS; a pretrained model's tokenizer
(`jaxdec.hf.TextTokenizer`) as its own ids + its EOS. The documents are concatenated, so the
model sees document boundaries, and `Corpus.*_offsets` keep where each starts (for packing).
Streams are stored as uint16 when the vocabulary fits (the byte tokenizer's 259 ids, SmolLM2's
49,152), else uint32: half the memory of int32. Batching casts windows to int32.

Splits are by file, decided by a stable hash (zlib.crc32) of the file's relative path, so they
are identical on every machine and in every process (Python's hash() is salted per process).
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from jaxdec.data.tokenizer import BOS_ID, EOS_ID

STREAM_DTYPE = np.uint16
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stream_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype of uint16 / uint32 that holds ids below vocab_size."""
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit 32-bit token ids")


@dataclasses.dataclass(frozen=True)
class Part:
    """A document, or the part of one that falls in a split: its bytes, and whether it holds
    the document's start (`opens`: a BOS goes first, for tokenizers that mark it) and end
    (`closes`: an EOS follows)."""

    data: bytes
    opens: bool = True
    closes: bool = True


@dataclasses.dataclass(frozen=True, eq=False)
class DocumentSplit:
    """The documents of a corpus, split, before encoding (see `Corpus` for the fields)."""

    name: str
    train: list[Part]
    held_out: list[Part]
    train_files: tuple[str, ...]
    held_out_files: tuple[str, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """Train and held-out token streams of one corpus.

    Attributes:
      name: where the text came from, e.g. "stdlib-3.11" or a user path.
      train: uint16 [N_train] token stream (BOS + bytes + EOS per document, concatenated).
      held_out: uint16 [N_held_out] token stream, same encoding, disjoint documents (or, for a
        single file, the file's tail).
      train_files: relative paths of the training documents, sorted.
      held_out_files: relative paths of the held-out documents, sorted. For a single file split
        by bytes both tuples name that file.
      train_offsets, held_out_offsets: int64 [documents + 1]: document i of the split is
        stream[offsets[i]:offsets[i + 1]] (None when unknown).
    """

    name: str
    train: np.ndarray
    held_out: np.ndarray
    train_files: tuple[str, ...]
    held_out_files: tuple[str, ...]
    train_offsets: np.ndarray | None = None
    held_out_offsets: np.ndarray | None = None

    def __post_init__(self) -> None:
        for split in ("train", "held_out"):
            stream = getattr(self, split)
            if not isinstance(stream, np.ndarray) or stream.ndim != 1 or stream.size == 0:
                raise ValueError(f"Corpus.{split} must be a non-empty 1-D numpy array")


def _check_fraction(held_out_fraction: float) -> None:
    if not isinstance(held_out_fraction, (int, float)) or not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction!r}")


def _hash_score(rel_path: str) -> float:
    """A stable pseudo-random number in [0, 1) for a relative path (same on every machine)."""
    return zlib.crc32(rel_path.encode("utf-8")) / 2**32


def split_files(rel_paths: list[str], held_out_fraction: float) -> tuple[list[str], list[str]]:
    """Splits relative paths into (train, held_out) by a stable hash of each path.

    A file is held out when crc32(path) / 2**32 < held_out_fraction, so its side never depends
    on which other files are present. Exception: when that leaves one side empty (tiny folders),
    the file with the smallest score (or, for an empty train side, the largest) moves over so
    that both splits are non-empty. Needs at least 2 paths.
    """
    if len(rel_paths) < 2:
        raise ValueError(f"splitting by file needs at least 2 files, got {len(rel_paths)}")
    ordered = sorted(rel_paths, key=lambda p: (_hash_score(p), p))
    held = {p for p in ordered if _hash_score(p) < held_out_fraction}
    if not held:
        held = {ordered[0]}
    elif len(held) == len(ordered):
        held.discard(ordered[-1])
    train = sorted(p for p in rel_paths if p not in held)
    return train, sorted(held)


def encode_documents(documents: list[bytes]) -> np.ndarray:
    """Concatenates BOS + bytes + EOS for each document.

    Returns:
      uint16 [sum(len(d) + 2 for d in documents)].
    """
    out = np.empty(sum(len(d) + 2 for d in documents), STREAM_DTYPE)
    pos = 0
    for doc in documents:
        out[pos] = BOS_ID
        out[pos + 1:pos + 1 + len(doc)] = np.frombuffer(doc, np.uint8)
        out[pos + 1 + len(doc)] = EOS_ID
        pos += len(doc) + 2
    return out


def encode_byte_parts(parts: list[Part]) -> list[np.ndarray]:
    """The byte tokenizer's encoding: [BOS if opens] + bytes + [EOS if closes], uint16 each."""
    out = []
    for part in parts:
        ids = np.empty(len(part.data) + part.opens + part.closes, STREAM_DTYPE)
        ids[part.opens:part.opens + len(part.data)] = np.frombuffer(part.data, np.uint8)
        if part.opens:
            ids[0] = BOS_ID
        if part.closes:
            ids[-1] = EOS_ID
        out.append(ids)
    return out


def _stream(pieces: list[np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray]:
    """(concatenated stream, offsets int64 [len(pieces) + 1])."""
    offsets = np.zeros(len(pieces) + 1, np.int64)
    np.cumsum([p.size for p in pieces], out=offsets[1:])
    stream = np.empty(int(offsets[-1]), dtype)
    for p, start in zip(pieces, offsets[:-1]):
        stream[start:start + p.size] = p
    return stream, offsets


def encode_split(split: DocumentSplit, tokenizer=None) -> Corpus:
    """The split's documents as token streams.

    tokenizer: None for the byte tokenizer, else an object with `vocab_size` and
      `encode_parts(parts) -> list of 1-D integer arrays` (`jaxdec.hf.TextTokenizer`).
    """
    encode = encode_byte_parts if tokenizer is None else tokenizer.encode_parts
    dtype = STREAM_DTYPE if tokenizer is None else stream_dtype(tokenizer.vocab_size)
    train, train_offsets = _stream(encode(split.train), dtype)
    held_out, held_out_offsets = _stream(encode(split.held_out), dtype)
    return Corpus(name=split.name, train=train, held_out=held_out, train_files=split.train_files,
                  held_out_files=split.held_out_files, train_offsets=train_offsets,
                  held_out_offsets=held_out_offsets)


def _split_by_file(name: str, rel_paths: list[str], contents: dict[str, bytes], fraction: float) -> DocumentSplit:
    """Documents split by file (see split_files)."""
    train_files, held_out_files = split_files(rel_paths, fraction)
    return DocumentSplit(name=name, train=[Part(contents[p]) for p in train_files],
                         held_out=[Part(contents[p]) for p in held_out_files],
                         train_files=tuple(train_files), held_out_files=tuple(held_out_files))


def stdlib_source_files() -> tuple[Path, list[str]]:
    """The standard library's own .py files.

    Returns:
      (stdlib root, sorted POSIX-style relative paths), excluding site-packages, dist-packages
      and __pycache__ folders.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    rel_paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        rel_paths.extend(
            (rel_dir / f).as_posix() for f in filenames if f.endswith(".py")
        )
    return root, sorted(rel_paths)


def read_stdlib_documents(*, held_out_fraction: float = 0.05, max_files: int | None = None) -> DocumentSplit:
    """The Python standard library's .py sources as documents, split by file.

    Files are taken in sorted relative-path order (all of them by default; the first
    `max_files` when given, for quick tests), read as raw bytes (a few stdlib test files are
    deliberately not UTF-8; bytes need no decoding) and split by a crc32 of the relative path.
    """
    _check_fraction(held_out_fraction)
    if max_files is not None and (
        not isinstance(max_files, int) or isinstance(max_files, bool) or max_files < 2
    ):
        raise ValueError(f"max_files must be None or an int >= 2, got {max_files!r}")
    root, rel_paths = stdlib_source_files()
    if len(rel_paths) < 2:
        raise ValueError(f"found {len(rel_paths)} .py files under the stdlib at {root}")
    if max_files is not None:
        rel_paths = rel_paths[:max_files]
    contents = {p: (root / p).read_bytes() for p in rel_paths}
    version = sysconfig.get_python_version()
    return _split_by_file(f"stdlib-{version}", rel_paths, contents, held_out_fraction)


def load_stdlib_corpus(
    *, held_out_fraction: float = 0.05, max_files: int | None = None, tokenizer=None
) -> Corpus:
    """The Python standard library's .py sources as a corpus, split by file
    (`read_stdlib_documents`), encoded by `tokenizer` (None: bytes; see `encode_split`).

    Args:
      held_out_fraction: in (0, 1); about this fraction of the files is held out.
      max_files: None for all files, or an int >= 2.
      tokenizer: None for the byte tokenizer, or a `jaxdec.hf.TextTokenizer`.

    Returns:
      a Corpus named "stdlib-<major>.<minor>"; streams are uint16 (or uint32 for a vocabulary
      above 65,536 ids).
    """
    split = read_stdlib_documents(held_out_fraction=held_out_fraction, max_files=max_files)
    return encode_split(split, tokenizer)


def _utf8_text(data: bytes) -> bool:
    """True for non-empty valid UTF-8 without NUL bytes (NUL marks binary files)."""
    if not data or b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _split_single_file(name: str, rel_path: str, data: bytes, fraction: float) -> DocumentSplit:
    """Train on the head of one document, hold out its tail.

    Train is the head (it opens the document, does not close it), held-out the tail (closes,
    does not open), so neither split invents a boundary that is not in the text. The cut moves
    back to a UTF-8 character boundary when it can (so no character is split across the two).
    """
    if len(data) < 2:
        raise ValueError(
            f"{name} has {len(data)} byte(s); a train/held-out split needs at least 2"
        )
    held = min(max(1, round(len(data) * fraction)), len(data) - 1)
    cut = len(data) - held
    # 0b10xxxxxx bytes continue a character; back up to the byte that starts it.
    start = cut
    while start > 1 and data[start] & 0xC0 == 0x80:
        start -= 1
    if data[start] & 0xC0 != 0x80:
        cut = start
    return DocumentSplit(name=name, train=[Part(data[:cut], closes=False)],
                         held_out=[Part(data[cut:], opens=False)],
                         train_files=(rel_path,), held_out_files=(rel_path,))


def _separated(rel_path: str, data: bytes, separator: bytes | None) -> dict[str, bytes]:
    """A file's documents: the whole file, or its pieces between separators (empty ones
    dropped), named "path#i"."""
    if not separator:
        return {rel_path: data}
    docs = [d for d in data.split(separator) if d.strip()]
    if len(docs) <= 1:
        return {rel_path: docs[0] if docs else data}
    return {f"{rel_path}#{i}": d for i, d in enumerate(docs)}


def read_text_documents(path: str | os.PathLike, *, held_out_fraction: float = 0.05,
                        separator: str | None = None) -> DocumentSplit:
    """A user's text (`--data PATH`) as split documents.

    - A file: must be non-empty UTF-8 text. The last `held_out_fraction` of its bytes (at least
      1 byte, and at least 1 byte left for training) is held out.
    - A folder: every file below it (hidden names and __pycache__ skipped; files that are empty,
      not valid UTF-8, or contain NUL bytes skipped as binary) is one document; the documents
      are split by a crc32 of their relative paths like the stdlib corpus. A folder with a
      single usable file is split by bytes like a file.
    - separator: when given, every file is cut into documents at each occurrence (pieces of
      only whitespace dropped), named "path#i", and those are split by the crc32 of their names;
      a file holding one document is treated as above.
    """
    _check_fraction(held_out_fraction)
    if separator is not None and (not isinstance(separator, str) or not separator):
        raise ValueError(f"separator must be a non-empty str or None, got {separator!r}")
    sep = separator.encode("utf-8") if separator else None
    root = Path(path)
    if not root.exists():
        raise ValueError(f"data path does not exist: {str(root)!r}")
    if root.is_file():
        data = root.read_bytes()
        if not data:
            raise ValueError(f"data file is empty: {str(root)!r}")
        if not _utf8_text(data):
            raise ValueError(
                f"data file is not UTF-8 text (invalid UTF-8 or NUL bytes): {str(root)!r}"
            )
        contents = _separated(root.name, data, sep)
        if len(contents) == 1:
            return _split_single_file(str(root), root.name, next(iter(contents.values())), held_out_fraction)
        return _split_by_file(str(root), sorted(contents), contents, held_out_fraction)
    if not root.is_dir():
        raise ValueError(f"data path is neither a file nor a folder: {str(root)!r}")

    contents: dict[str, bytes] = {}
    skipped = 0
    for rel in folder_files(root):
        data = (root / rel).read_bytes()
        if _utf8_text(data):
            contents.update(_separated(rel, data, sep))
        else:
            skipped += 1
    if not contents:
        raise ValueError(
            f"data folder {str(root)!r} has no usable text: no non-empty UTF-8 files "
            f"({skipped} empty or binary file(s) skipped)"
        )
    rel_paths = sorted(contents)
    if len(rel_paths) == 1:
        only = rel_paths[0]
        return _split_single_file(str(root), only, contents[only], held_out_fraction)
    return _split_by_file(str(root), rel_paths, contents, held_out_fraction)


def folder_files(root: Path) -> list[str]:
    """Every file below a data folder, as sorted POSIX relative paths (hidden names,
    __pycache__, site-packages and dist-packages skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _SKIPPED_DIRS]
        for fname in filenames:
            full = Path(dirpath) / fname
            if not fname.startswith(".") and full.is_file():
                found.append(full.relative_to(root).as_posix())
    return sorted(found)


def load_text_corpus(path: str | os.PathLike, *, held_out_fraction: float = 0.05, tokenizer=None,
                     separator: str | None = None) -> Corpus:
    """A user's text (`--data PATH`) as a corpus: `read_text_documents`, encoded by `tokenizer`
    (None: bytes; see `encode_split`).

    Args:
      path: a file or a folder.
      held_out_fraction: in (0, 1).
      tokenizer: None for the byte tokenizer, or a `jaxdec.hf.TextTokenizer`.
      separator: cut files into documents at this string (see `read_text_documents`).

    Returns:
      a Corpus named after `path`; streams are uint16 (uint32 above 65,536 ids).
    """
    split = read_text_documents(path, held_out_fraction=held_out_fraction, separator=separator)
    return encode_split(split, tokenizer)
