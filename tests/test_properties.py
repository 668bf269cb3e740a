"""Property tests (hypothesis): over random small decoder configs and random prompt lengths,
cached decoding gives the full forward pass's logits at every step, and a padded row decodes
exactly as the example alone.

Each example is a fresh config, hence a fresh compilation: the examples are few (max_examples)
and derandomized, so the suite stays fast and deterministic.
"""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxdec
from jaxdec import DecoderConfig

P, MAX_NEW, B = 5, 4, 3


@st.composite
def configs(draw) -> DecoderConfig:
    heads = draw(st.sampled_from([2, 4]))
    kv_heads = draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0]))
    return DecoderConfig(
        vocab_size=37, num_layers=2, d_model=16, num_heads=heads, max_len=16,
        num_kv_heads=kv_heads,
        position=draw(st.sampled_from(["learned", "sinusoidal", "rope"])),
        norm_position=draw(st.sampled_from(["pre", "post"])),
        tie_embeddings=draw(st.booleans()),
        init_std=0.4,
    )


@pytest.mark.slow  # 6 random configs, each compiled
@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(config=configs(), lengths=st.lists(st.integers(1, P), min_size=B, max_size=B),
       seed=st.integers(0, 2**16), alone=st.integers(0, B - 1))
def test_cached_logits_equal_full_forward_and_padded_row_equals_alone(config, lengths, seed, alone):
    params = jaxdec.init_params(config, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    prompts = rng.integers(0, config.vocab_size, (B, P)).astype(np.int32)  # junk after each length
    result = jaxdec.generate(params, config, prompts, lengths, max_new_tokens=MAX_NEW, return_logits=True)
    tokens, logits = np.asarray(result.tokens), np.asarray(result.logits)

    # Each row's prompt and generated tokens (all but the last, never fed back), right-padded.
    full = np.zeros((B, P + MAX_NEW - 1), np.int32)
    for b, n in enumerate(lengths):
        full[b, : n + MAX_NEW - 1] = np.concatenate([prompts[b, :n], tokens[b, :-1]])
    reference = np.asarray(jaxdec.forward(params, config, full, lengths + MAX_NEW - 1))
    for b, n in enumerate(lengths):
        # Step t's logits were computed after the prompt and t generated tokens.
        chex.assert_trees_all_close(logits[b], reference[b, n - 1 : n - 1 + MAX_NEW], atol=1e-4, rtol=1e-4)

    n = int(lengths[alone])
    own = jaxdec.generate(params, config, prompts[alone : alone + 1, :n], max_new_tokens=MAX_NEW,
                          return_logits=True)
    np.testing.assert_array_equal(np.asarray(own.tokens)[0], tokens[alone])
    chex.assert_trees_all_close(np.asarray(own.logits)[0], logits[alone], atol=1e-4, rtol=1e-4)
