"""Public entry points shared by the model families, dispatching on the config's type.

`init_params`, `forward` (host-checked) and `apply` (traceable, unchecked) accept a
DecoderConfig (decoder-only LM) or a Seq2SeqConfig (encoder-decoder).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from jaxdec import checks, model, seq2seq
from jaxdec.config import DecoderConfig, Seq2SeqConfig

ModelConfig = DecoderConfig | Seq2SeqConfig


def check_config(config) -> None:
    if not isinstance(config, (DecoderConfig, Seq2SeqConfig)):
        raise ValueError(f"config must be a DecoderConfig or Seq2SeqConfig, got {type(config).__name__}")


def init_params(config: ModelConfig, key: jax.Array) -> dict:
    """Random float32 parameters for `config` (layouts: `model.init_decoder_params`,
    `seq2seq.init_seq2seq_params`)."""
    check_config(config)
    if isinstance(config, Seq2SeqConfig):
        return seq2seq.init_seq2seq_params(config, key)
    return model.init_decoder_params(config, key)


def apply(params, config, tokens, lengths, *, source=None, source_lengths=None,
          dropout_rate: float = 0.0, rng=None) -> jax.Array:
    """Traceable teacher-forcing forward pass with no host checks: logits float32 [B, T, V]."""
    if isinstance(config, Seq2SeqConfig):
        return seq2seq.seq2seq_logits(params, config, tokens, lengths, source, source_lengths,
                                      dropout_rate, rng)
    return model.decoder_logits(params, config, tokens, lengths, dropout_rate, rng)


_apply_jit = jax.jit(apply, static_argnames=("config", "dropout_rate"))


def check_source(config, source, source_lengths):
    """Host checks of the encoder input; returns source_lengths as int32 [B]."""
    if not isinstance(config, Seq2SeqConfig):
        if source is not None or source_lengths is not None:
            raise ValueError("source / source_lengths are for a Seq2SeqConfig model, got a DecoderConfig")
        return None
    if source is None:
        raise ValueError("an encoder-decoder model needs source=int32 [B, S] (and source_lengths)")
    checks.check_sequence("source", source, config.vocab_size, config.max_len)
    B, S = jnp.shape(source)
    if source_lengths is None:
        return jnp.full((B,), S, jnp.int32)
    checks.check_lengths("source_lengths", source_lengths, B, 1, S)
    return jnp.asarray(source_lengths, jnp.int32)


def _check_forward_args(config, tokens, lengths):
    check_config(config)
    checks.check_sequence("tokens", tokens, config.vocab_size, config.max_len)
    B, T = tokens.shape
    if lengths is None:
        return jnp.full((B,), T, jnp.int32)
    checks.check_lengths("lengths", lengths, B, 0, T)
    return jnp.asarray(lengths, jnp.int32)


def forward(params, config: ModelConfig, tokens, lengths=None, *, source=None, source_lengths=None,
            dropout_rate: float = 0.0, rng=None) -> jax.Array:
    """Teacher-forcing forward pass: every position predicted in parallel.

    Args:
      tokens: int32 [B, T], right-padded when lengths is given (for an encoder-decoder: the
        decoder input, e.g. [BOS] + target).
      lengths: int32 [B] real tokens per row (0 <= length <= T); None means all T are real.
        Keys at padding positions are never attended; an all-padding row gives finite logits.
      source, source_lengths: encoder input int32 [B, S] and its real lengths [B] (1..S),
        required by a Seq2SeqConfig and refused by a DecoderConfig.
      dropout_rate, rng: dropout on embeddings and residual branches (training only).

    Returns:
      float32 [B, T, V] logits; logits[:, t] predicts token t + 1.

    Raises:
      ValueError (before any compute) for a wrong rank or dtype, an empty batch, T > max_len,
      ids outside [0, vocab_size) or lengths outside [0, T]. Under an outer jit the value checks
      cannot run: use `forward_checked`.
    """
    tokens, lengths = checks.as_array(tokens), checks.as_array(lengths)
    source, source_lengths = checks.as_array(source), checks.as_array(source_lengths)
    lengths = _check_forward_args(config, tokens, lengths)
    source_lengths = check_source(config, source, source_lengths)
    if source is not None:
        if jnp.shape(source)[0] != tokens.shape[0]:
            raise ValueError(f"source has batch {jnp.shape(source)[0]}, tokens have {tokens.shape[0]}")
        source = jnp.asarray(source, jnp.int32)
    return _apply_jit(params, config, jnp.asarray(tokens, jnp.int32), lengths, source=source,
                      source_lengths=source_lengths, dropout_rate=dropout_rate, rng=rng)


def _checked_apply(params, config, tokens, lengths):
    checks.device_checks(tokens, lengths, config.vocab_size)
    return apply(params, config, tokens, lengths)


@functools.partial(jax.jit, static_argnames=("config",))
def _forward_checked(params, config, tokens, lengths):
    return checkify.checkify(_checked_apply, errors=checkify.user_checks)(params, config, tokens, lengths)


def forward_checked(params, config: DecoderConfig, tokens, lengths=None):
    """`forward` of a decoder-only model with its value checks compiled in (checkify), usable
    under an outer `jit`.

    Returns (error, logits); `error.throw()` raises if a token id or length is out of range.
    """
    if lengths is None:
        lengths = jnp.full(jnp.shape(tokens)[:1], jnp.shape(tokens)[1], jnp.int32)
    return _forward_checked(params, config, tokens, lengths)
