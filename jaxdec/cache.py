"""The KV cache: a preallocated, fixed-capacity pytree of keys and values for every layer.

Layout. Prompts are stored right-aligned against the longest one: example b's real tokens
occupy slots [starts[b], end) and every example writes its next token at the same slot `end`.
One scalar slot makes each write a single in-place `lax.dynamic_update_slice` instead of a
per-row scatter, while each example keeps its own positions (slot - starts[b]) and its own valid
keys, so it decodes exactly as it would alone. Slots before starts[b] hold padding that is never
attended, and slots from `end` on are never read: attention (`attention.attend_cache`) visits
only the blocks between the earliest start and the newest query, so a step's cost follows the
filled length, not the capacity.

Speculative decoding lets rows accept different numbers of tokens per round, so its cache
carries one write slot per row instead (`end` int32 [B], `per_row`): row b's tokens then occupy
slots [starts[b], end[b]), contiguous, with positions slot - starts[b] as before, and a write
is a per-row scatter. Every function here and in attention accepts either form.

Capacity is checked on the host before decoding (`check_capacity`): `dynamic_update_slice`
clamps an out-of-range start, which would silently overwrite the last slot.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer.

    Attributes:
      k: [L, B, K, S, H] keys (zeros where never written). Heads before slots: attention reads
        each layer's [B, K, S, H] block in place, with no transpose copy per step.
      v: [L, B, K, S, H] values.
      starts: int32 [B], first valid slot of each example.
      end: int32 [], the next slot to write (shared by the batch); or int32 [B], each row's own
        (`per_row`).
    """

    k: jax.Array
    v: jax.Array
    starts: jax.Array
    end: jax.Array

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def lengths(self) -> jax.Array:
        """int32 [B]: tokens cached per example."""
        return self.end - self.starts

    def per_row(self) -> "KVCache":
        """The same cache with one write slot per row (end int32 [B])."""
        return self.replace(end=jnp.broadcast_to(self.end, self.starts.shape).astype(jnp.int32))


@flax.struct.dataclass
class KVBuffer:
    """Storage for a KV cache, handed from one decode call to the next so that a large capacity
    is allocated once (`jaxdec.kv_buffer`, then each `GenerateResult.buffer`). A call donates it:
    the cache is written into these arrays in place, they come back in the result, and the
    arrays passed in are deleted. Their contents are never read as data: attention sees only the
    slots the call wrote itself and zeroes the values of the rest, so a buffer may hold anything.

    Attributes:
      k, v: [L, B, K, S, H], as `KVCache`.
    """

    k: jax.Array
    v: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.k.shape)


def init_cache(
    num_layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype=jnp.float32,
    buffer: KVBuffer | None = None,
) -> KVCache:
    """An empty cache: zeros [L, B, K, S, H] (or the storage of `buffer`, of that shape and
    dtype, whatever it holds), starts = end = 0."""
    shape = (num_layers, batch, kv_heads, capacity, head_dim)
    if buffer is None:
        k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    else:
        check_buffer(buffer, shape, dtype)
        k, v = buffer.k, buffer.v
    return KVCache(k=k, v=v, starts=jnp.zeros((batch,), jnp.int32), end=jnp.zeros((), jnp.int32))


def check_buffer(buffer, shape: tuple[int, ...] | None = None, dtype=None) -> None:
    """A KVBuffer, with the cache's shape [L, B, K, S, H] and dtype when they are given (both
    arrays: k's dtype when dtype is None). ValueError."""
    if not isinstance(buffer, KVBuffer):
        raise ValueError(f"buffer must be a jaxdec.KVBuffer (jaxdec.kv_buffer, or a result's .buffer), "
                         f"got {type(buffer).__name__}")
    if shape is None:
        return
    dtype = buffer.k.dtype if dtype is None else dtype
    for name, x in (("k", buffer.k), ("v", buffer.v)):
        if tuple(x.shape) != tuple(shape) or x.dtype != jnp.dtype(dtype):
            raise ValueError(f"buffer.{name} is {x.dtype}{list(x.shape)}; this call's cache is "
                             f"{jnp.dtype(dtype)}{list(shape)} [L, B, K, S, H]: make one with "
                             f"jaxdec.kv_buffer(config, batch, capacity, dtype)")


