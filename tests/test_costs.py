"""Tests for jaxdec.tools.costs, the FLOP model the benchmarks and the explain report share:
the matmuls counted from a config against XLA's own count of the compiled program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jaxdec
from jaxdec.config import DecoderConfig, Seq2SeqConfig
from jaxdec.data.tokenizer import VOCAB_SIZE
from jaxdec.tools import costs

# XLA also counts elementwise work (norms, softmax, GELU, the optimizer update); the matmuls we
# count dominate it. One layer per stack: XLA's cost analysis counts the body of the layer scan once.
DECODER = DecoderConfig(vocab_size=VOCAB_SIZE, num_layers=1, d_model=64, num_heads=4, max_len=64,
                        num_kv_heads=2, position="rope")
# Llama's block: a gated MLP (three matrices), RMSNorm, no biases.
GATED = DecoderConfig(vocab_size=VOCAB_SIZE, num_layers=1, d_model=64, num_heads=4, max_len=64,
                      num_kv_heads=2, position="rope", norm="rms", mlp="gated", activation="silu",
                      use_bias=False, d_ff=96)


@pytest.mark.parametrize("config, source_len", [
    (DECODER, 0),
    (GATED, 0),
    (Seq2SeqConfig(vocab_size=VOCAB_SIZE, num_encoder_layers=1, num_decoder_layers=1, d_model=64,
                   num_heads=4, max_len=64), 29),
])
def test_counted_forward_flops_match_xla_cost_analysis(config, source_len):
    params = jax.eval_shape(lambda key: jaxdec.init_params(config, key), jax.random.key(0))
    T = 40 if not source_len else 11
    args = dict(source=jnp.ones((1, source_len), jnp.int32), source_lengths=jnp.array([source_len])
                ) if source_len else {}
    compiled = jax.jit(jaxdec.api.apply, static_argnames="config").lower(
        params, config, jnp.ones((1, T), jnp.int32), jnp.array([T]), **args).compile()
    xla = compiled.cost_analysis()["flops"]
    counted = costs.decoder_flops(config, T, T, T, source_len)
    if source_len:
        counted += costs.encoder_flops(config, source_len)
    assert 1.0 <= xla / counted < 1.15


@pytest.mark.parametrize("config", [pytest.param(DECODER, marks=pytest.mark.slow(reason="time budget")), GATED,
                                    DecoderConfig(vocab_size=VOCAB_SIZE, num_layers=1, d_model=64, num_heads=4,
                                                  max_len=64)])
def test_counted_train_step_flops_match_xla_cost_analysis(config):
    B, T = 4, 48
    state = jax.eval_shape(lambda: jaxdec.create_train_state(config, jaxdec.TrainConfig(), jax.random.key(0)))
    batch = {"tokens": jax.ShapeDtypeStruct((B, T + 1), jnp.int32)}
    xla = jax.jit(jaxdec.train_step).lower(state, batch).compile().cost_analysis()["flops"]
    assert 1.0 <= xla / costs.train_step_flops(config, B, T) < 1.15
