"""The KV cache: a preallocated, fixed-capacity pytree of keys and values for every layer.

Layout. Prompts are stored right-aligned: example b's real tokens occupy slots
[starts[b], end) and every example writes its next token at the same slot `end`. One scalar slot
makes each write a single in-place `lax.dynamic_update_slice` instead of a per-row scatter, while
each example keeps its own positions (slot - starts[b]) and its own valid keys, so it decodes
exactly as it would alone. Slots before starts[b] hold padding that is never attended.

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
      end: int32 [], the next slot to write (shared by the batch).
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


def init_cache(
    num_layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype=jnp.float32
) -> KVCache:
    """An empty cache: zeros [L, B, K, S, H], starts = end = 0."""
    shape = (num_layers, batch, kv_heads, capacity, head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        starts=jnp.zeros((batch,), jnp.int32),
        end=jnp.zeros((), jnp.int32),
    )


def check_capacity(capacity: int, needed: int) -> None:
    """Host-side guard: raise before decoding rather than write past the cache's end."""
    if needed > capacity:
        raise ValueError(
            f"capacity {capacity} is too small: prompt length + max_new_tokens = {needed}; "
            f"pass capacity >= {needed}"
        )


def write(cache: KVCache, layer: int, k: jax.Array, v: jax.Array) -> KVCache:
    """Writes new keys/values k, v [B, T, K, H] of `layer` at slots end .. end + T - 1.

    `end` is not advanced: every layer writes the same slots; call `advance` once per step.
    """
    start = (layer, 0, 0, cache.end, 0)
    k = jnp.swapaxes(k, 1, 2)[None].astype(cache.k.dtype)  # [1, B, K, T, H]
    v = jnp.swapaxes(v, 1, 2)[None].astype(cache.v.dtype)
    new_k = jax.lax.dynamic_update_slice(cache.k, k, start)
    new_v = jax.lax.dynamic_update_slice(cache.v, v, start)
    return cache.replace(k=new_k, v=new_v)


def advance(cache: KVCache, num_tokens: int) -> KVCache:
    return cache.replace(end=cache.end + num_tokens)


def query_mask(cache: KVCache, query_len: int) -> jax.Array:
    """Mask for `query_len` new queries at slots end .. end + T - 1: bool [B, T, S].

    Query t sees each example's valid slots up to and including its own (starts[b] <= s <= end + t).
    """
    slots = jnp.arange(cache.capacity)[None, None, :]  # [1, 1, S]
    ends = cache.end + jnp.arange(1, query_len + 1)[None, :, None]  # [1, T, 1], exclusive
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
        return jnp.arange(self.k.shape[3])[None, :] < self.lengths[:, None]

    def repeat(self, n: int) -> "CrossKV":
        """Each example repeated n times along the batch (for beam search): B -> B * n."""
        return CrossKV(k=jnp.repeat(self.k, n, axis=1), v=jnp.repeat(self.v, n, axis=1),
                       lengths=jnp.repeat(self.lengths, n, axis=0))
