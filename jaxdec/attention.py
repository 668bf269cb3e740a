"""Masks and scaled dot-product attention with `-inf` masking and a NaN-free softmax.

Masks are boolean and True where attention is allowed. Every function is pure `jnp` and works
under `jit` and `vmap`; the batched functions take a leading B axis, and `attend` also accepts
unbatched arrays so `vmap(attend)` over examples equals the batched call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec import layers


def causal_mask(query_len: int, key_len: int | None = None, offset: int | jax.Array = 0) -> jax.Array:
    """Lower-triangular mask: query i (at absolute position offset + i) sees keys 0 .. offset + i.

    Returns bool [T, S]. With offset 0 and S == T this is the textbook mask: row i sees columns
    0..i only.
    """
    key_len = query_len if key_len is None else key_len
    rows = jnp.arange(query_len, dtype=jnp.int32)[:, None] + offset  # [T, 1]
    cols = jnp.arange(key_len, dtype=jnp.int32)[None, :]  # [1, S]
    return cols <= rows


def padding_mask(lengths: jax.Array, key_len: int) -> jax.Array:
    """Keys at index >= length are padding. lengths int [B] -> bool [B, S]."""
    return jnp.arange(key_len, dtype=jnp.int32)[None, :] < lengths[:, None]


def key_range_mask(starts: jax.Array, ends: jax.Array, key_len: int) -> jax.Array:
    """Keys in [start, end) are valid. starts, ends int [B] (or scalars) -> bool [B, S]."""
    slots = jnp.arange(key_len, dtype=jnp.int32)[None, :]  # [1, S]
    return (slots >= jnp.reshape(starts, (-1, 1))) & (slots < jnp.reshape(ends, (-1, 1)))


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Logical AND of broadcastable masks, skipping None (None if all are None)."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


def decoder_self_mask(lengths: jax.Array, query_len: int) -> jax.Array:
    """Causal AND padding for right-padded sequences: bool [B, T, T].

    Query rows at padding positions see their earlier real tokens (harmless: their outputs are
    never used), so only an all-padding example can give a fully masked row.
    """
    return combine_masks(causal_mask(query_len)[None], padding_mask(lengths, query_len)[:, None, :])


@jax.custom_vjp
def _masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax of float32 scores over the last axis where mask is True; rows with no allowed key
    are zeros. The row max is replaced by 0 where it is -inf and the denominator by 1 where it
    is 0, so no NaN arises."""
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    unnormalised = jnp.exp(scores - row_max)  # exp(-inf) = 0 for masked keys
    denom = jnp.sum(unnormalised, axis=-1, keepdims=True)
    return unnormalised / jnp.where(denom > 0, denom, 1.0)


def _masked_softmax_fwd(scores, mask):
    probs = _masked_softmax(scores, mask)
    return probs, (probs, mask.shape)


def _masked_softmax_bwd(residuals, g):
    # The softmax Jacobian-vector product p * (g - <g, p>): zero wherever p is zero (masked keys,
    # fully masked rows), so the gradient is finite and never flows into masked scores.
    probs, mask_shape = residuals
    d_scores = probs * (g - jnp.sum(g * probs, axis=-1, keepdims=True))
    return d_scores, np.zeros(mask_shape, jax.dtypes.float0)


_masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


