"""Embedded and user-supplied text corpora as one token stream per split.

Each document is encoded as BOS + UTF-8 bytes + EOS and the documents are concatenated, so the
model sees document boundaries. Streams are stored as uint16: ids go up to EOS_ID = 258, which
does not fit uint8, and uint16 halves the memory of int32 (the ~34 MB stdlib is ~70 MB, not
~140 MB). Batching casts windows to int32.

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
    """

    name: str
    train: np.ndarray
    held_out: np.ndarray
    train_files: tuple[str, ...]
    held_out_files: tuple[str, ...]

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


def _corpus_from_files(
    name: str, rel_paths: list[str], contents: dict[str, bytes], fraction: float
) -> Corpus:
    """Documents split by file (see split_files), each split encoded as one stream."""
    train_files, held_out_files = split_files(rel_paths, fraction)
    return Corpus(
        name=name,
        train=encode_documents([contents[p] for p in train_files]),
        held_out=encode_documents([contents[p] for p in held_out_files]),
        train_files=tuple(train_files),
        held_out_files=tuple(held_out_files),
    )


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


def load_stdlib_corpus(
    *, held_out_fraction: float = 0.05, max_files: int | None = None
) -> Corpus:
    """The Python standard library's .py sources as a corpus, split by file.

    Files are taken in sorted relative-path order (all of them by default; the first
    `max_files` when given, for quick tests), read as raw bytes (a few stdlib test files are
    deliberately not UTF-8; bytes need no decoding) and split by a crc32 of the relative path.

    Args:
      held_out_fraction: in (0, 1); about this fraction of the files is held out.
      max_files: None for all files, or an int >= 2.

    Returns:
      a Corpus named "stdlib-<major>.<minor>"; streams are uint16.
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
    return _corpus_from_files(f"stdlib-{version}", rel_paths, contents, held_out_fraction)


def _utf8_text(data: bytes) -> bool:
    """True for non-empty valid UTF-8 without NUL bytes (NUL marks binary files)."""
    if not data or b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _split_single_file(name: str, rel_path: str, data: bytes, fraction: float) -> Corpus:
    """Train on the head of one document, hold out its tail.

    The stream is the document's BOS + bytes + EOS cut in two: train is BOS + head, held-out is
    tail + EOS, so neither split invents a boundary that is not in the text. The cut moves back
    to a UTF-8 character boundary when it can (so no character is split across the two).
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
    doc = encode_documents([data])
    return Corpus(
        name=name,
        train=doc[: 1 + cut].copy(),
        held_out=doc[1 + cut:].copy(),
        train_files=(rel_path,),
        held_out_files=(rel_path,),
    )


def load_text_corpus(path: str | os.PathLike, *, held_out_fraction: float = 0.05) -> Corpus:
    """A user's text (`--data PATH`) as a corpus.

    - A file: must be non-empty UTF-8 text. The last `held_out_fraction` of its bytes (at least
      1 byte, and at least 1 byte left for training) is held out.
    - A folder: every file below it (hidden names and __pycache__ skipped; files that are empty,
      not valid UTF-8, or contain NUL bytes skipped as binary) is one document; the documents
      are split by a crc32 of their relative paths like the stdlib corpus. A folder with a
      single usable file is split by bytes like a file.

    Args:
      path: a file or a folder.
      held_out_fraction: in (0, 1).

    Returns:
      a Corpus named after `path`; streams are uint16.
    """
    _check_fraction(held_out_fraction)
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
        return _split_single_file(str(root), root.name, data, held_out_fraction)
    if not root.is_dir():
        raise ValueError(f"data path is neither a file nor a folder: {str(root)!r}")

    contents: dict[str, bytes] = {}
    skipped = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _SKIPPED_DIRS]
        for fname in filenames:
            full = Path(dirpath) / fname
            if fname.startswith(".") or not full.is_file():
                continue
            data = full.read_bytes()
            if _utf8_text(data):
                contents[full.relative_to(root).as_posix()] = data
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
    return _corpus_from_files(str(root), rel_paths, contents, held_out_fraction)
