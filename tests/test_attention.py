"""Tests for jaxdec.attention: hand-written masks, attend() against a naive per-head reference,
GQA head grouping, vmap == batch, and no NaN (forward or gradient) on fully masked rows."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdec.attention import (
    attend,
    attend_cache,
    attend_causal,
    causal_mask,
    chunked_sum,
    combine_masks,
    decoder_self_mask,
    key_range_mask,
    padding_mask,
    safe_softmax,
)

T_, F_ = True, False

# The seed's sentence: "[SOS] 나는 학교에" ("[SOS] I school-to"), 3 tokens.
SENTENCE = ["[SOS]", "나는", "학교에"]

# Row i = the query at token i; column j = may it look at token j? Causal: only j <= i.
CAUSAL_3 = np.array(
    [
        # [SOS]  나는  학교에
        [T_, F_, F_],  # [SOS] sees itself only
        [T_, T_, F_],  # 나는 sees [SOS], 나는
        [T_, T_, T_],  # 학교에 sees everything so far
    ]
)


def naive_attend(q, k, v, mask):
    """Per-example, per-head, per-query float64 reference: softmax(q k^T / sqrt(H)) over the
    allowed keys only; a query with no allowed key gives zeros. Query head n uses K/V head
    n // (N // K). q [B,T,N,H], k/v [B,S,K,H], mask bool [B,T,S]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    mask = np.asarray(mask)
    B, T, N, H = q.shape
    K = k.shape[2]
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for n in range(N):
            j = n // (N // K)
            for t in range(T):
                allowed = np.flatnonzero(mask[b, t])
                if allowed.size == 0:
                    continue
                scores = k[b, allowed, j] @ q[b, t, n] / np.sqrt(H)
                w = np.exp(scores - scores.max())
                out[b, t, n] = (w / w.sum()) @ v[b, allowed, j]
    return out


