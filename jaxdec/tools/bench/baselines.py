"""Decoders that exist only as benchmark baselines, to measure what the library's own choices save."""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

import jaxdec
from jaxdec import decode, model, seq2seq


@flax.struct.dataclass
class CrossRecomputedState:
    """The baseline's decode state: the self-attention KVCache and the encoder output
    [B, S, D] with its lengths [B], from which every step re-projects the cross K/V."""

    self_kv: jaxdec.KVCache
    encoded: jax.Array
    source_lengths: jax.Array


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "return_logits"))
def generate_cross_recomputed(params, config, prompts, source, source_lengths, lengths=None, *,
                              max_new_tokens: int, return_logits: bool = False):
    """Greedy decoding of an encoder-decoder that re-projects every decoder layer's cross K/V
    from the encoder output at every step, instead of once per sequence: the baseline that
    measures what carrying them in `seq2seq.Seq2SeqCache` saves. prompts int32 [B, P]
    right-padded to lengths int32 [B] (None: all real), source int32 [B, S], source_lengths
    int32 [B]; returns a GenerateResult like `jaxdec.generate`'s."""
    B, P = prompts.shape
    lengths = jnp.full((B,), P, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    encoded = seq2seq.encode(params, config, source, source_lengths)
    cross = seq2seq.cross_kv(params, config, encoded, source_lengths)
    decoder = seq2seq.decoder_view(params)
    logits, self_kv = model.prefill(decoder, config, prompts, lengths, P + max_new_tokens, cross=cross)

    def step(params, state: CrossRecomputedState, tokens, positions):
        cross = seq2seq.cross_kv(params, config, state.encoded, state.source_lengths)
        logits, self_kv = model.decode_step(seq2seq.decoder_view(params), config, state.self_kv,
                                            tokens, positions, cross=cross)
        return logits, state.replace(self_kv=self_kv)

    state = CrossRecomputedState(self_kv=self_kv, encoded=encoded, source_lengths=source_lengths)
    return decode.decode_loop(step, params, state, logits, lengths, sampler=jaxdec.Greedy(),
                              key=jax.random.key(0), max_new_tokens=max_new_tokens,
                              eos_id=jnp.int32(-1), pad_id=jnp.int32(0), return_logits=return_logits)
