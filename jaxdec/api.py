"""Public entry points shared by the model families; each reaches its model through
`family.of(config)`.

`init_params`, `forward` (host-checked) and `apply` (traceable, unchecked) accept any registered
config: a DecoderConfig (decoder-only LM) or a Seq2SeqConfig (encoder-decoder).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jaxdec import checks, family, model, seq2seq  # noqa: F401  (importing registers the families)
from jaxdec.config import DecoderConfig, Seq2SeqConfig
from jaxdec.tuning import PLAIN, Tuning, for_arrays

ModelConfig = DecoderConfig | Seq2SeqConfig


def check_config(config) -> family.Family:
    """The config's family; ValueError for anything that is not a model config."""
    return family.of(config)


def init_params(config: ModelConfig, key: jax.Array) -> dict:
    """Random float32 parameters for `config` (layouts: `model.init_decoder_params`,
    `seq2seq.init_seq2seq_params`)."""
    return check_config(config).init(config, key)


@functools.lru_cache(maxsize=64)
def expected_params(config: ModelConfig):
    """The params pytree `config` needs, as jax.ShapeDtypeStruct leaves (nothing computed)."""
    return jax.eval_shape(lambda key: family.of(config).init(config, key), jax.random.key(0))


def _path(path) -> str:
    return "params" + jax.tree_util.keystr(path)


def check_params(params, config: ModelConfig) -> None:
    """Raises ValueError, naming the first mismatched leaf, unless `params` has exactly the tree,
    shapes and a floating dtype of the params that `config` describes. Runs on the host, on
    shapes only (tracers and sharded arrays pass through unread)."""
    want = expected_params(config)
    want_leaves = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    got_leaves = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, spec in want_leaves.items():
        if path not in got_leaves:
            raise ValueError(f"{_path(path)} is missing: {type(config).__name__} needs it with shape "
                             f"{tuple(spec.shape)}")
        got = got_leaves[path]
        shape = tuple(np.shape(got))
        if shape != tuple(spec.shape):
            raise ValueError(f"{_path(path)} has shape {shape}, but the config needs {tuple(spec.shape)} "
                             "(params and config describe different models)")
        dtype = jnp.result_type(got)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{_path(path)} has dtype {dtype}, expected a floating dtype")
    extra = [p for p in got_leaves if p not in want_leaves]
    if extra:
        raise ValueError(f"{_path(extra[0])} is not a parameter of this {type(config).__name__} "
                         "(params and config describe different models)")


def apply(params, config, tokens, lengths, *, source=None, source_lengths=None,
          dropout_rate: float = 0.0, rng=None, tuning: Tuning = PLAIN, segment_ids=None,
          remat: str = "none") -> jax.Array:
    """Traceable teacher-forcing forward pass with no host checks: logits float32 [B, T, V].

    segment_ids (int [B, T], packed documents) and remat (`model.remat_block`) reach the family's
    forward only when given, so a family without them still runs the rest."""
    extra = {} if segment_ids is None else {"segment_ids": segment_ids}
    if remat != "none":
        extra["remat"] = remat
    return family.of(config).forward(params, config, tokens, lengths, source, source_lengths,
                                     dropout_rate, rng, tuning=tuning, **extra)


_apply_jit = jax.jit(apply, static_argnames=("config", "dropout_rate", "tuning", "remat"))


def check_segment_ids(name: str, segment_ids, shape: tuple[int, ...], config, lengths=None,
                      check_values: bool | None = None) -> None:
    """Host checks of packed documents' segment ids: an integer array of `shape`, for a
    decoder-only config, not given together with lengths (segment id 0 marks padding, so lengths
    would be a second, possibly contradicting, account of it), and (with check_values; None: when
    the array is concrete) no negative id. ValueError naming the bad value."""
    if family.of(config).takes_source:
        raise ValueError(f"{name} (packed documents) are for a decoder-only model, got a "
                         f"{type(config).__name__}: an encoder-decoder row holds one source and one target")
    if lengths is not None:
        raise ValueError(f"give {name} or lengths, not both: segment id 0 marks the padding")
    checks.check_int_array(name, segment_ids, len(shape))
    if tuple(np.shape(segment_ids)) != tuple(shape):
        raise ValueError(f"{name} must have the tokens' shape {tuple(shape)}, got {tuple(np.shape(segment_ids))}")
    if check_values is None:
        check_values = checks.is_concrete(segment_ids)
    if check_values and np.size(segment_ids) and int(np.min(segment_ids)) < 0:
        raise ValueError(f"{name} holds {int(np.min(segment_ids))}: ids are 1, 2, ... per document and "
                         "0 for padding, never negative")