def _qkv(seed, B=2, T=3, S=5, N=4, K=2, H=8):
    """Random float32 q [B,T,N,H], k, v [B,S,K,H] (numpy RNG: no JAX compilation)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, N, H), np.float32)
    k = rng.standard_normal((B, S, K, H), np.float32)
    v = rng.standard_normal((B, S, K, H), np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


# One compiled program per input shape; eager attend would compile every primitive separately.
attend_jit = jax.jit(attend, static_argnames=("heads_first",))


def _mask_with_empty_rows():
    """bool [2, 3, 5]: example 0's query 1 and example 1's query 2 see nothing; in example 1,
    key slots 1 and 2 are seen by no query."""
    return jnp.array(
        [
            [[T_, F_, T_, F_, F_], [F_, F_, F_, F_, F_], [T_, T_, F_, T_, T_]],
            [[F_, F_, F_, F_, T_], [T_, F_, F_, T_, T_], [F_, F_, F_, F_, F_]],
        ]
    )


# --- masks by hand ----------------------------------------------------------------------------


def test_causal_mask_korean_sentence():
    mask = causal_mask(len(SENTENCE))
    chex.assert_shape(mask, (3, 3))
    chex.assert_type(mask, bool)
    np.testing.assert_array_equal(mask, CAUSAL_3)
    # Read as words: token i may see exactly the words up to and including itself.
    for i, word in enumerate(SENTENCE):
        visible = [SENTENCE[j] for j in range(3) if mask[i, j]]
        assert visible == SENTENCE[: i + 1], (word, visible)


def test_causal_mask_with_offset_and_longer_keys():
    # Two new queries at absolute positions 3 and 4 over 6 key slots (decode-style).
    expected = np.array(
        [
            [T_, T_, T_, T_, F_, F_],
            [T_, T_, T_, T_, T_, F_],
        ]
    )
    np.testing.assert_array_equal(causal_mask(2, 6, offset=3), expected)
    # One decode-step query at position 2 sees keys 0..2, not just key 0 (the top-left pitfall).
    np.testing.assert_array_equal(causal_mask(1, 4, offset=jnp.int32(2)), [[T_, T_, T_, F_]])


def test_padding_mask_by_hand():
    # "[SOS] 나는 학교에" (3 real tokens), "[SOS] 나는 [PAD]" (2), "[SOS] [PAD] [PAD]" (1),
    # and an all-padding row (0).
    mask = padding_mask(jnp.array([3, 2, 1, 0]), 3)
    expected = np.array(
        [
            [T_, T_, T_],
            [T_, T_, F_],
            [T_, F_, F_],
            [F_, F_, F_],
        ]
    )
    chex.assert_shape(mask, (4, 3))
    np.testing.assert_array_equal(mask, expected)


def test_decoder_self_mask_by_hand():
    # Example 0: "[SOS] 나는 학교에" (length 3); example 1: "[SOS] 나는 [PAD]" (length 2);
    # example 2: all padding (length 0).
    mask = decoder_self_mask(jnp.array([3, 2, 0]), 3)
    expected = np.array(
        [
            CAUSAL_3,
            [
                [T_, F_, F_],
                [T_, T_, F_],
                [T_, T_, F_],  # the [PAD] query sees the real tokens, never itself
            ],
            np.zeros((3, 3), bool),
        ]
    )
    chex.assert_shape(mask, (3, 3, 3))
    np.testing.assert_array_equal(mask, expected)


def test_key_range_and_combine_masks_by_hand():
    mask = key_range_mask(jnp.array([1, 0, 3]), jnp.array([3, 4, 3]), 4)
    expected = np.array(
        [
            [F_, T_, T_, F_],
            [T_, T_, T_, T_],
            [F_, F_, F_, F_],  # empty range
        ]
    )
    chex.assert_shape(mask, (3, 4))
    np.testing.assert_array_equal(mask, expected)

    a = jnp.array([[T_, T_, F_]])
    b = jnp.array([[T_, F_, F_], [F_, T_, T_]])
    np.testing.assert_array_equal(combine_masks(a, None, b), [[T_, F_, F_], [F_, T_, F_]])
    np.testing.assert_array_equal(combine_masks(None, b), b)
    assert combine_masks(None, None) is None
    assert combine_masks() is None


# --- jit and non-jit agree (shapes and values) ------------------------------------------------


class AttentionVariantsTest(chex.TestCase):
    """Every public function of jaxdec.attention, jitted and not, against the same expectation."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_masks(self):
        causal = self.variant(causal_mask, static_argnums=(0, 1))
        out = causal(3, 3, 0)
        chex.assert_shape(out, (3, 3))
        np.testing.assert_array_equal(out, CAUSAL_3)
        np.testing.assert_array_equal(causal(2, 6, 3), np.arange(6)[None, :] <= np.array([[3], [4]]))

        pad = self.variant(padding_mask, static_argnums=(1,))
        out = pad(jnp.array([3, 2, 0]), 4)
        chex.assert_shape(out, (3, 4))
        np.testing.assert_array_equal(out, np.arange(4)[None, :] < np.array([[3], [2], [0]]))

        self_mask = self.variant(decoder_self_mask, static_argnums=(1,))
        out = self_mask(jnp.array([3, 2]), 3)
        chex.assert_shape(out, (2, 3, 3))
        np.testing.assert_array_equal(out[0], CAUSAL_3)
        np.testing.assert_array_equal(out[1], CAUSAL_3 & np.array([T_, T_, F_])[None, :])

        key_range = self.variant(key_range_mask, static_argnums=(2,))
        out = key_range(jnp.array([1, 0]), jnp.array([3, 1]), 4)
        chex.assert_shape(out, (2, 4))
        np.testing.assert_array_equal(out, [[F_, T_, T_, F_], [T_, F_, F_, F_]])

        combine = self.variant(lambda a, b: combine_masks(a, None, b))
        out = combine(jnp.ones((2, 1, 4), bool), jnp.array([[[T_, F_, T_, F_]]]))
        chex.assert_shape(out, (2, 1, 4))
        np.testing.assert_array_equal(out, np.broadcast_to([T_, F_, T_, F_], (2, 1, 4)))

    @chex.variants(with_jit=True, without_jit=True)
    def test_safe_softmax(self):
        scores = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 5), np.float32) * 3.0)
        mask = _mask_with_empty_rows()
        probs = self.variant(safe_softmax)(scores, mask)
        chex.assert_shape(probs, (2, 3, 5))
        chex.assert_type(probs, jnp.float32)
        s = np.asarray(scores, np.float64)
        m = np.asarray(mask)
        e = np.where(m, np.exp(s - s.max(-1, keepdims=True)), 0.0)
        denom = e.sum(-1, keepdims=True)
        expected = np.divide(e, denom, out=np.zeros_like(e), where=denom > 0)
        chex.assert_trees_all_close(probs, expected.astype(np.float32), atol=1e-6, rtol=0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_attend_matches_naive_reference(self):
        q, k, v = _qkv(2)
        mask = _mask_with_empty_rows()
        out = self.variant(attend)(q, k, v, mask)
        chex.assert_shape(out, q.shape)
        chex.assert_type(out, jnp.float32)
        chex.assert_trees_all_close(out, naive_attend(q, k, v, mask).astype(np.float32), atol=1e-5, rtol=0)


# --- attend: reference, GQA grouping, layouts, vmap -------------------------------------------


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_attend_matches_naive_reference_per_head(num_kv_heads):
    q, k, v = _qkv(3, B=2, T=4, S=6, N=4, K=num_kv_heads, H=8)
    mask = jnp.asarray(causal_mask(4, 6, offset=2))[None] & padding_mask(jnp.array([6, 4]), 6)[:, None, :]
    out = attend_jit(q, k, v, mask)
    chex.assert_shape(out, (2, 4, 4, 8))
    chex.assert_trees_all_close(out, naive_attend(q, k, v, mask).astype(np.float32), atol=1e-5, rtol=0)


def test_attend_no_mask_is_plain_softmax_attention():
    q, k, v = _qkv(4, K=4)
    out = attend_jit(q, k, v)
    expected = naive_attend(q, k, v, np.ones((2, 3, 5), bool))
    chex.assert_trees_all_close(out, expected.astype(np.float32), atol=1e-5, rtol=0)


def test_gqa_query_head_n_reads_kv_head_n_div_group():
    # Values are constant per K/V head (head j holds j + 1 everywhere), so every attention output
    # of query head n equals (kv head it reads) + 1, whatever the softmax weights are.
    B, T, S, N, K, H = 2, 3, 5, 6, 3, 4
    q, k, _ = _qkv(5, B, T, S, N, K, H)
    v = jnp.broadcast_to((jnp.arange(K, dtype=jnp.float32) + 1.0)[None, None, :, None], (B, S, K, H))
    out = attend_jit(q, k, v, causal_mask(T, S, offset=2))
    expected_head = np.arange(N) // (N // K) + 1.0  # 1, 1, 2, 2, 3, 3
    chex.assert_trees_all_close(
        out, np.broadcast_to(expected_head[None, None, :, None], (B, T, N, H)).astype(np.float32),
        atol=1e-6, rtol=0,
    )


def test_attend_heads_first_layout_equals_default_layout():
    q, k, v = _qkv(6)
    mask = _mask_with_empty_rows()
    out = attend_jit(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, heads_first=True)
    chex.assert_trees_all_close(out, attend_jit(q, k, v, mask), atol=1e-6, rtol=0)


def test_vmap_of_unbatched_attend_equals_batched_call():
    q, k, v = _qkv(8, B=3, T=3, S=5, N=4, K=2)
    mask = jnp.concatenate([_mask_with_empty_rows(), causal_mask(3, 5, offset=2)[None]], axis=0)
    batched = attend_jit(q, k, v, mask)
    vmapped = jax.jit(jax.vmap(attend))(q, k, v, mask)  # each call sees q [T,N,H], k/v [S,K,H], mask [T,S]
    chex.assert_shape(vmapped, (3, 3, 4, 8))
    chex.assert_trees_all_close(vmapped, batched, atol=1e-6, rtol=0)
    # Unbatched heads-first ([K,S,H]) and unmasked calls vmap the same way.
    vmapped_hf = jax.jit(jax.vmap(lambda q, k, v, m: attend(q, k, v, m, heads_first=True)))(
        q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask
    )
    chex.assert_trees_all_close(vmapped_hf, batched, atol=1e-6, rtol=0)
    chex.assert_trees_all_close(jax.jit(jax.vmap(attend))(q, k, v), attend_jit(q, k, v), atol=1e-6, rtol=0)


def test_attend_rejects_heads_not_divisible():
    q, k, v = _qkv(9, N=4, K=3)
    with pytest.raises(ValueError, match="multiple"):
        attend_jit(q, k, v)


def test_attend_keeps_query_dtype():
    q, k, v = (a.astype(jnp.bfloat16) for a in _qkv(10))
    out = attend_jit(q, k, v, _mask_with_empty_rows())
    chex.assert_type(out, jnp.bfloat16)
    q32, k32, v32 = (a.astype(jnp.float32) for a in (q, k, v))
    expected = naive_attend(q32, k32, v32, _mask_with_empty_rows())
    chex.assert_trees_all_close(out.astype(jnp.float32), expected.astype(np.float32), atol=5e-2, rtol=0)


# --- no NaN on fully masked rows, forward and gradient ----------------------------------------


def test_fully_masked_rows_give_exact_zeros_not_nan():
    q, k, v = _qkv(11)
    mask = _mask_with_empty_rows()
    # The pitfall this guards against: a plain -inf softmax is NaN on these rows.
    naive = jax.nn.softmax(jnp.where(mask, jnp.ones((2, 3, 5)), -jnp.inf), axis=-1)
    assert np.isnan(naive[0, 1]).all() and np.isnan(naive[1, 2]).all()

    out = attend_jit(q, k, v, mask)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0, 1], 0.0)
    np.testing.assert_array_equal(out[1, 2], 0.0)
    assert np.abs(out[0, 0]).min() > 0  # rows with keys are not zeroed

    probs = safe_softmax(jnp.ones((2, 3, 5)), mask)
    np.testing.assert_array_equal(probs[0, 1], 0.0)
    np.testing.assert_array_equal(probs[1, 2], 0.0)
    np.testing.assert_array_equal(np.where(mask, 0.0, probs), 0.0)  # masked keys get exactly 0
    chex.assert_trees_all_close(probs[0, 0], jnp.array([0.5, 0, 0.5, 0, 0]), atol=1e-7, rtol=0)


