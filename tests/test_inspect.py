"""Tests for jaxdec.inspect: probabilities equal a softmax recomputed by hand from q and k, masks
equal hand-written tables for the seed sentence, rows sum to 1 over allowed keys and are 0 on
masked ones (all zeros for a fully masked row), cross-attention follows the padded sources,
logits equal forward's."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec
from jaxdec import inspect as jinspect
from jaxdec.config import DecoderConfig, Seq2SeqConfig
from jaxdec.data.tokenizer import BOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer

TOKENIZER = ByteTokenizer()

# Byte-level models over the tokenizer's 259 ids, long enough for the Korean sentences (28 tokens).
BYTE_CONFIG = DecoderConfig(vocab_size=VOCAB_SIZE, num_layers=1, d_model=16, num_heads=2, max_len=32)
SEQ2SEQ_CONFIG = Seq2SeqConfig(vocab_size=37, num_encoder_layers=1, num_decoder_layers=2, d_model=32,
                               num_heads=4, num_kv_heads=2, max_len=16, init_std=0.4)

# "[SOS] 나는 학교에 간다": [SOS], then 3 UTF-8 bytes per syllable and 1 per space: 24 tokens.
SEED = "나는 학교에 간다"
# Row i = the query at token i; column j: may it look at token j? Causal: exactly j <= i.
SEED_CAUSAL = [
    "1.......................",  # [SOS]
    "11......................",  # 나 (EB)
    "111.....................",  # 나 (82)
    "1111....................",  # 나 (98)
    "11111...................",  # 는 (EB)
    "111111..................",  # 는 (8A)
    "1111111.................",  # 는 (94)
    "11111111................",  # space
    "111111111...............",  # 학 (ED)
    "1111111111..............",  # 학 (95)
    "11111111111.............",  # 학 (99)
    "111111111111............",  # 교 (EA)
    "1111111111111...........",  # 교 (B5)
    "11111111111111..........",  # 교 (90)
    "111111111111111.........",  # 에 (EC)
    "1111111111111111........",  # 에 (97)
    "11111111111111111.......",  # 에 (90)
    "111111111111111111......",  # space
    "1111111111111111111.....",  # 간 (EA)
    "11111111111111111111....",  # 간 (B0)
    "111111111111111111111...",  # 간 (84)
    "1111111111111111111111..",  # 다 (EB)
    "11111111111111111111111.",  # 다 (8B)
    "111111111111111111111111",  # 다 (A4)
]

# The batch ("오늘 어디에 갈꺼니?", "나는 학교에 간다") right-padded to 28 tokens: key j of example b is
# real iff j < length[b] (28 and 24).
BATCH = ("오늘 어디에 갈꺼니?", SEED)
BATCH_PADDING = [
    "1111111111111111111111111111",  # [SOS] 오늘 어디에 갈꺼니?
    "111111111111111111111111....",  # [SOS] 나는 학교에 간다 [PAD] x 4
]
# The short example's self mask: causal AND padding. PAD columns are never seen; PAD rows (whose
# outputs are ignored) see the 24 real tokens.
SHORT_SELF = [row + "...." for row in SEED_CAUSAL] + ["111111111111111111111111...."] * 4


# One compiled program per config instead of one per random array.
init_params = jax.jit(jaxdec.init_params, static_argnums=0)


def table(rows: list[str]) -> np.ndarray:
    return np.array([[c == "1" for c in row] for row in rows])


def encode_batch(texts) -> tuple[np.ndarray, np.ndarray]:
    rows = [TOKENIZER.encode(t, bos=True) for t in texts]
    tokens = np.full((len(rows), max(len(r) for r in rows)), PAD_ID, np.int32)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    return tokens, np.array([len(r) for r in rows], np.int32)


def layer0(params: dict) -> dict:
    """Layer 0's parameters, whether the layers are a list of dicts or stacked [L, ...] arrays."""
    layers = params["layers"]
    return layers[0] if isinstance(layers, (list, tuple)) else jax.tree.map(lambda a: a[0], layers)