def place_rows(prompts: jax.Array, lengths: jax.Array, starts: jax.Array, width: int) -> jax.Array:
    """int32 [B, width]: right-padded prompts [B, P] (example b's tokens in columns 0 ..
    lengths[b] - 1) moved to slots starts[b] .. starts[b] + lengths[b] - 1, token 0 elsewhere."""
    src = jnp.arange(width, dtype=jnp.int32)[None, :] - starts[:, None]  # [B, width] index into the prompt
    real = (src >= 0) & (src < lengths[:, None])
    gathered = jnp.take_along_axis(prompts, jnp.clip(src, 0, prompts.shape[1] - 1), axis=1)
    return jnp.where(real, gathered, 0).astype(jnp.int32)


def check_capacity(capacity: int, needed: int, spare: int = 0) -> None:
    """Host-side guard: raise before decoding rather than write past the cache's end. spare: the
    slots speculative decoding needs beyond prompt + max_new_tokens (its drafts, γ)."""
    if needed + spare > capacity:
        extra = f" + {spare} draft slots (the draft's num_tokens)" if spare else ""
        raise ValueError(
            f"capacity {capacity} is too small: prompt length + max_new_tokens = {needed}{extra}; "
            f"pass capacity >= {needed + spare}"
        )


def write(cache: KVCache, layer: int | jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
    """Writes new keys/values k, v [B, T, K, H] of `layer` at slots end .. end + T - 1.

    `layer` may be traced (a layer scan carries the whole cache and updates it in place).
    `end` is not advanced: every layer writes the same slots; call `advance` once per step.
    """
    k_all, v_all = write_layer(cache.k, cache.v, layer, cache.end, k, v)
    return cache.replace(k=k_all, v=v_all)


def write_layer(k_all: jax.Array, v_all: jax.Array, layer, end, k: jax.Array, v: jax.Array):
    """The arrays behind `write`: k_all, v_all [L, B, K, S, H]; k, v [B, T, K, H] at slot end
    (int32 [], one in-place slice update) or at each row's own slot end[b] (int32 [B])."""
    k = jnp.swapaxes(k, 1, 2).astype(k_all.dtype)  # [B, K, T, H]
    v = jnp.swapaxes(v, 1, 2).astype(v_all.dtype)
    if jnp.ndim(end) == 0:
        start = slice_start(layer, 0, 0, end, 0)
        return (jax.lax.dynamic_update_slice(k_all, k[None], start),
                jax.lax.dynamic_update_slice(v_all, v[None], start))

    return write_each_row((k_all, v_all), (k[None], v[None]), lambda b: slice_start(layer, b, 0, end[b], 0),
                          row_axis=1)


def write_each_row(arrays: tuple[jax.Array, ...], rows: tuple[jax.Array, ...], start, row_axis: int = 0):
    """arrays with row b of each of `rows` (batch along row_axis, 1 there after the update) written
    at start(b), a tuple of int32 start indices: one in-place slice update per row and array.

    A batched (vmapped) update is a scatter, which XLA's CPU backend ran on a copy of the whole
    array. Up to ROWS_UNROLLED rows the updates are written out one by one (a loop is one more
    loop per layer and step); beyond, a loop keeps the program small."""
    def write_row(b, arrays):
        return tuple(jax.lax.dynamic_update_slice(a, jax.lax.dynamic_index_in_dim(x, b, row_axis), start(b))
                     for a, x in zip(arrays, rows))

    B = rows[0].shape[row_axis]
    if B > ROWS_UNROLLED:
        return jax.lax.fori_loop(0, B, write_row, tuple(arrays))
    arrays = tuple(arrays)
    for b in range(B):
        arrays = write_row(b, arrays)
    return arrays


# Rows up to which `write_each_row` writes its updates out one by one instead of looping.
ROWS_UNROLLED = 16


def slice_start(*indices) -> tuple[jax.Array, ...]:
    """Start indices for `lax.dynamic_(update_)slice`, all int32: the primitive wants one integer
    type, and under jax_enable_x64 a Python 0 or a loop counter would be int64 next to the
    cache's int32 `end`."""
    return tuple(jnp.asarray(i, jnp.int32) for i in indices)


def advance(cache: KVCache, num_tokens: int | jax.Array) -> KVCache:
    return cache.replace(end=cache.end + num_tokens)


def select_rows(cache: KVCache, rows: jax.Array, block_size: int) -> KVCache:
    """Reorders the batch rows of the cache by rows int32 [R] (beam search), copying only the
    blocks of `block_size` slots between the earliest start and `end`, in place: a step's cost
    follows the filled length, not the capacity."""
    L, _, K, S, H = cache.k.shape
    starts = cache.starts[rows]
    if S <= block_size:
        return cache.replace(k=cache.k[:, rows], v=cache.v[:, rows], starts=starts)
    def block(j, kv):
        # The last block may stick out of the cache: read it shifted back and leave the slots
        # of the previous block (already reordered) as they are.
        s0 = jnp.minimum(j * block_size, S - block_size)
        fresh = (s0 + jnp.arange(block_size, dtype=jnp.int32) >= j * block_size)[None, None, None, :, None]

        def reorder(a):
            b = jax.lax.dynamic_slice(a, slice_start(0, 0, 0, s0, 0), (L, a.shape[1], K, block_size, H))
            return jax.lax.dynamic_update_slice(a, jnp.where(fresh, b[:, rows], b),
                                                slice_start(0, 0, 0, s0, 0))

        return tuple(map(reorder, kv))

    first, last = jnp.min(cache.starts) // block_size, (cache.end - 1) // block_size
    k, v = jax.lax.fori_loop(first, last + 1, block, (cache.k, cache.v))
    return cache.replace(k=k, v=v, starts=starts)


def query_mask(cache: KVCache, query_len: int) -> jax.Array:
    """Mask for `query_len` new queries at slots end .. end + T - 1: bool [B, T, S].

    Query t sees each example's valid slots up to and including its own (starts[b] <= s <= end + t,
    with end[b] for a per-row cache). The masked reference that `attention.attend_cache` must
    equal; decoding never builds it.
    """
    slots = jnp.arange(cache.capacity, dtype=jnp.int32)[None, None, :]  # [1, 1, S]
    ends = (jnp.reshape(cache.end, (-1, 1, 1))
            + jnp.arange(1, query_len + 1, dtype=jnp.int32)[None, :, None])  # [B or 1, T, 1], exclusive
    return (slots >= cache.starts[:, None, None]) & (slots < ends)


@flax.struct.dataclass
class CrossKV:
    """Cross-attention keys and values, projected once from the encoder output and reused by
    every decode step.

    Attributes:
      k: [L, B, K, S, H] keys of each decoder layer (heads first, like KVCache).
      v: [L, B, K, S, H] values.
      lengths: int32 [B], real source tokens; keys at index >= length are source padding.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    def mask(self) -> jax.Array:
        """bool [B, S]: True at real source positions."""
        return jnp.arange(self.k.shape[3], dtype=jnp.int32)[None, :] < self.lengths[:, None]

    def repeat(self, n: int) -> "CrossKV":
        """Each example repeated n times along the batch (for beam search): B -> B * n."""
        return CrossKV(k=jnp.repeat(self.k, n, axis=1), v=jnp.repeat(self.v, n, axis=1),
                       lengths=jnp.repeat(self.lengths, n, axis=0))
