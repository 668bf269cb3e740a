"""Portability without the hardware: every public program lowers for `cuda` and `tpu` with
`jax.export` (cross-platform lowering on this CPU machine), with the plain tuning and no custom
call, and the CPU choices (`jaxdec.tuning.CPU`) reach the CPU program only."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec
from jaxdec import api, beam, decode, training, tuning
from jaxdec.config import DecoderConfig, Seq2SeqConfig, TrainConfig
from jaxdec.sampling import Greedy, TopK

ACCELERATORS = ("cuda", "tpu")
DECODER = DecoderConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, max_len=64, position="rope",
                        num_kv_heads=2, tie_embeddings=True)
MODERN = DecoderConfig(vocab_size=64, num_layers=3, d_model=32, num_heads=4, max_len=64, position="rope",
                       num_kv_heads=2, head_dim=16, norm="rms_plus_one", norm_position="sandwich", mlp="gated",
                       use_bias=False, qk_norm="head", attn_softcap=20.0, final_softcap=30.0,
                       sliding_window=4, sliding_layers=(0, 2), rope_local_base=1e4,
                       rope_scaling=jaxdec.config.RopeScaling("linear", 2.0))
SEQ2SEQ = Seq2SeqConfig(vocab_size=64, num_encoder_layers=1, num_decoder_layers=2, d_model=32, num_heads=4,
                        max_len=64)


def _custom_calls(text: str) -> list[str]:
    return sorted(set(re.findall(r"custom_call @?\"?([\w.]+)", text)))


def _export(fn, platform: str, *args, **kwargs) -> str:
    exported = jax.export.export(fn, platforms=(platform,))(*args, **kwargs)
    return exported.mlir_module()


def _generate_args(config, B=2, P=5, new=4):
    """(params, DecodeInputs) and the static sizes of a small decode."""
    params = jaxdec.init_params(config, jax.random.key(0))
    source = jnp.ones((B, 6), jnp.int32) if isinstance(config, Seq2SeqConfig) else None
    inputs = decode.DecodeInputs(
        prompts=jnp.ones((B, P), jnp.int32), lengths=jnp.array([P, 3][:B], jnp.int32), source=source,
        source_lengths=jnp.array([6, 4][:B], jnp.int32) if source is not None else None,
        key=jax.random.key(1), eos_id=jnp.asarray(-1, jnp.int32), pad_id=jnp.asarray(0, jnp.int32))
    return (params, inputs), dict(config=config, max_new_tokens=new, capacity=P + new)


def test_accelerators_get_the_plain_tuning_and_cpu_its_own():
    """cuda, gpu, rocm and tpu resolve to the plain forms: einsum dots, jnp.argmax, scanned
    layers, one causal pass, one row group, no compiler options; cpu to the measured choices."""
    for platform in ("cuda", "gpu", "rocm", "tpu"):
        t = tuning.for_platform(platform)
        assert t == tuning.PLAIN
        assert (t.sum_chunk, t.argmax, t.layer_unroll, t.split_layers_max, t.causal_blocks, t.row_groups,
                t.tied_head_copy, t.decode_compiler_options) == (0, "jnp", 1, 0, 1, 1, False, ())
    assert tuning.for_platform("cpu") == tuning.CPU != tuning.PLAIN


@pytest.mark.parametrize("platform", ACCELERATORS)
@pytest.mark.parametrize("config", [DECODER, MODERN, SEQ2SEQ], ids=["decoder", "modern", "seq2seq"])
@pytest.mark.parametrize("sampler", [Greedy(), TopK(5, temperature=0.7)], ids=["greedy", "top_k"])
def test_generate_lowers_for_accelerators_with_no_custom_call(platform, config, sampler):
    """`generate`'s program (prefill + while loop) for the platform's tuning: no custom call,
    and a different program from the CPU-tuned one (the tuning is part of what is compiled)."""
    args, static = _generate_args(config)
    options = decode.DecodeOptions(sampler=sampler, **static)
    program = decode._generate.for_tuning(tuning.for_platform(platform))
    text = _export(program, platform, *args, options)
    assert _custom_calls(text) == [], _custom_calls(text)
    cpu_text = _export(decode._generate.for_tuning(tuning.CPU), platform, *args, options)
    assert cpu_text != text


@pytest.mark.slow  # a beam search and two train steps lowered per platform
@pytest.mark.parametrize("platform", ACCELERATORS)
def test_beam_search_forward_and_train_step_lower_for_accelerators(platform):
    """beam_search, forward and train_step (float32 and bfloat16 compute) lower with no custom call."""
    t = tuning.for_platform(platform)
    args, static = _generate_args(DECODER)
    options = beam.BeamOptions(beam_size=2, **static)
    text = _export(beam._beam_search.for_tuning(t), platform, *args, options)
    assert _custom_calls(text) == []
    params = args[0]
    tokens = jnp.ones((2, 8), jnp.int32)
    text = _export(api._apply_jit, platform, params, DECODER, tokens, jnp.array([8, 5], jnp.int32), tuning=t)
    assert _custom_calls(text) == []
    for dtype in ("float32", "bfloat16"):
        state = jaxdec.create_train_state(MODERN, TrainConfig(dtype=dtype, dropout=0.1), jax.random.key(0))
        state = state.replace(tuning=t)
        batch = {"tokens": np.ones((4, 9), np.int32), "lengths": np.array([9, 9, 5, 2], np.int32)}
        text = _export(training._train_step_jit, platform, state, batch)
        assert _custom_calls(text) == [], (dtype, _custom_calls(text))


@pytest.mark.slow  # a speculative program per draft and platform
@pytest.mark.parametrize("platform", ACCELERATORS)
def test_speculative_generate_lowers_for_accelerators_with_no_custom_call(platform):
    """`generate(..., draft=)`'s program (prefill, draft, verify rounds with per-row cache writes
    and a `lax.cond`) lowers with no custom call, for prompt lookup and a draft model sampling
    by the probability-ratio rule."""
    (params, inputs), static = _generate_args(MODERN)
    for draft, sampler in ((jaxdec.PromptLookup(num_tokens=2), Greedy()),
                           (jaxdec.DraftModel(params, MODERN, num_tokens=2), TopK(5, temperature=0.7))):
        options = decode.DecodeOptions(sampler=sampler, **{**static, "capacity": static["capacity"] + 2})
        program = decode._speculative.for_tuning(tuning.for_platform(platform))
        text = _export(program, platform, params, inputs, draft, options)
        assert _custom_calls(text) == [], _custom_calls(text)
