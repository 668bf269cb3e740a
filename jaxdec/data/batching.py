"""Language-model batches from a token stream: random windows for training, fixed ones for eval.

A batch is {"tokens": int32 [B, T + 1]}: the model reads tokens[:, :-1] and predicts
tokens[:, 1:], so a window of T + 1 tokens gives T predictions.
"""

from __future__ import annotations

import numpy as np


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_nonnegative_int(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _check_stream(stream: np.ndarray, seq_len: int) -> None:
    if not isinstance(stream, np.ndarray) or stream.ndim != 1:
        raise ValueError(
            f"stream must be a 1-D numpy array, got {type(stream).__name__} "
            f"with shape {getattr(stream, 'shape', None)}"
        )
    if not np.issubdtype(stream.dtype, np.integer):
        raise ValueError(f"stream must hold integer token ids, got dtype {stream.dtype}")
    if stream.size < seq_len + 1:
        raise ValueError(
            f"a batch too large for the data: the stream has {stream.size} tokens, but one "
            f"window of seq_len + 1 = {seq_len + 1} tokens is needed; use a smaller seq_len "
            f"or more data"
        )


def _windows(stream: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    """int32 [len(starts), seq_len + 1]: stream[s : s + seq_len + 1] for each start s."""
    index = starts[:, None] + np.arange(seq_len + 1)[None, :]  # [B, T + 1]
    return stream[index].astype(np.int32)


def sample_batch(
    stream: np.ndarray, *, batch_size: int, seq_len: int, seed: int, step: int
) -> dict[str, np.ndarray]:
    """Random training windows, a pure function of (stream, seed, step).

    The generator is seeded with [seed, step], so a run resumed at step s sees exactly the
    batches it would have seen without the interruption, with no sampler state to checkpoint.
    Every start in [0, len(stream) - seq_len - 1] is equally likely (windows may cross document
    boundaries; BOS/EOS in the stream mark them).

    Args:
      stream: integer [N] token stream, N >= seq_len + 1.
      batch_size: B > 0.
      seq_len: T > 0, predictions per window.
      seed: non-negative int, the run's data seed.
      step: non-negative int, the training step.

    Returns:
      {"tokens": int32 [B, T + 1]}.
    """
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("seq_len", seq_len)
    _check_nonnegative_int("seed", seed)
    _check_nonnegative_int("step", step)
    _check_stream(stream, seq_len)
    rng = np.random.default_rng([int(seed), int(step)])
    starts = rng.integers(0, stream.size - seq_len, size=batch_size)  # [B]
    return {"tokens": _windows(stream, starts, seq_len)}


def eval_batches(
    stream: np.ndarray, *, batch_size: int, seq_len: int, max_batches: int | None
) -> list[dict[str, np.ndarray]]:
    """Deterministic evaluation windows from the start of a (held-out) stream.

    Window i is stream[i * T : i * T + T + 1]: consecutive windows share one boundary token, so
    their predicted targets (tokens[:, 1:]) do not overlap and, together, cover every token after
    the first exactly once up to the last full window. Windows are grouped B at a time; the last
    batch holds the remainder and may be smaller than B (weight losses by token count, not by
    batch, when averaging).

    Args:
      stream: integer [N] token stream, N >= seq_len + 1.
      batch_size: B > 0.
      seq_len: T > 0.
      max_batches: a positive int to cap the number of batches, or None for all windows.

    Returns:
      a non-empty list of {"tokens": int32 [b, T + 1]} with b == B except maybe the last.
    """
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("seq_len", seq_len)
    if max_batches is not None:
        _check_positive_int("max_batches", max_batches)
    _check_stream(stream, seq_len)
    num_windows = (stream.size - 1) // seq_len
    if max_batches is not None:
        num_windows = min(num_windows, max_batches * batch_size)
    starts = np.arange(num_windows) * seq_len  # [num_windows]
    return [
        {"tokens": _windows(stream, starts[i:i + batch_size], seq_len)}
        for i in range(0, num_windows, batch_size)
    ]