def safe_softmax(scores: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax over the last axis of `jnp.where(mask, scores, -inf)`, in float32.

    A row with no allowed key gives all zeros instead of NaN, and its gradient is zero rather
    than NaN. The backward pass is the closed-form softmax VJP (one fused elementwise pass), not
    autodiff through the masking arithmetic.
    """
    scores = scores.astype(jnp.float32)
    if mask is None:
        return jax.nn.softmax(scores, axis=-1)
    return _masked_softmax(scores, mask)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    heads_first: bool = False,
    zero_unseen_values: bool = True,
    return_probs: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
):
    """Multi-head scaled dot-product attention with grouped K/V heads.

    Args:
      q: [B, T, N, H] queries (or unbatched [T, N, H]).
      k: [B, S, K, H] keys; N % K == 0 (K == N: multi-head, K == 1: multi-query). With
        heads_first, [B, K, S, H]: the KV cache's layout, whose (B, K) batch dims lead as the
        dot wants, so no per-step transpose copy of the cache.
      v: [B, S, K, H] values ([B, K, S, H] with heads_first).
      mask: bool broadcastable to [B, T, S] (or [T, S] unbatched), True where allowed; None: all.
      zero_unseen_values: zero the values no query may see, so NaN or inf there cannot reach the
        output through 0 * NaN.
      return_probs: also return the attention probabilities float32 [B, N, T, S] (for
        inspection; the same softmax the output is computed from).
      scale: the scores' multiplier; None means H ** -0.5.
      softcap: scores become softcap * tanh(scores / softcap) before masking (Gemma 2).

    Returns:
      [B, T, N, H] in q's dtype (rows with no allowed key are zeros); with return_probs, the
      pair (out, probs).
    """
    if q.ndim == 3:
        mask = None if mask is None else jnp.asarray(mask)[None]
        out = attend(q[None], k[None], v[None], mask, heads_first=heads_first,
                     zero_unseen_values=zero_unseen_values, return_probs=return_probs, scale=scale,
                     softcap=softcap)
        return jax.tree.map(lambda a: a[0], out)
    B, T, N, H = q.shape
    K, S = (k.shape[1], k.shape[2]) if heads_first else (k.shape[2], k.shape[1])
    kv = "BKSH" if heads_first else "BSKH"
    if N % K:
        raise ValueError(f"query heads N={N} must be a multiple of key/value heads K={K}")
    G = N // K
    # Multi-head attention (G == 1) keeps 4-D operands: the grouped 5-D form costs layout copies.
    qd, kvd, sd = ("BTKH", kv, "BKTS") if G == 1 else ("BTKGH", kv, "BKGTS")
    q = (q if G == 1 else q.reshape(B, T, K, G, H)) * jnp.asarray(H**-0.5 if scale is None else scale, q.dtype)
    scores = layers.softcap(jnp.einsum(f"{qd},{kvd}->{sd}", q, k), softcap)  # [B, K, (G,) T, S]
    if mask is not None:
        mask = jnp.broadcast_to(mask, (B, T, S))
        if zero_unseen_values:  # a probability of 0 times NaN or inf would still poison the output
            seen = jnp.any(mask, axis=1)  # [B, S]
            v = jnp.where(seen[:, None, :, None] if heads_first else seen[:, :, None, None], v, 0)
        mask = mask[:, None] if G == 1 else mask[:, None, None]  # [B, 1, (1,) T, S]
    probs = safe_softmax(scores, mask)
    out = jnp.einsum(f"{sd},{kvd}->{qd}", probs.astype(v.dtype), v)  # [B, T, K, (G,) H]
    out = out.reshape(B, T, N, H)
    if return_probs:
        return out, probs.reshape(B, N, T, S)
    return out


def attend_causal(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, query_block: int,
                  scale: float | None = None, softcap: float | None = None) -> jax.Array:
    """`attend` of a sequence over itself under a causal mask, skipping the masked upper triangle.

    The queries run in blocks of `query_block` rows; block [lo, hi) reads keys 0 .. hi - 1 only,
    since the mask hides every later key from it. n blocks compute (n + 1) / 2n of the scores
    and values that one pass over the whole square would.

    Args:
      q, k, v: [B, T, N, H], [B, T, K, H], [B, T, K, H]: queries and keys at the same T positions.
      mask: bool broadcastable to [B, T, T], True where allowed, and False wherever key s > query
        t (causal; padding may hide more). Keys past a block's last row are never read, so a mask
        that allowed one would not be obeyed.
      query_block: query rows per block; T <= query_block runs `attend` in one pass.
      scale, softcap: as `attend`.

    Returns:
      [B, T, N, H], equal to `attend(q, k, v, mask)` up to float rounding.
    """
    T = q.shape[1]
    if T <= query_block:
        return attend(q, k, v, mask, scale=scale, softcap=softcap)
    mask = jnp.asarray(mask)
    mask = jnp.broadcast_to(mask, (mask.shape[0] if mask.ndim == 3 else 1, T, T))  # [B or 1, T, T]
    blocks = []
    for lo in range(0, T, query_block):
        hi = min(lo + query_block, T)
        blocks.append(attend(q[:, lo:hi], k[:, :hi], v[:, :hi], mask[:, lo:hi, :hi],
                             scale=scale, softcap=softcap))  # [B, hi - lo, N, H]
    return jnp.concatenate(blocks, axis=1)


def chunked_sum(x: jax.Array, axis: int, chunk: int = 32) -> jax.Array:
    """`jnp.sum(x, axis)`, computed as partial sums over chunks of at most `chunk` elements that
    are then added one by one: XLA's CPU compiler rewrites a longer sum into a windowed reduction
    that does not fuse with the product feeding it (`tuning.Tuning.sum_chunk`). Equal to jnp.sum
    up to float rounding.

    Over the minor (last) axis the chunks are slices of `chunk` (the last one shorter); over
    another axis, a reshape into chunks of the largest divisor of its length that fits (a length
    with no such divisor, or more than 8 chunks, is summed whole). Each axis gets the form that
    ran the decode step's attention faster on CPU (`python -m jaxdec.tools.bench decode --batches 8`).
    """
    axis = axis % x.ndim
    n = x.shape[axis]
    if n <= chunk:
        return jnp.sum(x, axis=axis)
    if axis == x.ndim - 1:
        return functools.reduce(jnp.add, [jnp.sum(x[..., i:i + chunk], axis=axis)
                                          for i in range(0, n, chunk)])
    size = max(d for d in range(1, chunk + 1) if n % d == 0)
    if n // size > 8:  # too many chunks to add one by one
        return jnp.sum(x, axis=axis)
    parts = jnp.sum(x.reshape(x.shape[:axis] + (n // size, size) + x.shape[axis + 1:]), axis=axis + 1)
    return functools.reduce(jnp.add, [jax.lax.index_in_dim(parts, i, axis, keepdims=False)
                                      for i in range(n // size)])


def attend_cache(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    starts: jax.Array,
    end: jax.Array,
    *,
    layer: jax.Array | int = 0,
    block_size: int,
    window: jax.Array | int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sum_chunk: int = 0,
) -> jax.Array:
    """Attention of T new queries over the filled part of a KV cache only.

    The queries sit at slots end .. end + T - 1 and query t sees slots starts[b] .. end + t of
    its example. Keys are read in blocks of `block_size` slots, from the block holding the
    earliest start to the block holding the last query, with an online (running max and sum)
    softmax, so a step costs what the filled slots need, not what the capacity holds. With one
    query per row (a decode step) the scores and values are products summed in fused kernels
    that read each block where it lies in the cache; with more (prefill chunks) they are dots.
    The result equals `attend` over the whole cache with the same mask up to float rounding.

    Args:
      q: [B, T, N, H] queries.
      k, v: [L, B, K, S, H] the cache of every layer (heads before slots); `layer` picks one,
        so a layer scan can carry the whole cache and update it in place.
      starts: int32 [B], first valid slot of each example; end: int32 [], slot of query 0, or
        int32 [B], each example's own (a per-row cache, `cache.KVCache.per_row`).
      layer: int32 [] layer index into k and v.
      block_size: key slots per block; a cache of at most this many slots is read in one pass
        with no loop.
      window: int32 [] (may be traced), a sliding window: query t also sees only slots
        > end + t - window, and blocks wholly before the first query's window are not read, so
        a sliding layer's step costs its window, not the filled length. None: no window.
      scale, softcap: as `attend`.
      sum_chunk: with one query per row (a decode step) and sum_chunk > 0, the scores and values
        are products summed in chunks of at most sum_chunk (`chunked_sum`), which read each block
        where it lies in the cache; 0: einsum dots (`tuning.Tuning.sum_chunk`).

    Returns:
      [B, T, N, H] in q's dtype. Slots beyond end + T - 1 are never read into the output.
    """
    B, T, N, H = q.shape
    _, _, K, capacity, _ = k.shape
    if N % K:
        raise ValueError(f"query heads N={N} must be a multiple of key/value heads K={K}")
    G = N // K
    query_slots = jnp.reshape(end, (-1, 1)) + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B or 1, T]
    if capacity <= block_size and T > 1:
        # One block: the plain masked attention, no loop.
        k_l = jax.lax.dynamic_index_in_dim(k, layer, 0, keepdims=False)  # [B, K, S, H]
        v_l = jax.lax.dynamic_index_in_dim(v, layer, 0, keepdims=False)
        mask = key_range_mask(starts, jnp.full_like(starts, capacity), capacity)[:, None, :]  # [B, 1, S]
        slots = jnp.arange(capacity, dtype=jnp.int32)[None, None, :]
        mask = mask & (slots <= query_slots[:, :, None])  # [B, T, S]
        if window is not None:
            mask = mask & (slots > query_slots[:, :, None] - window)
        return attend(q, k_l, v_l, mask, heads_first=True, scale=scale, softcap=softcap)

    S = min(block_size, capacity)  # the key slots of one block: the S of the einsums below
    qg = (q.reshape(B, T, K, G, H) * jnp.asarray(H**-0.5 if scale is None else scale, q.dtype))  # [B, T, K, G, H]

    def block(j, carry):
        row_max, row_sum, acc = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, H]
        # The last block may stick out of the cache: read it shifted back, and mask the slots
        # that belong to the previous block so that none is counted twice.
        lo = j * S
        s0 = jnp.minimum(lo, capacity - S)
        start = tuple(jnp.asarray(i, jnp.int32) for i in (layer, 0, 0, s0, 0))  # one int type (x64)
        k_b = jax.lax.dynamic_slice(k, start, (1, B, K, S, H))[0]  # [B, K, S, H]
        v_b = jax.lax.dynamic_slice(v, start, (1, B, K, S, H))[0]
        slots = s0 + jnp.arange(S, dtype=jnp.int32)  # [S]
        allowed = ((slots[None, None, :] >= jnp.maximum(lo, starts)[:, None, None])
                   & (slots[None, None, :] <= query_slots[:, :, None]))  # [B, T, S]
        if window is not None:
            allowed = allowed & (slots[None, None, :] > query_slots[:, :, None] - window)
        if T == 1 and sum_chunk:
            # A decode step: one query per row. Products summed in place read the block where it
            # lies in the cache; on CPU a dot cannot read a dynamic slice, so it copies it first.
            # One sum over H = 64 became a windowed reduction of the stored product, unfused
            # with it: both sum in chunks (`chunked_sum`).
            prod = qg[:, 0, :, :, None, :].astype(jnp.float32) * k_b[:, :, None].astype(jnp.float32)
            scores = chunked_sum(prod, axis=-1, chunk=sum_chunk)[:, :, :, None, :]  # [B, K, G, 1, S]
        else:
            scores = jnp.einsum("BTKGH,BKSH->BKGTS", qg, k_b).astype(jnp.float32)
        scores = jnp.where(allowed[:, None, None], layers.softcap(scores, softcap), -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1))
        shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # no -inf - -inf
        probs = jnp.exp(scores - shift[..., None])  # 0 at masked slots
        rescale = jnp.exp(row_max - shift)  # 0 while nothing was seen
        row_sum = row_sum * rescale + jnp.sum(probs, axis=-1)
        # Slots no query may see can hold anything (a reused buffer's earlier contents, a rejected
        # draft's K/V): a probability of 0 times NaN or inf there would still poison the output.
        v_b = jnp.where(jnp.any(allowed, axis=1)[:, None, :, None], v_b, 0)  # [B, K, S, H]
        if T == 1 and sum_chunk:
            prod = probs[:, :, :, 0, :, None] * v_b[:, :, None].astype(jnp.float32)  # [B, K, G, S, H]
            values = chunked_sum(prod, axis=-2, chunk=sum_chunk)[:, :, :, None, :]  # [B, K, G, 1, H]
        else:
            values = jnp.einsum("BKGTS,BKSH->BKGTH", probs.astype(v.dtype), v_b)
        acc = acc * rescale[..., None] + values
        return new_max, row_sum, acc

    init = (jnp.full((B, K, G, T), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
            jnp.zeros((B, K, G, T, H), jnp.float32))
    if capacity <= block_size:
        # A decode step over a small cache: its one block, read in place, with no loop. (The
        # plain attention above reads the layer through dots, which copy it out of the cache
        # first; `python -m jaxdec.tools.bench gpt2 --batches 8` measures the difference.)
        _, row_sum, acc = block(0, init)
    else:
        earliest = jnp.min(starts)
        if window is not None:  # the first query's window starts at end - window + 1
            earliest = jnp.maximum(earliest, jnp.min(end) - window + 1)
        first = earliest // S
        last = (jnp.max(end) + T - 1) // S  # the block of the last query, inclusive
        _, row_sum, acc = jax.lax.fori_loop(first, last + 1, block, init)
    out = acc / jnp.where(row_sum > 0, row_sum, 1.0)[..., None]  # rows that saw nothing: zeros
    return jnp.einsum("BKGTH->BTKGH", out).reshape(B, T, N, H).astype(q.dtype)
