"""Attention maps and masks, from the same code path as `forward`.

`attention` runs the model family's own teacher-forcing pass (`model.decoder_logits` or
`seq2seq.seq2seq_logits`) with `return_attention=True`: the layers hand back the probabilities
their softmax produced, so what is drawn is what the model computed, not a re-derivation.

    result = jaxdec.inspect.attention(params, config, tokens, lengths)
    result.self_attention[layer][b, n]   # float32 [T, T]: row t = query t's weights over keys

Rows sum to 1 over the allowed keys and are 0 on masked keys; a query with no allowed key
(a row of an all-padding example) is all zeros.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxdec import api, checks, family, layers
from jaxdec.attention import combine_masks, decoder_self_mask, padding_mask
from jaxdec.config import DecoderConfig, Seq2SeqConfig


@flax.struct.dataclass
class Attention:
    """What one teacher-forcing pass attended to.

    Attributes:
      logits: float32 [B, T, V], equal to `jaxdec.forward`'s.
      self_attention: L arrays float32 [B, N, T, T], the decoder's masked self-attention
        probabilities per layer (row = query position, column = key position).
      cross_attention: L arrays float32 [B, N, T, S] (S: padded source length), the decoder's
        attention over the encoder output per layer; None for a decoder-only model.
      encoder_attention: Le arrays float32 [B, N, S, S], the encoder's bidirectional
        self-attention per layer; None for a decoder-only model.
      masks: the boolean masks the pass used (True = may attend): "self" bool [B, T, T]
        (causal AND padding, AND same document with segment ids); for an encoder-decoder also "cross" bool [B, T, S] and
        "encoder" bool [B, S, S] (source padding).
    """

    logits: jax.Array
    self_attention: list[jax.Array]
    cross_attention: list[jax.Array] | None
    encoder_attention: list[jax.Array] | None
    masks: dict[str, jax.Array]


def _layers(stacked: jax.Array | None) -> list[jax.Array] | None:
    """[L, ...] -> a list of L arrays [...] (L is static, so this works under jit)."""
    return None if stacked is None else [stacked[i] for i in range(stacked.shape[0])]


def attention_unchecked(params, config, tokens, lengths, source=None, source_lengths=None,
                        segment_ids=None) -> Attention:
    """Traceable core of `attention` with no host checks: int32 inputs of the documented shapes."""
    B, T = tokens.shape
    masks = {"self": decoder_self_mask(lengths, T)}  # [B, T, T]
    extra = {}
    if segment_ids is not None:
        masks["self"] = combine_masks(masks["self"], layers.segment_mask(segment_ids))
        extra["segment_ids"] = segment_ids
    logits, probs = family.of(config).forward(params, config, tokens, lengths, source, source_lengths,
                                              return_attention=True, **extra)
    encoder = _layers(probs.get("encoder"))
    if source is not None:
        S = source.shape[1]
        keys = padding_mask(source_lengths, S)  # [B, S]
        masks["cross"] = jnp.broadcast_to(keys[:, None, :], (B, T, S))
        masks["encoder"] = jnp.broadcast_to(keys[:, None, :], (B, S, S))
    return Attention(logits=logits, self_attention=_layers(probs["self"]),
                     cross_attention=_layers(probs["cross"]), encoder_attention=encoder, masks=masks)


_attention_jit = jax.jit(attention_unchecked, static_argnames=("config",))


def attention(params, config: DecoderConfig | Seq2SeqConfig, tokens, lengths=None, *, source=None,
              source_lengths=None, segment_ids=None) -> Attention:
    """Logits, attention probabilities and masks of one teacher-forcing pass.

    Pure and jit-able (`jax.jit(attention, static_argnames="config")`); called eagerly it checks
    its inputs on the host first, like `jaxdec.forward`.

    Args:
      params: the model's parameters.
      config: a DecoderConfig or a Seq2SeqConfig.
      tokens: int32 [B, T], right-padded when lengths is given (encoder-decoder: the decoder
        input, e.g. [BOS] + target).
      lengths: int32 [B], real tokens per row (0..T); None means all T.
      source: int32 [B, S], the encoder input (a Seq2SeqConfig needs it, a DecoderConfig refuses it).
      source_lengths: int32 [B], real source tokens per row (1..S); None means all S.
      segment_ids: int32 [B, T], packed documents (decoder-only; `jaxdec.forward`): 1, 2, ...
        per document, 0 for padding, instead of lengths. No token attends across a document's
        boundary, so its rows are zero on every other document's keys.

    Returns:
      an `Attention` (logits float32 [B, T, V]; per-layer float32 probabilities; bool masks).

    Raises:
      ValueError, before any compute, naming the bad value: params unlike the config's, a
      wrong rank or dtype, T or S beyond
      max_len, ids outside [0, vocab_size), lengths out of range, a source batch unlike tokens',
      segment ids unlike tokens' shape, negative, with lengths or for an encoder-decoder.
    """
    api.check_config(config)
    tokens, lengths = checks.as_array(tokens), checks.as_array(lengths)
    source, source_lengths = checks.as_array(source), checks.as_array(source_lengths)
    segment_ids = checks.as_array(segment_ids)
    checks.check_sequence("tokens", tokens, config.vocab_size, config.max_len)
    B, T = jnp.shape(tokens)
    if segment_ids is not None:
        api.check_segment_ids("segment_ids", segment_ids, (B, T), config, lengths)
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
    if lengths is None:
        lengths = jnp.full((B,), T, jnp.int32)
    else:
        checks.check_lengths("lengths", lengths, B, 0, T)
    source_lengths = api.check_source(config, source, source_lengths)
    if source is not None:
        if jnp.shape(source)[0] != B:
            raise ValueError(f"source has batch {jnp.shape(source)[0]}, tokens have {B}")
        source = jnp.asarray(source, jnp.int32)
    api.check_params(params, config)
    return _attention_jit(params, config, jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32),
                          source, source_lengths, segment_ids)

