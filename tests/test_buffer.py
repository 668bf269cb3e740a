"""Tests for reusing a KV cache's storage across generate calls (`jaxdec.kv_buffer`,
`generate(..., buffer=)`): the tokens and logits of a fresh cache whatever the buffer holds
(an earlier call's keys and values, NaN, inf), the storage donated (no cache allocated by the
program), and every bad buffer refused before compute without consuming it."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec
from jaxdec import decode, tuning
from jaxdec.config import DecoderConfig

# Its own config (max_len 45, used nowhere else): programs compiled here with tiny blocks never
# reach another test.
CONFIG = DecoderConfig(vocab_size=37, num_layers=2, d_model=32, num_heads=4, max_len=45, init_std=0.4,
                       position="rope", num_kv_heads=2)
CAPACITY = 30
NEW = 12
# Two batches of three rows: the second's prompts are shorter, so its cache ends where the
# first call's keys and values still lie in the buffer.
PROMPTS_A = np.random.default_rng(3).integers(1, 37, (3, 9)).astype(np.int32)
LENGTHS_A = np.array([9, 4, 6], np.int32)
PROMPTS_B = np.random.default_rng(4).integers(1, 37, (3, 5)).astype(np.int32)
LENGTHS_B = np.array([2, 5, 1], np.int32)


@pytest.fixture
def blocks(request, monkeypatch):
    """The platform's tuning (the cache read in one block), or attention blocks of 4 slots and
    prefill chunks of 3 rows, so that stale slots lie inside blocks the loops read."""
    if request.param == "blocks_of_4":
        platform = jax.default_backend()
        tiny = dataclasses.replace(tuning.for_platform(platform), cache_block=4, prefill_chunk=3)
        monkeypatch.setitem(tuning.BY_PLATFORM, platform, tiny)
    return request.param


@pytest.fixture(scope="module")
def params():
    return jaxdec.init_params(CONFIG, jax.random.key(2))


def run(params, prompts, lengths, **kwargs):
    return jaxdec.generate(params, CONFIG, prompts, lengths, max_new_tokens=NEW, return_logits=True, **kwargs)


def poisoned(k_value, v_value) -> jaxdec.KVBuffer:
    shape = (CONFIG.num_layers, 3, CONFIG.kv_heads, CAPACITY, CONFIG.head_dim)
    return jaxdec.KVBuffer(k=jnp.full(shape, k_value, jnp.float32), v=jnp.full(shape, v_value, jnp.float32))


_LOOKUP = jaxdec.PromptLookup(num_tokens=3)
_SLOW = pytest.mark.slow(reason="time budget: the other draft covers these blocks")


@pytest.mark.parametrize("blocks, draft", [
    ("blocks_of_4", None), ("one_block", _LOOKUP),
    pytest.param("one_block", None, marks=_SLOW), pytest.param("blocks_of_4", _LOOKUP, marks=_SLOW),
], indirect=["blocks"], ids=["blocks_of_4-plain", "one_block-prompt_lookup", "one_block-plain",
                             "blocks_of_4-prompt_lookup"])
def test_reused_buffer_decodes_as_a_fresh_cache(draft, blocks, params):
    """One buffer handed from call to call, then buffers full of NaN / inf: every call's tokens,
    lengths and acceptance counts equal a fresh cache's and its logits agree to 1e-6; no row is
    flagged non-finite. (Without attention zeroing the values of unseen slots, the NaN buffer's
    rows come out NaN.)"""
    fresh_a = run(params, PROMPTS_A, LENGTHS_A, capacity=CAPACITY, draft=draft)
    fresh_b = run(params, PROMPTS_B, LENGTHS_B, capacity=CAPACITY, draft=draft)
    assert len({tuple(r) for r in np.asarray(fresh_b.tokens)}) > 1, "degenerate outputs"
    buffer = jaxdec.kv_buffer(CONFIG, 3, CAPACITY)
    calls = [(PROMPTS_A, LENGTHS_A, fresh_a), (PROMPTS_B, LENGTHS_B, fresh_b), (PROMPTS_A, LENGTHS_A, fresh_a)]
    for prompts, lengths, fresh in calls:  # each call reads the buffer the previous one left
        got = run(params, prompts, lengths, draft=draft, buffer=buffer)
        np.testing.assert_array_equal(got.tokens, fresh.tokens)
        np.testing.assert_array_equal(got.lengths, fresh.lengths)
        chex.assert_trees_all_close(got.logits, fresh.logits, atol=1e-6, rtol=0)
        if draft is not None:
            chex.assert_trees_all_equal(got.speculation, fresh.speculation)
        buffer = got.buffer
    for k_value, v_value in [(jnp.nan, jnp.nan), (jnp.inf, -jnp.inf), (0.0, jnp.nan)]:
        got = run(params, PROMPTS_B, LENGTHS_B, draft=draft, buffer=poisoned(k_value, v_value))
        np.testing.assert_array_equal(got.tokens, fresh_b.tokens, err_msg=f"buffer of k={k_value}, v={v_value}")
        chex.assert_trees_all_close(got.logits, fresh_b.logits, atol=1e-6, rtol=0)
        assert not np.any(got.nonfinite)


@pytest.mark.slow(reason="time budget: compiles the encoder-decoder twice")
def test_encoder_decoder_buffer_holds_the_decoder_cache():
    """The encoder-decoder's self-attention cache goes into the buffer (its cross K/V are made
    per call): a NaN buffer gives the tokens of a fresh cache."""
    config = jaxdec.Seq2SeqConfig(37, 1, 2, 32, 4, 48, num_kv_heads=2, init_std=0.4)
    params = jaxdec.init_params(config, jax.random.key(0))
    source = np.random.default_rng(0).integers(1, 37, (2, 7)).astype(np.int32)
    kw = dict(source=source, source_lengths=np.array([7, 3], np.int32), max_new_tokens=8)
    start = np.ones((2, 1), np.int32)
    fresh = jaxdec.generate(params, config, start, capacity=16, **kw)
    shape = (config.num_layers, 2, config.kv_heads, 16, config.head_dim)
    nan = jaxdec.KVBuffer(k=jnp.full(shape, jnp.nan), v=jnp.full(shape, jnp.nan))
    got = jaxdec.generate(params, config, start, buffer=nan, **kw)
    np.testing.assert_array_equal(got.tokens, fresh.tokens)
    assert got.buffer.shape == shape and not np.any(got.nonfinite)


def test_buffer_is_donated(params):
    """The arrays passed are deleted (donated), the result holds storage of the same shape, and
    passing the deleted buffer again is refused."""
    buffer = jaxdec.kv_buffer(CONFIG, 3, CAPACITY)
    got = run(params, PROMPTS_A, LENGTHS_A, buffer=buffer)
    assert buffer.k.is_deleted() and buffer.v.is_deleted()
    assert got.buffer.shape == buffer.shape and got.buffer.k.dtype == jnp.float32
    with pytest.raises(ValueError, match="donated to an earlier generate call"):
        run(params, PROMPTS_A, LENGTHS_A, buffer=buffer)


@pytest.mark.slow(reason="time budget: compiles four programs")
def test_the_program_with_a_buffer_allocates_no_cache(params):
    """The compiled program writes the cache into the buffer instead of allocating one: its
    temporary memory does not grow with the capacity, while without a buffer it grows by the
    whole cache."""

    def temp_bytes(capacity: int, with_buffer: bool) -> int:
        inputs, _ = decode.prepare_inputs(params, CONFIG, PROMPTS_A, LENGTHS_A, max_new_tokens=NEW,
                                          capacity=capacity)
        options = decode.DecodeOptions(config=CONFIG, max_new_tokens=NEW, capacity=capacity)
        extra = (jaxdec.kv_buffer(CONFIG, 3, capacity),) if with_buffer else ()
        compiled = decode._generate.for_inputs(params).lower(params, inputs, options, *extra).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    # From 512 to 8192 slots the cache grows by 2 x 2 x 3 x 2 x 7680 x 8 float32 = 5.6 MiB.
    growth = 2 * CONFIG.num_layers * 3 * CONFIG.kv_heads * (8192 - 512) * CONFIG.head_dim * 4
    assert temp_bytes(8192, False) - temp_bytes(512, False) >= growth
    assert temp_bytes(8192, True) - temp_bytes(512, True) < growth / 10  # the prompt buffer's width grows


def _shape(batch=3, capacity=CAPACITY):
    return (CONFIG.num_layers, batch, CONFIG.kv_heads, capacity, CONFIG.head_dim)


@pytest.mark.parametrize("make, kwargs, match", [
    (lambda: jaxdec.kv_buffer(CONFIG, 2, CAPACITY), {}, r"buffer.k is float32\[2, 2, 2, 30, 8\]"),
    (lambda: jaxdec.kv_buffer(CONFIG, 3, CAPACITY), {"capacity": CAPACITY + 1}, r"float32\[2, 3, 2, 31, 8\]"),
    (lambda: jaxdec.kv_buffer(CONFIG, 3, 16), {}, "capacity 16 is too small"),
    (lambda: jaxdec.kv_buffer(CONFIG, 3, CAPACITY, jnp.bfloat16), {}, "buffer.k is bfloat16"),
    (lambda: jaxdec.kv_buffer(CONFIG, 3, CAPACITY), {"use_cache": False}, "use_cache must be True"),
    (lambda: (jnp.zeros(_shape()), jnp.zeros(_shape())), {}, r"must be a jaxdec.KVBuffer \(.*\), got tuple"),
    (lambda: jaxdec.KVBuffer(k=jnp.zeros(_shape()), v=jnp.zeros(_shape(batch=1))), {}, "buffer.v is float32"),
], ids=["batch", "capacity", "too_small", "dtype", "uncached", "not_a_buffer", "k_v_differ"])
def test_bad_buffer_is_refused_and_kept(make, kwargs, match, params):
    """ValueError naming the buffer's and the cache's shape and dtype, raised before anything
    runs: the buffer is not donated."""
    buffer = make()
    with pytest.raises(ValueError, match=match):
        run(params, PROMPTS_A, LENGTHS_A, buffer=buffer, **kwargs)
    assert not any(x.is_deleted() for x in jax.tree.leaves(buffer))


def test_kv_buffer_refuses_bad_sizes():
    with pytest.raises(ValueError, match="batch"):
        jaxdec.kv_buffer(CONFIG, 0, CAPACITY)
    with pytest.raises(ValueError, match="capacity"):
        jaxdec.kv_buffer(CONFIG, 3, 2.5)