def test_all_false_mask_attends_to_nothing():
    q, k, v = _qkv(12)
    out = attend_jit(q, k, v, jnp.zeros((3, 5), bool))  # mask [T, S] broadcast over the batch
    np.testing.assert_array_equal(out, np.zeros(q.shape, np.float32))
    out = jax.jit(jax.vmap(attend))(q, k, v, jnp.zeros((2, 3, 5), bool))
    np.testing.assert_array_equal(out, np.zeros(q.shape, np.float32))


def test_gradients_through_fully_masked_rows_are_finite():
    q, k, v = _qkv(13)
    mask = _mask_with_empty_rows()
    weights = jnp.asarray(np.random.default_rng(14).standard_normal(q.shape, np.float32))

    def loss(q, k, v):
        return jnp.sum(attend_jit(q, k, v, mask) * weights)

    gq, gk, gv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for g in (gq, gk, gv):
        assert np.isfinite(g).all()
    # A query that attends to nothing has no influence on the loss.
    np.testing.assert_array_equal(gq[0, 1], 0.0)
    np.testing.assert_array_equal(gq[1, 2], 0.0)
    assert np.abs(gq[0, 0]).sum() > 0  # ...while the others do get gradient
    # Keys no query of example 1 may see (slots masked in every row) get zero gradient.
    unseen = ~np.asarray(mask[1]).any(0)
    assert unseen.sum() == 2
    np.testing.assert_array_equal(np.asarray(gk[1])[unseen], 0.0)
    np.testing.assert_array_equal(np.asarray(gv[1])[unseen], 0.0)

    # The same through safe_softmax alone, scores with large magnitude included.
    rng = np.random.default_rng(15)
    scores = jnp.asarray(rng.standard_normal((2, 3, 5), np.float32) * 50.0)
    c = jnp.asarray(rng.standard_normal((2, 3, 5), np.float32))
    g = jax.jit(jax.grad(lambda s: jnp.sum(safe_softmax(s, mask) * c)))(scores)
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(np.where(np.asarray(mask), 0.0, g), 0.0)  # masked: exactly 0