def check_source(config, source, source_lengths):
    """Host checks of the encoder input; returns source_lengths as int32 [B]."""
    if not family.of(config).takes_source:
        if source is not None or source_lengths is not None:
            raise ValueError(f"source / source_lengths are for an encoder-decoder model, got a "
                             f"{type(config).__name__}")
        return None
    if source is None:
        raise ValueError(f"an encoder-decoder model ({type(config).__name__}) needs source=int32 "
                         "[B, S] (and source_lengths)")
    checks.check_sequence("source", source, config.vocab_size, config.max_len)
    B, S = jnp.shape(source)
    if source_lengths is None:
        return jnp.full((B,), S, jnp.int32)
    checks.check_lengths("source_lengths", source_lengths, B, 1, S)
    return jnp.asarray(source_lengths, jnp.int32)


def _check_forward_args(params, config, tokens, lengths):
    check_config(config)
    check_params(params, config)
    checks.check_sequence("tokens", tokens, config.vocab_size, config.max_len)
    B, T = tokens.shape
    if lengths is None:
        return jnp.full((B,), T, jnp.int32)
    checks.check_lengths("lengths", lengths, B, 0, T)
    return jnp.asarray(lengths, jnp.int32)


def forward(params, config: ModelConfig, tokens, lengths=None, *, source=None, source_lengths=None,
            dropout_rate: float = 0.0, rng=None, segment_ids=None) -> jax.Array:
    """Teacher-forcing forward pass: every position predicted in parallel.

    Args:
      tokens: int32 [B, T], right-padded when lengths is given (for an encoder-decoder: the
        decoder input, e.g. [BOS] + target).
      lengths: int32 [B] real tokens per row (0 <= length <= T); None means all T are real.
        Keys at padding positions are never attended; an all-padding row gives finite logits.
      source, source_lengths: encoder input int32 [B, S] and its real lengths [B] (1..S),
        required by a Seq2SeqConfig and refused by a DecoderConfig.
      dropout_rate, rng: dropout on embeddings and residual branches (training only).
      segment_ids: int32 [B, T], several documents per row (decoder-only): 1, 2, ... per
        document, 0 for padding (then no lengths). Each token attends only within its document
        and positions restart at each, so a document's logits are those it has alone.

    Returns:
      float32 [B, T, V] logits; logits[:, t] predicts token t + 1.

    Raises:
      ValueError (before any compute) for params whose tree or shapes differ from the config's,
      a wrong rank or dtype, an empty batch, T > max_len,
      ids outside [0, vocab_size), lengths outside [0, T], segment ids unlike tokens' shape or
      negative, or given with lengths or to an encoder-decoder. Under an outer jit the value
      checks cannot run: use `forward_checked`.
    """
    tokens, lengths = checks.as_array(tokens), checks.as_array(lengths)
    source, source_lengths = checks.as_array(source), checks.as_array(source_lengths)
    segment_ids = checks.as_array(segment_ids)
    if segment_ids is not None:
        check_config(config)
        checks.check_int_array("tokens", tokens, 2)
        check_segment_ids("segment_ids", segment_ids, np.shape(tokens), config, lengths)
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
    lengths = _check_forward_args(params, config, tokens, lengths)
    source_lengths = check_source(config, source, source_lengths)
    if source is not None:
        if jnp.shape(source)[0] != tokens.shape[0]:
            raise ValueError(f"source has batch {jnp.shape(source)[0]}, tokens have {tokens.shape[0]}")
        source = jnp.asarray(source, jnp.int32)
    return _apply_jit(params, config, jnp.asarray(tokens, jnp.int32), lengths, source=source,
                      source_lengths=source_lengths, dropout_rate=dropout_rate, rng=rng,
                      tuning=for_arrays(params), segment_ids=segment_ids)


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
    check_config(config)
    check_params(params, config)
    if lengths is None:
        lengths = jnp.full(jnp.shape(tokens)[:1], jnp.shape(tokens)[1], jnp.int32)
    return _forward_checked(params, config, tokens, lengths)
