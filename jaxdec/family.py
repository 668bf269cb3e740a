"""A model family: the one interface through which decoding, beam search, training and
inspection reach a model.

Each family module builds one `Family` and registers it for its config type: `model` for the
decoder-only LM (`DecoderConfig`), `seq2seq` for the encoder-decoder (`Seq2SeqConfig`).
`family.of(config)` finds it. The loops never test a config's or a cache's type: a new family
(say, a prefix-LM) is one new module that defines its config, its functions and its cache, and
calls `register`.

The functions, with B batch, T / P token and prompt lengths, S cache capacity, V vocabulary:
- init(config, key) -> params (a pytree of float32 arrays).
- forward(params, config, tokens [B,T], lengths [B], source, source_lengths, dropout_rate, rng,
  return_attention) -> logits float32 [B,T,V] (and the attention dict with return_attention).
- prefill(params, config, tokens [B,P], lengths [B], capacity, source, source_lengths, buffer=None)
  -> (logits float32 [B,V] predicting each prompt's next token, cache); buffer: a
  `cache.KVBuffer` whose storage the self-attention cache takes instead of new zeros.
- step(params, config, cache, tokens [B], positions [B]) -> (logits float32 [B,V], cache).
- extend(params, config, cache, tokens [B,C]) -> (logits float32 [B,C,V], cache): C new tokens
  per row against the cache (speculative verification); `step` is extend with C = 1.
- self_kv(cache) -> the KVCache of its self-attention; with_self_kv(cache, kv) -> cache holding
  kv instead (the speculative loop moves each row's write slot back after a rejection).
- prefill_uncached / recompute_step: the same two for the uncached baseline (its "cache" is
  whatever the family recomputes from).
- select_rows(cache, rows int32 [R]) -> cache with rows reordered (beam search; only filled
  slots are moved), repeat_rows(cache, n) -> each row repeated n times (B -> B * n).
- decode_params(params, config, batch) -> params laid out for a loop of cached steps over `batch`
  rows (default: unchanged), run once before the prefill; prefill and `step` must accept both
  layouts, and laying out params laid out already must give them back.
Arguments a family does not use (e.g. source for the decoder-only LM) are None. Every function
but init and repeat_rows also takes `tuning=` (a `jaxdec.tuning.Tuning`, static): the platform's
speed choices, which change how, never what, it computes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family's functions (see the module docstring for their signatures).

    takes_source: the family conditions on an encoder input (source, source_lengths).
    """

    name: str
    takes_source: bool
    init: Callable[..., Any]
    forward: Callable[..., Any]
    prefill: Callable[..., Any]
    step: Callable[..., Any]
    prefill_uncached: Callable[..., Any]
    recompute_step: Callable[..., Any]
    select_rows: Callable[..., Any]
    repeat_rows: Callable[..., Any]
    extend: Callable[..., Any] = None
    self_kv: Callable[[Any], Any] = lambda cache: cache
    with_self_kv: Callable[[Any, Any], Any] = lambda cache, kv: kv
    decode_params: Callable[..., Any] = lambda params, config, batch, tuning=None: params


_FAMILIES: dict[type, Family] = {}


def register(config_type: type, family: Family) -> None:
    """Makes `family` the one that `of` returns for configs of type `config_type`."""
    _FAMILIES[config_type] = family


def of(config) -> Family:
    """The family of `config`; ValueError for a config no family registered."""
    family = _FAMILIES.get(type(config))
    if family is None:
        known = ", ".join(t.__name__ for t in _FAMILIES) or "none registered"
        raise ValueError(f"config must be a model config ({known}), got {type(config).__name__}")
    return family