def test_nan_in_masked_key_slots_does_not_leak():
    # Masked scores are replaced by -inf, so garbage keys in unused cache slots are harmless.
    q, k, v = _qkv(17)
    mask = _mask_with_empty_rows()
    k_bad = jnp.where(np.asarray(mask).any(1)[:, :, None, None], k, jnp.nan)
    out = attend_jit(q, k_bad, v, mask)
    assert np.isfinite(out).all()
    chex.assert_trees_all_close(out, attend_jit(q, k, v, mask), atol=0, rtol=0)


def test_nan_in_masked_value_slots_does_not_leak():
    q, k, v = _qkv(18)
    mask = _mask_with_empty_rows()
    v_bad = jnp.where(np.asarray(mask).any(1)[:, :, None, None], v, jnp.nan)
    out = attend_jit(q, k, v_bad, mask)
    assert np.isfinite(out).all()


# --- attend_causal: query blocks that skip the masked upper triangle ------------------------

_attend_causal_jit = jax.jit(attend_causal, static_argnames="query_block")


@pytest.mark.parametrize("T, query_block", [(7, 3), (9, 4), (8, 8), (5, 16)])  # uneven last block, one block
def test_attend_causal_equals_attend_over_the_whole_square(T, query_block):
    # Causal and padding: example 0 is all real, example 1 has 2 real tokens (its padded queries
    # see their own real keys only), example 2 none (every row fully masked).
    q, k, v = _qkv(31, B=3, T=T, S=T, N=4, K=2)
    mask = decoder_self_mask(jnp.array([T, 2, 0]), T)
    out = _attend_causal_jit(q, k, v, mask, query_block=query_block)
    chex.assert_shape(out, q.shape)
    # float64 per-query reference; float32 attend itself agrees with it to 1e-5 above
    chex.assert_trees_all_close(out, naive_attend(q, k, v, mask).astype(np.float32), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out[2], 0.0)
    # and its gradients equal those of one pass over the square (float32 sums in another order)
    weights = jnp.asarray(np.random.default_rng(32).standard_normal(q.shape, np.float32))
    grads = [jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * weights), argnums=(0, 1, 2)))(q, k, v)
             for f in (lambda q, k, v: attend_causal(q, k, v, mask, query_block=query_block),
                       lambda q, k, v: attend(q, k, v, mask))]
    chex.assert_trees_all_close(grads[0], grads[1], atol=1e-5, rtol=0)
    for g in grads[0]:
        assert np.isfinite(g).all()


