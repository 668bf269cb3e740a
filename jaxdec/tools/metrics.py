"""Training metrics as JSON lines (`tools.loss_curve` draws the PNG from them).

One JSON object per line, e.g. ``{"step": 100, "loss": 2.31, "lr": 0.001}`` for a train record
and ``{"step": 100, "eval_loss": 2.45}`` for a held-out one; kinds may be mixed in one file.
The file is opened in append mode so a resumed run continues it; call `truncate_after` with
the restored step first so steps past the checkpoint (recorded by the crashed run, about to
be recomputed) are not duplicated.
"""

from __future__ import annotations

import json
import numbers
import os
import pathlib
import warnings
from typing import Any

import numpy as np

from jaxdec.checks import as_step


def _jsonable(name: str, value: Any) -> Any:
    """`value` as a plain JSON value: NumPy/JAX scalars become Python int/float/bool."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    # JAX arrays (and NumPy 0-d arrays) are not numbers.Number; accept them when scalar.
    if hasattr(value, "shape") and hasattr(value, "dtype") and value.shape == ():
        value = np.asarray(value)
        if value.dtype == np.bool_:
            return bool(value)
        if np.issubdtype(value.dtype, np.integer):
            return int(value)
        if np.issubdtype(value.dtype, np.floating):
            return float(value)
    shape = getattr(value, "shape", None)
    raise ValueError(
        f"metric {name!r} must be a scalar number, bool, str or None, "
        f"got {type(value).__name__}" + (f" of shape {shape}" if shape is not None else "")
    )


class MetricsLog:
    """Appends metric records to a JSONL file, one flushed line per `log` call.

    Usable as a context manager; `close()` otherwise. The parent directory is created.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, **metrics: Any) -> dict:
        """Writes ``{"step": step, **metrics}`` as one line and returns that record.

        `step` is a non-negative int (NumPy/JAX integer scalars accepted); metric values are
        scalars (converted to Python int/float/bool), str or None. NaN/inf are written as
        NaN/Infinity, which Python's json (and `read`) accepts.
        """
        step = as_step(step)
        record = {"step": step, **{k: _jsonable(k, v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a crash loses at most the line being written
        return record

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _drop_partial_last_line(path: pathlib.Path) -> None:
    """Cuts a final line with no newline (a write interrupted by a crash) off `path`.

    Appending after it would glue the next record onto the fragment and corrupt both.
    """
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1  # 0 when the fragment is the only line
    warnings.warn(f"{path}: dropping incomplete last line {data[keep:][:80]!r}", stacklevel=3)
    with open(path, "r+b") as f:
        f.truncate(keep)


def read(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL metrics file, in file order.

    An unparsable last line (a write cut short by a crash) is skipped with a warning; an
    unparsable line elsewhere raises ValueError naming its line number.
    """
    path = pathlib.Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                warnings.warn(f"{path}: skipping incomplete last line {number}", stacklevel=2)
                continue
            raise ValueError(f"{path}, line {number}: not a JSON object: {err}") from err
    return records


def truncate_after(path: str | os.PathLike, step: int) -> int:
    """Drops records with a step above `step` from `path`; returns how many were dropped.

    Rewrites the file atomically (temporary file + rename). Call it before opening a
    `MetricsLog` on `path`: an already open log would keep appending to the replaced file.
    A missing file is left missing (a run resumed before it logged anything).
    """
    path = pathlib.Path(path)
    if not path.exists():
        return 0
    records = read(path)
    if any(not isinstance(r.get("step"), int) for r in records):
        raise ValueError(f"{path}: every record needs an integer 'step' to truncate by")
    kept = [r for r in records if r["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(records) - len(kept)
