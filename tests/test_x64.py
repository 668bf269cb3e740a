"""jax_enable_x64 (common in scientific code): forward, generate, beam search and a train step
work with it on and give the same tokens (and close losses) as with it off.

The flag is switched with the `jax.enable_x64` context manager inside each test, so it never
leaks into other tests (jit keys its caches on it: programs are compiled apart for each value).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec
from jaxdec import TopK

PROMPTS = np.array([[3, 14, 15, 9, 26], [5, 35, 30, 30, 30], [8, 9, 7, 30, 30]], np.int32)
LENGTHS = np.array([5, 2, 3], np.int32)


def _both(fn):
    """fn() with x64 off and on: (off, on), as host arrays."""
    off = jax.tree.map(np.asarray, fn())
    with jax.enable_x64(True):
        assert jnp.arange(2).dtype == jnp.int64  # the flag is really on here
        on = jax.tree.map(np.asarray, fn())
    return off, on


def test_forward_and_generate_under_x64_equal_x32(decoder_configs, params_for):
    config = decoder_configs["learned"]
    params = params_for(config)
    off, on = _both(lambda: jaxdec.forward(params, config, PROMPTS, LENGTHS))
    assert on.dtype == np.float32
    np.testing.assert_allclose(on, off, atol=1e-5, rtol=1e-5)
    off, on = _both(lambda: jaxdec.generate(params, config, PROMPTS, LENGTHS, max_new_tokens=6,
                                            sampler=TopK(5), key=jax.random.key(3)).tokens)
    assert on.dtype == np.int32
    np.testing.assert_array_equal(on, off)
    off, on = _both(lambda: jaxdec.generate(params, config, PROMPTS, LENGTHS, max_new_tokens=4,
                                            use_cache=False).tokens)
    np.testing.assert_array_equal(on, off)


def test_blocked_cache_generate_under_x64(decoder_configs, params_for):
    # capacity 200 > the 128-slot attention block: the blocked attention loop runs (RoPE + GQA).
    config = decoder_configs["rope_gqa"]
    params = params_for(config)
    off, on = _both(lambda: jaxdec.generate(params, config, PROMPTS, LENGTHS, max_new_tokens=6,
                                            capacity=200).tokens)
    np.testing.assert_array_equal(on, off)


@pytest.mark.slow(reason="time budget: compiles beam search under x64")
def test_beam_search_under_x64(decoder_configs, params_for):
    config = decoder_configs["learned"]
    params = params_for(config)
    # capacity 200: the beam reorder copies the filled blocks in a loop.
    off, on = _both(lambda: jaxdec.beam_search(params, config, PROMPTS, LENGTHS, beam_size=3,
                                               max_new_tokens=4, eos_id=7, capacity=200))
    np.testing.assert_array_equal(on[0].tokens, off[0].tokens)
    np.testing.assert_allclose(on[1], off[1], rtol=1e-5)


@pytest.mark.slow  # compiles the seq2seq train step twice (x32, x64)
def test_seq2seq_train_step_under_x64():
    config = jaxdec.Seq2SeqConfig(37, 1, 1, 32, 4, 16, init_std=0.4)
    source = PROMPTS
    tc = jaxdec.TrainConfig(warmup_steps=1, decay_steps=10)
    batch = {"tokens": PROMPTS, "lengths": LENGTHS, "source": source, "source_lengths": LENGTHS}

    def two_steps():
        state = jaxdec.create_train_state(config, tc, jax.random.key(0))
        losses = []
        for _ in range(2):
            state, metrics = jaxdec.train_step(state, batch)
            losses.append(metrics["loss"])
        return jnp.stack(losses), jax.tree.leaves(state.params)[0].dtype == jnp.float32

    off, on = _both(two_steps)
    assert bool(on[1])
    np.testing.assert_allclose(on[0], off[0], rtol=1e-5)
