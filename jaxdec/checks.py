"""Validation of user input, run on the host before any compute.

Every check raises ValueError naming the bad value and what was expected. Under an outer `jit`
the inputs are tracers whose values are unknown: `is_concrete` tells the callers to skip the
value checks there (shape and dtype checks still run), and `device_checks` offers the same value
checks as `checkify` assertions for a checked mode.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify


def is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def as_array(x):
    """Python sequences become numpy arrays (so lists work); arrays and tracers pass through."""
    if x is None or isinstance(x, (jax.Array, np.ndarray)):
        return x
    return np.asarray(x)


def as_step(step) -> int:
    """`step` as a non-negative Python int (accepts int, numpy/JAX integer scalars)."""
    try:
        value = operator.index(step)
    except TypeError:
        raise ValueError(f"step must be a non-negative integer, got {step!r}") from None
    if value < 0:
        raise ValueError(f"step must be a non-negative integer, got {value}")
    return value


def is_int(value) -> bool:
    """A Python or numpy integer scalar; bool is not an int here."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def positive_int(name: str, value, minimum: int = 1) -> int:
    """`value` as a Python int >= minimum (int or numpy integer, never bool); else ValueError."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_sampler(sampler, batch: int, vocab_size: int) -> None:
    """A sampler is hashable (a static argument to jit), has a bool `stochastic` attribute, and
    maps (logits float32 [B, V], key) to int [B]; checked on shapes only (jax.eval_shape)."""
    if not callable(sampler) or not isinstance(getattr(sampler, "stochastic", None), bool):
        raise ValueError("sampler must be callable as sampler(logits [B, V] float32, key) -> int32 [B] "
                         f"and have a bool attribute `stochastic`, got {sampler!r}")
    try:
        hash(sampler)
    except TypeError:
        raise ValueError(f"sampler must be hashable (e.g. a frozen dataclass), got {sampler!r}") from None
    logits = jax.ShapeDtypeStruct((batch, vocab_size), jnp.float32)
    out = jax.eval_shape(sampler, logits, jax.random.key(0))
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != (batch,) or not jnp.issubdtype(out.dtype, jnp.integer):
        raise ValueError(f"sampler {sampler!r} must return one integer token per row, int32 [{batch}], "
                         f"got {out}")


def check_int_array(name: str, x, ndim: int) -> None:
    """Rank and integer dtype (bool excluded)."""
    shape = np.shape(x)
    if len(shape) != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {shape}")
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_:
        raise ValueError(f"{name} must be an integer array (int32), got dtype {dtype}")


def check_token_ids(name: str, tokens, vocab_size: int) -> None:
    """All ids in [0, vocab_size). tokens: concrete integer array."""
    arr = np.asarray(tokens)
    if arr.size == 0:
        return
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds token id {bad}, outside [0, vocab_size={vocab_size})")


def check_lengths(name: str, lengths, batch: int, min_length: int, max_length: int) -> None:
    """lengths int [B] with min_length <= lengths[b] <= max_length."""
    check_int_array(name, lengths, 1)
    if np.shape(lengths)[0] != batch:
        raise ValueError(f"{name} must have shape [{batch}] (one per example), got {np.shape(lengths)}")
    if not is_concrete(lengths):
        return
    arr = np.asarray(lengths)
    if arr.size and (arr.min() < min_length or arr.max() > max_length):
        bad = int(arr.min()) if arr.min() < min_length else int(arr.max())
        raise ValueError(f"{name} holds {bad}, outside [{min_length}, {max_length}]")


def check_sequence(name: str, tokens, vocab_size: int, max_len: int) -> None:
    """A [B, T] token batch: rank, dtype, non-empty, T <= max_len, ids in range (if concrete)."""
    check_int_array(name, tokens, 2)
    B, T = np.shape(tokens)
    if B == 0 or T == 0:
        raise ValueError(f"{name} must be non-empty, got shape {(B, T)}")
    if T > max_len:
        raise ValueError(f"{name} has length {T}, beyond the model's max_len={max_len}")
    if is_concrete(tokens):
        check_token_ids(name, tokens, vocab_size)


def device_checks(tokens: jax.Array, lengths: jax.Array | None, vocab_size: int) -> None:
    """The value checks as `checkify.check` calls, for use inside `checkify.checkify`."""
    checkify.check(
        jnp.all((tokens >= 0) & (tokens < vocab_size)),
        f"token ids must lie in [0, vocab_size={vocab_size})",
    )
    if lengths is not None:
        checkify.check(
            jnp.all((lengths >= 0) & (lengths <= tokens.shape[1])),
            f"lengths must lie in [0, {tokens.shape[1]}]",
        )


def nonfinite_rows(logits: jax.Array) -> jax.Array:
    """Inside jit: bool [B], row b of logits [B, ...] (e.g. [B, V] or [B, C, V]) holds a NaN or
    an inf."""
    return ~jnp.all(jnp.isfinite(logits), axis=tuple(range(1, logits.ndim)))
