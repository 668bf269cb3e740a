"""Tests for jaxdec.model and jaxdec.cache: parameter layout and count, forward against an
independent float64 numpy Transformer, padding and causality, NaN-free empty rows, host and
checkify validation, and one-pass prefill == feeding the prompt token by token."""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxdec
from jaxdec import api, model, tuning
from jaxdec import cache as kv_cache
from jaxdec.config import DecoderConfig

# The padded batch shared with test_decode.py (same shape: the compiled forward is reused).
B, T = 3, 10
LENGTHS = np.array([10, 7, 8], np.int32)

prefill_jit = jax.jit(model.prefill, static_argnames=("config", "capacity"))
prefill_uncached_jit = jax.jit(model.prefill_uncached, static_argnames=("config", "capacity"))
decode_step_jit = jax.jit(model.decode_step, static_argnames=("config",))


def _tokens(vocab_size: int, lengths=LENGTHS, width=T, seed=0) -> np.ndarray:
    """Random ids [B, width]; padding slots hold random (valid) ids too, to prove they are ignored."""
    return np.random.default_rng(seed).integers(0, vocab_size, (len(lengths), width)).astype(np.int32)


# --- an independent float64 numpy decoder -----------------------------------------------------


def _np_layer_norm(p, x, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_activation(name, x):
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "gelu":
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    assert name == "gelu_tanh", name
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _np_rope(x, base):
    """x [T, n, H]: channel pair (i, i + H/2) at position t rotated by angle t * base^(-2i/H)."""
    T_, _, H = x.shape
    angle = np.arange(T_)[:, None] * base ** (-2.0 * np.arange(H // 2) / H)  # [T, H/2]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    x1, x2 = x[..., : H // 2], x[..., H // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_decoder_logits(params, c: DecoderConfig, tokens) -> np.ndarray:
    """Logits [T, V] of one unpadded sequence, straight from the config's documented semantics."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tokens = np.asarray(tokens)
    T_ = len(tokens)
    D, N, K, H = c.d_model, c.num_heads, c.kv_heads, c.head_dim
    bias = lambda d, name: d.get(name, 0.0)  # noqa: E731
    x = p["embed"][tokens] * (math.sqrt(D) if c.embed_scale else 1.0)
    if c.position == "learned":
        x = x + p["pos_embed"][:T_]
    elif c.position == "sinusoidal":
        angle = np.arange(T_)[:, None] * 10000.0 ** (-2.0 * np.arange(D // 2) / D)
        x = x + np.concatenate([np.sin(angle), np.cos(angle)], axis=-1)
    future = np.triu(np.ones((T_, T_), bool), 1)
    for lp in model.unstack_blocks(p["layers"]):
        a = lp["attn"]
        h = _np_layer_norm(lp["attn_norm"], x, c.layer_norm_eps) if c.norm_position == "pre" else x
        qkv = h @ a["qkv"] + bias(a, "qkv_bias")
        q = qkv[:, : N * H].reshape(T_, N, H)
        k = qkv[:, N * H : (N + K) * H].reshape(T_, K, H)
        v = qkv[:, (N + K) * H :].reshape(T_, K, H)
        if c.position == "rope":
            q, k = _np_rope(q, c.rope_base), _np_rope(k, c.rope_base)
        heads = []
        for n in range(N):
            j = n // (N // K)  # the K/V head shared by this query head's group
            s = np.where(future, -np.inf, q[:, n] @ k[:, j].T / math.sqrt(H))
            w = np.exp(s - s.max(-1, keepdims=True))
            heads.append((w / w.sum(-1, keepdims=True)) @ v[:, j])
        o = np.concatenate(heads, axis=-1) @ a["out"] + bias(a, "out_bias")
        x = x + o if c.norm_position == "pre" else _np_layer_norm(lp["attn_norm"], x + o, c.layer_norm_eps)
        m = lp["mlp"]
        h = _np_layer_norm(lp["mlp_norm"], x, c.layer_norm_eps) if c.norm_position == "pre" else x
        y = _np_activation(c.activation, h @ m["w_in"] + bias(m, "b_in")) @ m["w_out"] + bias(m, "b_out")
        x = x + y if c.norm_position == "pre" else _np_layer_norm(lp["mlp_norm"], x + y, c.layer_norm_eps)
    if c.norm_position == "pre":
        x = _np_layer_norm(p["final_norm"], x, c.layer_norm_eps)
    return x @ (p["embed"].T if c.tie_embeddings else p["head"])


# --- parameters -------------------------------------------------------------------------------


def _param_shapes(config):
    return jax.eval_shape(functools.partial(jaxdec.init_params, config), jax.random.key(0))


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_gpt2_small_param_count():
    # eval_shape: shapes only, no 500 MB of random numbers.
    shapes = _param_shapes(DecoderConfig(50257, 12, 768, 12, 1024))
    assert _count(shapes) == 124_439_808
    chex.assert_shape(shapes["embed"], (50257, 768))
    chex.assert_shape(shapes["pos_embed"], (1024, 768))
    assert "head" not in shapes  # tied
    layer = shapes["layers"]  # every leaf stacked over the 12 layers
    chex.assert_shape(layer["attn"]["qkv"], (12, 768, 3 * 768))
    chex.assert_shape(layer["attn"]["qkv_bias"], (12, 3 * 768))
    chex.assert_shape(layer["attn"]["out"], (12, 768, 768))
    chex.assert_shape(layer["mlp"]["w_in"], (12, 768, 3072))
    chex.assert_shape(layer["mlp"]["w_out"], (12, 3072, 768))
    chex.assert_shape(layer["attn_norm"]["scale"], (12, 768))
    chex.assert_shape(shapes["final_norm"]["scale"], (768,))


def _expected_param_count(c: DecoderConfig) -> int:
    D, V, N, K, H, F = c.d_model, c.vocab_size, c.num_heads, c.kv_heads, c.head_dim, c.ff_dim
    attn = D * (N + 2 * K) * H + N * H * D + (((N + 2 * K) * H + D) if c.use_bias else 0)
    mlp = 2 * D * F + ((F + D) if c.use_bias else 0)
    norms = 2 * 2 * D
    total = V * D + c.num_layers * (attn + mlp + norms)
    total += c.max_len * D if c.position == "learned" else 0
    total += 2 * D if c.norm_position == "pre" else 0
    total += 0 if c.tie_embeddings else D * V
    return total


def test_param_layout_and_count(decoder_config):
    c = decoder_config
    shapes = _param_shapes(c)
    assert _count(shapes) == _expected_param_count(c)
    layer = shapes["layers"]
    chex.assert_shape(layer["attn"]["qkv"], (c.num_layers, c.d_model, (c.num_heads + 2 * c.kv_heads) * c.head_dim))
    assert ("pos_embed" in shapes) == (c.position == "learned")
    assert ("final_norm" in shapes) == (c.norm_position == "pre")
    assert ("head" in shapes) == (not c.tie_embeddings)
    has_bias = any("bias" in name for name in layer["attn"]) or "b_in" in layer["mlp"]
    assert has_bias == c.use_bias
    for leaf in jax.tree.leaves(shapes):
        assert leaf.dtype == jnp.float32


def test_init_params_is_deterministic_per_key(base_config):
    a = jaxdec.init_params(base_config, jax.random.key(3))
    b = jaxdec.init_params(base_config, jax.random.key(3))
    c = jaxdec.init_params(base_config, jax.random.key(4))
    chex.assert_trees_all_equal(a, b)
    assert not np.allclose(a["embed"], c["embed"])


# --- forward ----------------------------------------------------------------------------------


def test_forward_matches_numpy_reference(decoder_config, params_for):
    c = decoder_config
    params = params_for(c)
    tokens = _tokens(c.vocab_size)
    logits = jaxdec.forward(params, c, tokens, LENGTHS)
    chex.assert_shape(logits, (B, T, c.vocab_size))
    chex.assert_type(logits, jnp.float32)
    # Each padded row's real positions == the reference run on that row's real tokens alone.
    for b, n in enumerate(LENGTHS):
        expected = np_decoder_logits(params, c, tokens[b, :n])
        chex.assert_trees_all_close(logits[b, :n], expected.astype(np.float32), atol=1e-4, rtol=1e-4)


def test_forward_over_causal_query_blocks_matches_numpy_reference(params_for):
    # 150 positions run as query blocks (`model.causal_query_block`), each reading keys up to its
    # own last row: padded rows, GQA and RoPE; the reference runs each row's real tokens alone.
    c = DecoderConfig(37, 2, 32, 4, 160, init_std=0.4, position="rope", num_kv_heads=2)
    T_long = 150
    assert model.causal_query_block(T_long, tuning.CPU) < T_long  # the CPU tuning runs blocks
    params = params_for(c)
    tokens = np.random.default_rng(41).integers(0, c.vocab_size, (3, T_long)).astype(np.int32)
    lengths = np.array([T_long, 70, 1], np.int32)
    logits = model.decoder_logits(params, c, tokens, lengths, tuning=tuning.CPU)
    for b, n in enumerate(lengths):
        expected = np_decoder_logits(params, c, tokens[b, :n])
        chex.assert_trees_all_close(logits[b, :n], expected.astype(np.float32), atol=1e-4, rtol=1e-4)
    # the inspection path (one pass over the whole square, probabilities returned) agrees to
    # float32 rounding (sums in another order: 1.4e-5 at a logit of 2.7 seen)
    one_pass, _ = model.decoder_logits(params, c, tokens, lengths, return_attention=True)
    chex.assert_trees_all_close(logits, one_pass, atol=1e-5, rtol=1e-5)


def test_forward_ignores_padding_tokens_and_is_causal(params_for, base_config):
    c = base_config
    params = params_for(c)
    tokens = _tokens(c.vocab_size)
    logits = jaxdec.forward(params, c, tokens, LENGTHS)
    # Different junk in the padding slots: real positions unchanged.
    junk = tokens.copy()
    for b, n in enumerate(LENGTHS):
        junk[b, n:] = (tokens[b, n:] + 1 + b) % c.vocab_size
    logits_junk = jaxdec.forward(params, c, junk, LENGTHS)
    for b, n in enumerate(LENGTHS):
        chex.assert_trees_all_close(logits_junk[b, :n], logits[b, :n], atol=1e-6, rtol=0)
    # Causality without a padding mask: changing token t changes no logits before t.
    full = jaxdec.forward(params, c, tokens)
    changed = tokens.copy()
    changed[:, 6] = (changed[:, 6] + 5) % c.vocab_size
    full_changed = jaxdec.forward(params, c, changed)
    chex.assert_trees_all_close(full_changed[:, :6], full[:, :6], atol=1e-6, rtol=0)
    assert np.abs(full_changed[:, 6:] - full[:, 6:]).max() > 1e-3  # ...but does change later ones
    # lengths=None means every position is real.
    all_real = jaxdec.forward(params, c, tokens, np.full(B, T, np.int32))
    chex.assert_trees_all_close(all_real, full, atol=0, rtol=0)


def test_forward_with_zero_length_rows_is_finite_in_value_and_gradient(params_for, base_config):
    c = base_config
    params = params_for(c)
    tokens = _tokens(c.vocab_size)
    lengths = np.array([10, 0, 3], np.int32)  # row 1 is all padding: every query fully masked
    logits = jaxdec.forward(params, c, tokens, lengths)
    assert np.isfinite(logits).all()
    chex.assert_trees_all_close(
        logits[2, :3], np_decoder_logits(params, c, tokens[2, :3]).astype(np.float32), atol=1e-4, rtol=1e-4
    )

    def loss(params):
        # Every position's logits, including the fully masked row, enter the loss.
        return jnp.mean(jax.nn.log_softmax(jaxdec.forward(params, c, tokens, lengths)) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    for g in jax.tree.leaves(grads):
        assert np.isfinite(g).all()
    assert np.abs(grads["layers"]["attn"]["qkv"][0]).max() > 0


class ForwardVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_jit_and_eager_agree(self):
        c = DecoderConfig(37, 2, 32, 4, 32, init_std=0.4)
        params = jaxdec.init_params(c, jax.random.key(0))
        tokens = _tokens(c.vocab_size)
        expected = np.stack([
            np.pad(np_decoder_logits(params, c, tokens[b, :n]), ((0, T - n), (0, 0)))
            for b, n in enumerate(LENGTHS)
        ])
        fwd = self.variant(lambda params, tokens, lengths: jaxdec.forward(params, c, tokens, lengths))
        logits = fwd(params, jnp.asarray(tokens), jnp.asarray(LENGTHS))
        chex.assert_shape(logits, (B, T, c.vocab_size))
        real = np.arange(T)[None, :] < LENGTHS[:, None]
        chex.assert_trees_all_close(
            np.where(real[..., None], logits, 0.0), expected.astype(np.float32), atol=1e-4, rtol=1e-4
        )
        # jit and eager also agree with each other far more tightly than with the float64 reference.
        chex.assert_trees_all_close(logits, jaxdec.forward(params, c, tokens, LENGTHS), atol=1e-5, rtol=0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_checked(self):
        c = DecoderConfig(37, 2, 32, 4, 32, init_std=0.4)
        params = jaxdec.init_params(c, jax.random.key(0))
        checked = self.variant(lambda p, t, n: jaxdec.forward_checked(p, c, t, n))
        tokens = jnp.asarray(_tokens(c.vocab_size))
        lengths = jnp.asarray(LENGTHS)
        error, logits = checked(params, tokens, lengths)
        assert error.get() is None
        chex.assert_shape(logits, (B, T, c.vocab_size))
        chex.assert_trees_all_close(logits, jaxdec.forward(params, c, tokens, lengths), atol=1e-5, rtol=0)
        for bad_id in (c.vocab_size, -1):
            error, _ = checked(params, tokens.at[1, 4].set(bad_id), lengths)
            assert error.get() is not None and "token ids" in error.get()
            with pytest.raises(checkify.JaxRuntimeError, match="token ids"):
                error.throw()
        error, _ = checked(params, tokens, lengths.at[0].set(T + 1))
        assert error.get() is not None and "lengths" in error.get()
        error, _ = checked(params, tokens, lengths.at[0].set(0))  # an empty row is allowed
        assert error.get() is None


def test_forward_accepts_python_lists(params_for, base_config):
    """Nested lists are arrays to the API (as in numpy): the same logits as int32 arrays."""
    params = params_for(base_config)
    tokens = _tokens(base_config.vocab_size)
    logits = jaxdec.forward(params, base_config, tokens.tolist(), LENGTHS.tolist())
    chex.assert_trees_all_close(logits, jaxdec.forward(params, base_config, tokens, LENGTHS), atol=0, rtol=0)
    # A list of floats is still refused (the dtype check sees through the list).
    with pytest.raises(ValueError, match="integer"):
        jaxdec.forward(params, base_config, (tokens + 0.5).tolist(), LENGTHS.tolist())


def test_forward_checked_without_lengths_under_jit(params_for, base_config):
    c = base_config
    params = params_for(c)
    checked = jax.jit(lambda p, t: jaxdec.forward_checked(p, c, t))
    tokens = jnp.asarray(_tokens(c.vocab_size))
    error, logits = checked(params, tokens)
    assert error.get() is None
    chex.assert_trees_all_close(logits, jaxdec.forward(params, c, tokens), atol=1e-5, rtol=0)
    error, _ = checked(params, tokens.at[2, 9].set(1000))
    assert error.get() is not None


_GOOD = np.ones((2, 4), np.int32)
# name: (tokens, lengths, a word the ValueError must contain)
_BAD_FORWARD_INPUTS = {
    "id_negative": (np.array([[1, -1, 2, 3], [1, 2, 3, 4]], np.int32), None, "token id -1"),
    "id_equals_vocab": (np.array([[1, 2, 37, 3], [1, 2, 3, 4]], np.int32), None, "token id 37"),
    "id_in_padding_slot": (
        np.array([[1, 2, 3, 99], [1, 2, 3, 4]], np.int32), np.array([3, 4], np.int32), "token id 99"
    ),
    "rank_1_tokens": (np.ones((4,), np.int32), None, "tokens"),
    "rank_3_tokens": (np.ones((2, 4, 1), np.int32), None, "tokens"),
    "float_tokens": (np.ones((2, 4), np.float32), None, "tokens"),
    "bool_tokens": (np.ones((2, 4), bool), None, "tokens"),
    "empty_batch": (np.ones((0, 4), np.int32), None, "non-empty"),
    "empty_sequence": (np.ones((2, 0), np.int32), None, "non-empty"),
    "longer_than_max_len": (np.ones((2, 33), np.int32), None, "max_len"),
    "length_negative": (_GOOD, np.array([4, -1], np.int32), "lengths"),
    "length_beyond_T": (_GOOD, np.array([4, 5], np.int32), "lengths"),
    "lengths_wrong_batch": (_GOOD, np.array([4, 4, 4], np.int32), "lengths"),
    "lengths_rank_2": (_GOOD, np.array([[4], [4]], np.int32), "lengths"),
    "lengths_float": (_GOOD, np.array([4.0, 4.0], np.float32), "lengths"),
}


@pytest.mark.parametrize(
    "tokens, lengths, match", _BAD_FORWARD_INPUTS.values(), ids=_BAD_FORWARD_INPUTS.keys()
)
def test_forward_rejects_bad_input_before_compute(
    tokens, lengths, match, params_for, base_config, monkeypatch
):
    def no_compute(*args, **kwargs):
        raise AssertionError("reached the compiled forward pass")

    monkeypatch.setattr(api, "_apply_jit", no_compute)
    with pytest.raises(ValueError, match=match):
        jaxdec.forward(params_for(base_config), base_config, tokens, lengths)


_BASE_CONFIG = dict(vocab_size=37, num_layers=2, d_model=32, num_heads=4, max_len=32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(num_heads=4, num_kv_heads=8), "num_kv_heads"),
        (dict(d_model=30, num_heads=4), "d_model"),
        (dict(d_model=36, num_heads=12, position="rope"), "head dim"),  # head dim 3: odd
        (dict(d_model=33, num_heads=3, position="sinusoidal"), "d_model"),  # odd sin/cos split
        (dict(position="alibi"), "position"),
        (dict(norm_position="middle"), "norm_position"),
        (dict(activation="swish"), "activation"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(num_layers=2.0), "num_layers"),
        (dict(num_kv_heads=0), "num_kv_heads"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps"),
    ],
)
def test_decoder_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecoderConfig(**(_BASE_CONFIG | kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_kv_heads=1), dict(num_kv_heads=4), dict(d_model=36, num_heads=6, position="rope"),
     dict(d_model=33, num_heads=3)],
)
def test_decoder_config_accepts_valid_edges(kwargs):
    DecoderConfig(**(_BASE_CONFIG | kwargs))


def test_decoder_config_is_hashable_and_frozen():
    a = DecoderConfig(37, 2, 32, 4, 32)
    assert hash(a) == hash(DecoderConfig(37, 2, 32, 4, 32)) and a == DecoderConfig(37, 2, 32, 4, 32)
    assert a.head_dim == 8 and a.kv_heads == 4 and a.ff_dim == 128
    with pytest.raises(dataclasses.FrozenInstanceError, match="d_model"):
        a.d_model = 64


# --- KV cache ---------------------------------------------------------------------------------


def test_cache_init_write_advance_and_query_mask_by_hand():
    L, B_, K, S, H = 2, 2, 3, 5, 4
    cache = kv_cache.init_cache(L, B_, S, K, H)
    chex.assert_shape([cache.k, cache.v], (L, B_, K, S, H))
    chex.assert_shape(cache.starts, (B_,))
    chex.assert_shape(cache.end, ())
    assert cache.capacity == S
    np.testing.assert_array_equal(cache.k, 0.0)

    new_k = jnp.arange(B_ * 2 * K * H, dtype=jnp.float32).reshape(B_, 2, K, H) + 1.0  # [B, T=2, K, H]
    cache = kv_cache.advance(cache.replace(starts=jnp.array([0, 2], jnp.int32)), 1)
    cache = kv_cache.write(cache, 1, new_k, -new_k)
    assert int(cache.end) == 1  # write does not advance
    np.testing.assert_array_equal(cache.k[1, :, :, 1:3], np.swapaxes(new_k, 1, 2))
    np.testing.assert_array_equal(cache.v[1, :, :, 1:3], -np.swapaxes(new_k, 1, 2))
    np.testing.assert_array_equal(cache.k[0], 0.0)  # other layer untouched
    np.testing.assert_array_equal(cache.k[1, :, :, [0, 3, 4]], 0.0)  # other slots untouched
    cache = kv_cache.advance(cache, 2)
    assert int(cache.end) == 3
    np.testing.assert_array_equal(cache.lengths, [3, 1])

    # Queries at slots 3 and 4: example 0 sees slots 0..slot, example 1 only from its start (2).
    mask = kv_cache.query_mask(cache, 2)
    chex.assert_shape(mask, (B_, 2, S))
    expected = np.array(
        [
            [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
            [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],
        ],
        bool,
    )
    np.testing.assert_array_equal(mask, expected)


def test_check_capacity():
    kv_cache.check_capacity(8, 8)
    with pytest.raises(ValueError, match="capacity"):
        kv_cache.check_capacity(8, 9)


# --- prefill == token by token == chunked -----------------------------------------------------

W, CAPACITY = 7, 10
PROMPT_LENGTHS = np.array([5, 2, 3], np.int32)  # right-padded to W; the longest (5) sets `end`


def _prompts(vocab_size):
    """Right-padded prompts [B, W] and the same right-aligned against the longest prompt."""
    prompts = _tokens(vocab_size, PROMPT_LENGTHS, W, seed=1)
    width = int(PROMPT_LENGTHS.max())
    aligned = np.zeros_like(prompts)
    for b, n in enumerate(PROMPT_LENGTHS):
        aligned[b, width - n : width] = prompts[b, :n]
    return prompts, aligned, (width - PROMPT_LENGTHS).astype(np.int32)


def test_right_align_by_hand():
    tokens, starts = model.right_align(jnp.array([[1, 2, 3, 7], [4, 9, 9, 9]]), jnp.array([3, 1]), 3)
    np.testing.assert_array_equal(tokens, [[1, 2, 3, 0], [0, 0, 4, 0]])
    np.testing.assert_array_equal(starts, [0, 2])


def test_prefill_equals_token_by_token(position_config, params_for):
    c = position_config
    params = params_for(c)
    prompts, aligned, starts = _prompts(c.vocab_size)
    width = int(PROMPT_LENGTHS.max())

    logits, cache = prefill_jit(params, c, jnp.asarray(prompts), jnp.asarray(PROMPT_LENGTHS), CAPACITY)
    chex.assert_shape(logits, (B, c.vocab_size))
    chex.assert_shape([cache.k, cache.v], (c.num_layers, B, c.kv_heads, CAPACITY, c.head_dim))
    assert int(cache.end) == width
    np.testing.assert_array_equal(cache.starts, starts)
    np.testing.assert_array_equal(cache.lengths, PROMPT_LENGTHS)

    # The same prompts fed one slot at a time into an empty cache, a decode step per slot.
    cache_1 = kv_cache.init_cache(c.num_layers, B, CAPACITY, c.kv_heads, c.head_dim)
    cache_1 = cache_1.replace(starts=jnp.asarray(starts))
    for slot in range(width):
        logits_1, cache_1 = decode_step_jit(
            params, c, cache_1, jnp.asarray(aligned[:, slot]), jnp.asarray(slot - starts)
        )
        chex.assert_shape(logits_1, (B, c.vocab_size))
    assert int(cache_1.end) == width

    chex.assert_trees_all_close(logits_1, logits, atol=1e-5, rtol=0)
    for b in range(B):
        valid = slice(starts[b], width)
        chex.assert_trees_all_close(cache_1.k[:, b, :, valid], cache.k[:, b, :, valid], atol=1e-5, rtol=0)
        chex.assert_trees_all_close(cache_1.v[:, b, :, valid], cache.v[:, b, :, valid], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(cache.k[:, :, :, W:], 0.0)  # slots past the prompt buffer: unwritten

    # And both equal the independent reference at each prompt's last real token.
    for b, n in enumerate(PROMPT_LENGTHS):
        expected = np_decoder_logits(params, c, prompts[b, :n])[-1]
        chex.assert_trees_all_close(logits[b], expected.astype(np.float32), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4])
def test_chunked_prefill_equals_one_pass(chunk_size, params_for, decoder_configs):
    """Chunks of 1..4 tokens over a width-7 buffer, the last chunk overlapping the previous one
    when 7 % chunk != 0, give the one-pass prefill's logits and K/V (1e-5)."""
    c = decoder_configs["rope_gqa"]
    params = params_for(c)
    prompts, _, starts = _prompts(c.vocab_size)
    args = (params, c, jnp.asarray(prompts), jnp.asarray(PROMPT_LENGTHS), CAPACITY)
    one_pass = jax.jit(model.prefill, static_argnames=("config", "capacity", "tuning"))
    logits, cache = one_pass(*args, tuning=tuning.Tuning(prefill_chunk=W))
    logits_c, cache_c = one_pass(*args, tuning=tuning.Tuning(prefill_chunk=chunk_size))
    chex.assert_trees_all_close(logits_c, logits, atol=1e-5, rtol=0)
    assert int(cache_c.end) == int(cache.end) == PROMPT_LENGTHS.max()
    for b in range(B):
        valid = slice(starts[b], int(PROMPT_LENGTHS.max()))
        chex.assert_trees_all_close(cache_c.k[:, b, :, valid], cache.k[:, b, :, valid], atol=1e-5, rtol=0)
        chex.assert_trees_all_close(cache_c.v[:, b, :, valid], cache.v[:, b, :, valid], atol=1e-5, rtol=0)


def test_extend_chunk_equals_forward(params_for, decoder_configs):
    """`extend` of C tokens at per-row offsets gives the teacher-forced logits of those tokens."""
    c = decoder_configs["learned"]
    params = params_for(c)
    prompts, _, _ = _prompts(c.vocab_size)
    _, cache = prefill_jit(params, c, jnp.asarray(prompts), jnp.asarray(PROMPT_LENGTHS), CAPACITY)
    new = _tokens(c.vocab_size, PROMPT_LENGTHS, 3, seed=5)  # [B, 3] continuation of every row
    logits, cache = jax.jit(model.extend, static_argnames="config")(params, c, cache, jnp.asarray(new))
    chex.assert_shape(logits, (B, 3, c.vocab_size))
    assert int(cache.end) == PROMPT_LENGTHS.max() + 3
    for b, n in enumerate(PROMPT_LENGTHS):
        expected = np_decoder_logits(params, c, np.concatenate([prompts[b, :n], new[b]]))[n:]
        chex.assert_trees_all_close(logits[b], expected.astype(np.float32), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_step_params_change_no_logit(tied, params_for, base_config):
    """The decode loop's layout (`decode_params`: per-layer weights, and for a tied head with
    batch > 1 the embedding's [D, V] copy) gives the stacked params' step logits (1e-5: the same
    products, summed in another order)."""
    c = dataclasses.replace(base_config, tie_embeddings=tied)
    params = params_for(c)
    one, many = model.decode_params(params, c, 1, tuning.CPU), model.decode_params(params, c, B, tuning.CPU)
    assert isinstance(many["layers"], list) and len(many["layers"]) == c.num_layers
    assert "embed_t" not in one
    if tied:
        np.testing.assert_array_equal(many["embed_t"], np.asarray(params["embed"]).T)
    else:
        assert "embed_t" not in many
    prompts, _, _ = _prompts(c.vocab_size)
    logits, cache = prefill_jit(params, c, jnp.asarray(prompts), jnp.asarray(PROMPT_LENGTHS), CAPACITY)
    nxt = jnp.argmax(logits, -1).astype(jnp.int32)
    expected, expected_cache = decode_step_jit(params, c, cache, nxt, jnp.asarray(PROMPT_LENGTHS))
    for laid_out in (one, many):
        got, got_cache = decode_step_jit(laid_out, c, cache, nxt, jnp.asarray(PROMPT_LENGTHS))
        chex.assert_trees_all_close(got, expected, atol=1e-5, rtol=0)
        chex.assert_trees_all_close(got_cache.k, expected_cache.k, atol=1e-6, rtol=0)


def test_decode_step_then_uncached_recompute_agree(params_for, base_config):
    c = base_config
    params = params_for(c)
    prompts, _, _ = _prompts(c.vocab_size)
    args = (params, c, jnp.asarray(prompts), jnp.asarray(PROMPT_LENGTHS), CAPACITY)
    logits, cache = prefill_jit(*args)
    logits_u, buf = prefill_uncached_jit(*args)
    chex.assert_shape(buf.tokens, (B, CAPACITY))
    chex.assert_trees_all_close(logits_u, logits, atol=1e-5, rtol=0)
    nxt = jnp.argmax(logits, -1).astype(jnp.int32)
    positions = jnp.asarray(PROMPT_LENGTHS)
    step_logits, cache = decode_step_jit(params, c, cache, nxt, positions)
    recompute_step_jit = jax.jit(model.recompute_step, static_argnames="config")
    step_logits_u, buf = recompute_step_jit(params, c, buf, nxt, positions)
    chex.assert_shape(step_logits, (B, c.vocab_size))
    width = int(PROMPT_LENGTHS.max())
    assert int(cache.end) == width + 1 and int(buf.end) == width + 1
    chex.assert_trees_all_close(step_logits_u, step_logits, atol=1e-5, rtol=0)