def test_attend_causal_broadcast_mask_and_nan_beyond_the_diagonal():
    # A [T, T] mask broadcast over the batch; keys and values past every block's last row are
    # never read, so NaN planted above the diagonal of block 0 cannot reach any output.
    q, k, v = _qkv(33, B=2, T=6, S=6, N=2, K=2)
    mask = causal_mask(6)
    expected = naive_attend(q, k, v, np.broadcast_to(mask, (2, 6, 6))).astype(np.float32)
    chex.assert_trees_all_close(_attend_causal_jit(q, k, v, mask, query_block=3), expected, atol=1e-5, rtol=0)
    k_bad, v_bad = k.at[:, 3:].set(jnp.nan), v.at[:, 3:].set(jnp.nan)
    out = _attend_causal_jit(q, k_bad, v_bad, mask, query_block=3)
    assert np.isfinite(out[:, :3]).all()
    chex.assert_trees_all_close(out[:, :3], expected[:, :3], atol=1e-5, rtol=0)


# --- attend_cache: blocks of the filled cache == masked attention over all of it ---------------

_attend_cache_jit = jax.jit(attend_cache, static_argnames="block_size")


@pytest.mark.parametrize("num_kv_heads", [4, 2])
@pytest.mark.parametrize("capacity", [13, 16])  # 13: not a multiple of any block size used
@pytest.mark.parametrize("block_size", [3, 4, 5, 13, 16])  # 13, 16: the whole cache in one block
def test_attend_cache_equals_masked_attention_over_the_whole_cache(num_kv_heads, capacity, block_size):
    """Rows of lengths 1, block-1, block, block+1 and the full filled length, at several ends
    and query counts: the blocked online softmax equals `attend` over all S slots with the
    cache's mask (1e-5). Slots past the newest query hold large garbage inside its block (they
    are masked) and NaN beyond it (those blocks are never read). A cache of at most one block
    takes the loop-free paths (one query: the single block read in place; more: `attend`)."""
    B, N, H, L = 5, 4, 8, 2
    rng = np.random.default_rng(capacity * 10 + block_size)
    for T, end in ((1, 6), (1, capacity - 1), (3, 7), (2, capacity - 2)):
        lengths = np.array([1, block_size - 1, block_size, block_size + 1, end], np.int32)
        starts = np.clip(end - lengths, 0, end).astype(np.int32)
        k = rng.standard_normal((L, B, num_kv_heads, capacity, H)).astype(np.float32)
        v = rng.standard_normal((L, B, num_kv_heads, capacity, H)).astype(np.float32)
        k[:, :, :, end + T:] = 1e4  # not written yet: masked
        v[:, :, :, end + T:] = 1e4
        k[:, :, :, -(-(end + T) // block_size) * block_size:] = np.nan  # blocks never read
        v[:, :, :, -(-(end + T) // block_size) * block_size:] = np.nan
        q = rng.standard_normal((B, T, N, H)).astype(np.float32)
        slots = np.arange(capacity)
        mask = (slots[None, None, :] >= starts[:, None, None]) & (
            slots[None, None, :] <= end + np.arange(T)[None, :, None])  # [B, T, S]
        layer = 1
        expected = naive_attend(q, np.swapaxes(np.nan_to_num(k[layer]), 1, 2),
                                np.swapaxes(np.nan_to_num(v[layer]), 1, 2), mask)
        assert np.all(np.isfinite(expected))
        out = _attend_cache_jit(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(starts),
                                jnp.asarray(end, jnp.int32), layer=jnp.asarray(layer), block_size=block_size)
        chex.assert_shape(out, (B, T, N, H))
        chex.assert_trees_all_close(out, expected.astype(np.float32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("head_dim", [64, 80])
def test_single_query_blocks_of_real_size_equal_masked_attention(head_dim):
    """A decode step (one query per row) at a real head size and 64-slot blocks, where the
    single-query path sums the scores over H in slices of at most 32 (80: 32 + 32 + 16) and the
    values over the block's slots in chunks (2 x 32): equal to `attend` over the whole cache
    (1e-5)."""
    B, N, K, L, capacity, block = 3, 4, 2, 2, 150, 64
    rng = np.random.default_rng(head_dim)
    end = 140
    starts = np.array([0, 60, 139], np.int32)
    k = rng.standard_normal((L, B, K, capacity, head_dim)).astype(np.float32)
    v = rng.standard_normal((L, B, K, capacity, head_dim)).astype(np.float32)
    k[:, :, :, end + 1:] = 1e4  # not written yet: read with the last block, masked
    v[:, :, :, end + 1:] = 1e4
    q = rng.standard_normal((B, 1, N, head_dim)).astype(np.float32)
    slots = np.arange(capacity)
    mask = (slots[None, None, :] >= starts[:, None, None]) & (slots[None, None, :] <= end)  # [B, 1, S]
    expected = naive_attend(q, np.swapaxes(k[1], 1, 2), np.swapaxes(v[1], 1, 2), mask)
    out = _attend_cache_jit(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(starts),
                            jnp.asarray(end, jnp.int32), layer=jnp.asarray(1), block_size=block)
    chex.assert_shape(out, (B, 1, N, head_dim))
    chex.assert_trees_all_close(out, expected.astype(np.float32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape, axis", [((3, 64), -1), ((2, 80, 5), 1), ((4, 67), -1), ((2, 128, 3), -2),
                                         ((5, 8), 0), ((67, 2), 0)])
def test_chunked_sum_equals_sum(shape, axis):
    """Chunked partial sums equal one jnp.sum (float64 reference, 1e-5): slices of the minor axis
    (64; 67 as 32 + 32 + 3), reshaped chunks of another (80, 128), a prime length off the minor
    axis (67, summed whole) and lengths under the chunk."""
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    got = chunked_sum(jnp.asarray(x), axis)
    np.testing.assert_allclose(got, x.astype(np.float64).sum(axis), atol=1e-5, rtol=0)


def test_attend_cache_row_with_no_keys_is_zero():
    """A row whose start lies past every query slot sees nothing: zeros, not NaN."""
    k = jnp.ones((1, 2, 1, 10, 4), jnp.float32)
    q = jnp.ones((2, 1, 1, 4), jnp.float32)
    out = _attend_cache_jit(q, k, k, jnp.array([0, 9], jnp.int32), jnp.asarray(5, jnp.int32), block_size=3)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_allclose(out[0], 1.0, atol=1e-6)


def _softmax_case(seed: int):
    rng = np.random.default_rng(seed)
    scores = jnp.asarray(rng.standard_normal((2, 3, 5), np.float32) * 3.0)
    cotangent = jnp.asarray(rng.standard_normal((2, 3, 5), np.float32))
    return scores, _mask_with_empty_rows(), cotangent


def test_safe_softmax_gradient_equals_jax_softmax_gradient_on_rows_with_keys():
    """The custom backward pass against autodiff of jax.nn.softmax: on every row with an allowed
    key the gradients agree; a fully masked row (zeros forward) has zero gradient."""
    scores, mask, c = _softmax_case(21)
    has_key = jnp.any(mask, axis=-1, keepdims=True)  # [B, T, 1]
    assert not bool(jnp.all(has_key)) and bool(jnp.any(has_key))  # both kinds of row are present

    def ours(s):
        return jnp.sum(safe_softmax(s, mask) * c)

    def reference(s):
        # Masked keys get a huge negative score instead of -inf: autodiff of the plain softmax
        # then gives the exact masked-softmax gradient on rows with keys (and 0 on masked keys).
        probs = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1)
        return jnp.sum(jnp.where(has_key, probs, 0.0) * c)

    g_ours, g_ref = jax.grad(ours)(scores), jax.grad(reference)(scores)
    np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_ref), atol=1e-6, rtol=1e-5)
    assert np.abs(np.asarray(g_ours)).sum() > 0.1  # not trivially zero everywhere
    # The vector-Jacobian products of both, for a second (random) cotangent, via jax.vjp.
    _, vjp_ours = jax.vjp(lambda s: safe_softmax(s, mask), scores)
    _, vjp_ref = jax.vjp(lambda s: jnp.where(has_key, jax.nn.softmax(jnp.where(mask, s, -1e30), -1), 0.0),
                         scores)
    c2 = jnp.asarray(np.random.default_rng(22).standard_normal((2, 3, 5), np.float32))
    np.testing.assert_allclose(np.asarray(vjp_ours(c2)[0]), np.asarray(vjp_ref(c2)[0]), atol=1e-6, rtol=1e-5)


def test_safe_softmax_gradient_passes_check_grads():
    """jax.test_util.check_grads compares the custom VJP with finite differences of the forward
    pass (reverse mode only: a custom_vjp function has no JVP rule)."""
    from jax.test_util import check_grads

    scores, mask, _ = _softmax_case(23)
    check_grads(lambda s: safe_softmax(s, mask), (scores,), order=1, modes=("rev",), eps=1e-3,
                atol=2e-3, rtol=2e-3)


_attend_cache_window_jit = jax.jit(attend_cache, static_argnames=("block_size", "scale", "softcap"))


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("window", [1, 5, 9])
def test_attend_cache_sliding_window_reads_only_the_blocks_inside_it(T, window):
    """A sliding window (query slot q sees key slots q - W < k <= q, and the row's own start):
    equal to the naive masked reference (1e-5), with NaN planted in every key and value slot of
    the blocks wholly before the first query's window. A block that were read would carry its
    NaN into the output through 0 * NaN, so finite outputs show those blocks are never read:
    the step costs the window, not the filled length."""
    B, N, K, H, L, capacity, block = 3, 4, 2, 8, 2, 64, 4
    rng = np.random.default_rng(window + 10 * T)
    end = 41
    starts = np.array([0, 30, 40], np.int32)
    k = rng.standard_normal((L, B, K, capacity, H)).astype(np.float32)
    v = rng.standard_normal((L, B, K, capacity, H)).astype(np.float32)
    first_block = max(0, end - window + 1) // block
    k[:, :, :, : first_block * block] = np.nan
    v[:, :, :, : first_block * block] = np.nan
    k[:, :, :, end + T:] = 1e4  # not written yet
    v[:, :, :, end + T:] = 1e4
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    slots = np.arange(capacity)[None, None, :]
    query = end + np.arange(T)[None, :, None]
    mask = (slots >= starts[:, None, None]) & (slots <= query) & (slots > query - window)  # [B, T, S]
    expected = naive_attend(q, np.swapaxes(np.nan_to_num(k[1]), 1, 2), np.swapaxes(np.nan_to_num(v[1]), 1, 2), mask)
    out = _attend_cache_window_jit(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(starts),
                                   jnp.asarray(end, jnp.int32), layer=jnp.asarray(1), block_size=block,
                                   window=jnp.asarray(window, jnp.int32))
    chex.assert_shape(out, (B, T, N, H))
    chex.assert_trees_all_close(out, expected.astype(np.float32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("block_size", [4, 64])  # blocks with an online softmax; one block
@pytest.mark.parametrize("T", [1, 3])
def test_attend_cache_scale_and_softcap_equal_a_hand_written_reference(block_size, T):
    """Scores s = scale * q.k, capped to c * tanh(s / c) before the mask (Gemma 2): the cache's
    blocked attention and `attend` both equal a float64 numpy computation (1e-5)."""
    B, N, K, H, capacity, scale, cap = 2, 4, 2, 8, 20, 0.7, 2.5
    rng = np.random.default_rng(T)
    end = 15
    starts = np.array([0, 6], np.int32)
    k = 3 * rng.standard_normal((1, B, K, capacity, H))
    v = rng.standard_normal((1, B, K, capacity, H))
    q = 3 * rng.standard_normal((B, T, N, H))
    kh = np.repeat(k[0], N // K, axis=1)  # [B, N, S, H]
    vh = np.repeat(v[0], N // K, axis=1)
    s = cap * np.tanh(scale * np.einsum("btnh,bnsh->bnts", q, kh) / cap)
    slots = np.arange(capacity)[None, None, None, :]
    allowed = (slots >= starts[:, None, None, None]) & (slots <= end + np.arange(T)[None, None, :, None])
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.einsum("bnts,bnsh->btnh", p, vh)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    out = _attend_cache_window_jit(f32(q), f32(k), f32(v), jnp.asarray(starts), jnp.asarray(end, jnp.int32),
                                   block_size=block_size, scale=scale, softcap=cap)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    mask = jnp.asarray(allowed[:, 0])  # [B, T, S]
    plain = attend(f32(q), f32(k[0]), f32(v[0]), mask, heads_first=True, scale=scale, softcap=cap)
    np.testing.assert_allclose(plain, expected, atol=1e-5, rtol=0)