def by_hand_layer0_probs(params: dict, config: DecoderConfig, tokens: np.ndarray, mask: np.ndarray):
    """Layer 0's attention probabilities in float64 numpy, from the parameters alone.

    Embedding (+ learned positions or RoPE), pre-LN LayerNorm, the fused QKV matmul, scaled
    scores q.k / sqrt(H) (query head n reads K head n // G) and a softmax over the keys `mask`
    allows (zeros for a row with none). Returns [B, N, T, T].
    """
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    p = jax.tree.map(f64, layer0(params))
    B, T = tokens.shape
    N, K, H = config.num_heads, config.kv_heads, config.head_dim
    x = f64(params["embed"])[tokens]  # [B, T, D]
    if config.position == "learned":
        x = x + f64(params["pos_embed"])[None, :T]
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    h = (x - mean) / np.sqrt(var + config.layer_norm_eps) * p["attn_norm"]["scale"] + p["attn_norm"]["bias"]
    qkv = h @ p["attn"]["qkv"] + p["attn"].get("qkv_bias", 0.0)
    q = qkv[..., : N * H].reshape(B, T, N, H)
    k = qkv[..., N * H : (N + K) * H].reshape(B, T, K, H)
    if config.position == "rope":
        angle = np.arange(T)[:, None] * config.rope_base ** (-np.arange(0, H, 2) / H)  # [T, H/2]
        cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]

        def rotate(a):
            a1, a2 = a[..., : H // 2], a[..., H // 2 :]
            return np.concatenate([a1 * cos - a2 * sin, a2 * cos + a1 * sin], -1)

        q, k = rotate(q), rotate(k)
    k = np.repeat(k, N // K, axis=2)  # query head n reads K/V head n // G
    scores = np.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(H)
    scores = np.where(mask[:, None], scores, -np.inf)
    top = scores.max(-1, keepdims=True)
    w = np.where(mask[:, None], np.exp(scores - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = w.sum(-1, keepdims=True)
    return w / np.where(total > 0, total, 1.0)


@pytest.fixture(scope="module", params=["learned", "rope_gqa"])
def decoder_case(request, decoder_configs, params_for):
    """(config, params, tokens [2, 6], lengths [2], Attention): one compiled pass per config."""
    config = decoder_configs[request.param]
    params = params_for(config)
    tokens = np.array([[3, 7, 1, 30, 12, 5], [9, 2, 14, 0, 0, 0]], np.int32)
    lengths = np.array([6, 3], np.int32)
    return config, params, tokens, lengths, jinspect.attention(params, config, tokens, lengths)


def test_probabilities_equal_softmax_recomputed_from_q_and_k(decoder_case):
    config, params, tokens, lengths, result = decoder_case
    T = tokens.shape[1]
    mask = np.tril(np.ones((T, T), bool))[None] & (np.arange(T)[None, None, :] < lengths[:, None, None])
    expected = by_hand_layer0_probs(params, config, tokens, mask)
    np.testing.assert_allclose(np.asarray(result.self_attention[0]), expected, atol=1e-6, rtol=0)


def test_shapes_dtypes_and_masks(decoder_case):
    config, params, tokens, lengths, result = decoder_case
    B, T = tokens.shape
    assert len(result.self_attention) == config.num_layers
    chex.assert_shape(result.self_attention, (B, config.num_heads, T, T))
    chex.assert_type(result.self_attention, jnp.float32)
    chex.assert_shape(result.logits, (B, T, config.vocab_size))
    chex.assert_type(result.masks["self"], bool)
    assert result.cross_attention is None and result.encoder_attention is None
    assert set(result.masks) == {"self"}
    mask = np.tril(np.ones((T, T), bool))[None] & (np.arange(T)[None, None, :] < lengths[:, None, None])
    np.testing.assert_array_equal(np.asarray(result.masks["self"]), mask)


def test_rows_sum_to_one_over_allowed_keys_and_are_zero_elsewhere(decoder_case):
    _, _, _, _, result = decoder_case
    mask = np.asarray(result.masks["self"])[:, None]  # [B, 1, T, T]
    for probs in result.self_attention:
        probs = np.asarray(probs)
        assert np.all(probs[np.broadcast_to(~mask, probs.shape)] == 0.0)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)


def test_logits_equal_forward(decoder_case):
    config, params, tokens, lengths, result = decoder_case
    np.testing.assert_allclose(np.asarray(result.logits),
                               np.asarray(jaxdec.forward(params, config, tokens, lengths)), atol=1e-5, rtol=0)


def test_fully_masked_row_is_all_zeros(decoder_configs, params_for):
    config = decoder_configs["learned"]
    params = params_for(config)
    tokens = np.array([[3, 7, 1, 30, 12, 5], [0, 0, 0, 0, 0, 0]], np.int32)
    result = jinspect.attention(params, config, tokens, np.array([6, 0], np.int32))  # all padding
    for probs in result.self_attention:
        assert np.all(np.isfinite(probs))
        assert np.all(np.asarray(probs)[1] == 0.0)
        np.testing.assert_allclose(np.asarray(probs)[0].sum(-1), 1.0, atol=1e-6)


def test_jit_equals_eager(decoder_configs, params_for):
    config = decoder_configs["learned"]
    params = params_for(config)
    tokens, lengths = jnp.array([[3, 7, 1, 30, 12, 5], [9, 2, 14, 0, 0, 0]]), jnp.array([6, 3])
    jitted = jax.jit(jinspect.attention, static_argnames="config")(params, config, tokens, lengths)
    chex.assert_trees_all_close(jitted, jinspect.attention(params, config, tokens, lengths), atol=1e-6,
                                rtol=0)


def test_masks_equal_hand_written_tables_of_the_seed_sentence():
    params = init_params(BYTE_CONFIG, jax.random.key(0))
    tokens, lengths = encode_batch(BATCH)
    np.testing.assert_array_equal(lengths, [28, 24])
    assert tokens[1, 0] == BOS_ID and TOKENIZER.decode(tokens[1]) == SEED
    result = jinspect.attention(params, BYTE_CONFIG, tokens, lengths)
    self_mask = np.asarray(result.masks["self"])  # [2, 28, 28]
    np.testing.assert_array_equal(self_mask[1, :24, :24], table(SEED_CAUSAL))
    np.testing.assert_array_equal(self_mask[1], table(SHORT_SELF))
    np.testing.assert_array_equal(self_mask[0], np.tril(np.ones((28, 28), bool)))
    # Every key some query may see is a real token of its example: the padding table.
    np.testing.assert_array_equal(self_mask.any(axis=1), table(BATCH_PADDING))
    probs = np.asarray(result.self_attention[0])  # [2, N, 28, 28]
    assert np.all(probs[1][..., 24:] == 0.0)


@pytest.fixture(scope="module")
def seq2seq_case():
    """Decoder tokens [2, 5] (lengths 5, 2) over sources [2, 7] (lengths 7, 3), one pass."""
    params = init_params(SEQ2SEQ_CONFIG, jax.random.key(2))
    tokens = np.array([[1, 4, 9, 16, 25], [1, 8, 0, 0, 0]], np.int32)
    lengths = np.array([5, 2], np.int32)
    source = np.array([[3, 5, 7, 11, 13, 17, 19], [2, 4, 6, 0, 0, 0, 0]], np.int32)
    source_lengths = np.array([7, 3], np.int32)
    result = jinspect.attention(params, SEQ2SEQ_CONFIG, tokens, lengths, source=source,
                                source_lengths=source_lengths)
    return params, tokens, lengths, source, source_lengths, result


def test_cross_attention_follows_the_padded_sources(seq2seq_case):
    params, tokens, lengths, source, source_lengths, result = seq2seq_case
    c = SEQ2SEQ_CONFIG
    (B, T), S = tokens.shape, source.shape[1]
    assert len(result.cross_attention) == len(result.self_attention) == c.num_decoder_layers
    assert len(result.encoder_attention) == c.num_encoder_layers
    chex.assert_shape(result.cross_attention, (B, c.num_heads, T, S))
    chex.assert_shape(result.encoder_attention, (B, c.num_heads, S, S))
    chex.assert_shape(result.self_attention, (B, c.num_heads, T, T))
    chex.assert_type(result.cross_attention + result.encoder_attention, jnp.float32)
    keys = np.arange(S)[None, :] < source_lengths[:, None]  # [B, S]
    np.testing.assert_array_equal(np.asarray(result.masks["cross"]), np.broadcast_to(keys[:, None], (B, T, S)))
    np.testing.assert_array_equal(np.asarray(result.masks["encoder"]), np.broadcast_to(keys[:, None], (B, S, S)))
    for probs in result.cross_attention + result.encoder_attention:
        probs = np.asarray(probs)
        assert np.all(probs[1, ..., 3:] == 0.0)  # example 1's source padding is never looked at
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(result.logits),
        np.asarray(jaxdec.forward(params, c, tokens, lengths, source=source, source_lengths=source_lengths)),
        atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tokens=[[1, 2, 99]]), "token id 99"),
    (dict(tokens=[[1, 2, 3]], lengths=[4]), "lengths holds 4"),
    (dict(tokens=[[1, 2, 3]], source=[[1, 2]]), "source / source_lengths are for an encoder-decoder model"),
    (dict(tokens=[1, 2, 3]), "tokens must have rank 2"),
])
def test_bad_input_is_refused_before_compute(decoder_configs, kwargs, message):
    config = decoder_configs["learned"]
    params = {"unused": jnp.zeros(())}  # never reached: the checks come first
    tokens = np.asarray(kwargs.pop("tokens"), np.int32)
    with pytest.raises(ValueError, match=message):
        jinspect.attention(params, config, tokens, **kwargs)


def test_seq2seq_needs_a_source():
    with pytest.raises(ValueError, match="needs source"):
        jinspect.attention({}, SEQ2SEQ_CONFIG, np.ones((1, 3), np.int32))
