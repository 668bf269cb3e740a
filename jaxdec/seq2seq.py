"""The encoder-decoder Transformer, built from the decoder-only model's layers.

Encoder: bidirectional self-attention with the source padding mask. Decoder: each block runs
masked self-attention, then cross-attention (Q from the decoder, K/V from the encoder output),
then the MLP. For decoding, the encoder runs once, each decoder layer's cross K/V are projected
once (`cross_kv`) and carried through the scan; only the self-attention cache grows.

Parameters: {"embed" (shared, if share_embeddings), "encoder": {"embed"?, "pos_embed"?, "layers",
"final_norm"?}, "decoder": {"embed"?, "pos_embed"?, "layers", "final_norm"?, "logits_bias"?,
"head"?}}; "layers" is one dict of [L, ...] stacked blocks, as in `model` (the decoder's also
hold cross_norm and cross: q [L, D, N*H], kv [L, D, 2K*H], out [L, N*H, D]). `decoder_view` / `encoder_view` return a decoder-only-shaped dict, so every function
of `model` applies to the decoder unchanged.
"""

from __future__ import annotations


import flax.struct
import jax
import jax.numpy as jnp

from jaxdec import family, layers, model
from jaxdec.attention import padding_mask
from jaxdec.cache import CrossKV, KVCache
from jaxdec.config import Seq2SeqConfig
from jaxdec.tuning import PLAIN, Tuning


def _init_stack(key: jax.Array, config: Seq2SeqConfig, num_layers: int, cross: bool) -> dict:
    k_layers, k_pos = jax.random.split(key)
    stack: dict = {"layers": model.init_blocks(k_layers, config, num_layers, cross=cross)}
    if config.position == "learned":
        stack["pos_embed"] = layers._normal(k_pos, (config.max_len, config.d_model), config.init_std / 2)
    if config.norm_position == "pre":
        stack["final_norm"] = layers.init_norm(config.d_model)
    return stack


def init_seq2seq_params(config: Seq2SeqConfig, key: jax.Array) -> dict:
    """Random float32 parameters (layout in the module docstring)."""
    k_enc, k_dec, k_emb_enc, k_emb_dec, k_head = jax.random.split(key, 5)
    V, D = config.vocab_size, config.d_model
    params = {"encoder": _init_stack(k_enc, config, config.num_encoder_layers, cross=False),
              "decoder": _init_stack(k_dec, config, config.num_decoder_layers, cross=True)}
    if config.share_embeddings:
        params["embed"] = layers._normal(k_emb_dec, (V, D), config.init_std)
    else:
        params["encoder"]["embed"] = layers._normal(k_emb_enc, (V, D), config.init_std)
        params["decoder"]["embed"] = layers._normal(k_emb_dec, (V, D), config.init_std)
    if config.logits_bias:
        params["decoder"]["logits_bias"] = jnp.zeros((V,), jnp.float32)
    if not config.tie_embeddings:
        params["decoder"]["head"] = layers._normal(k_head, (D, V), config.init_std)
    return params


def _view(params: dict, part: str) -> dict:
    stack = params[part]
    return stack if "embed" in stack else {**stack, "embed": params["embed"]}


def encoder_view(params: dict) -> dict:
    return _view(params, "encoder")


def decoder_view(params: dict) -> dict:
    return _view(params, "decoder")


def encode(params: dict, config: Seq2SeqConfig, source: jax.Array, source_lengths: jax.Array,
           dropout_rate: float = 0.0, rng: jax.Array | None = None, return_attention: bool = False,
           tuning: Tuning = PLAIN, remat: str = "none"):
    """The encoder: source int32 [B, S], source_lengths int32 [B] -> encoded [B, S, D].

    Padding keys are masked in every layer, so outputs at real positions do not depend on what
    the padding holds. With return_attention, returns (encoded, probs float32 [L, B, N, S, S]).
    remat: what each layer keeps for the backward pass (`model.remat_block`).
    """
    enc = encoder_view(params)
    B, S = source.shape
    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    x = model.embed_inputs(enc, config, source, positions)
    if dropout_rate > 0.0 and rng is not None:
        x = layers.dropout(x, dropout_rate, layers.fold_key(rng, 0))
    mask = padding_mask(source_lengths, S)[:, None, :]  # [B, 1, S]
    x, attention = model.run_layers(enc, config, x, positions, mask, dropout_rate, rng,
                                    return_attention=return_attention, tuning=tuning, remat=remat)
    if "final_norm" in enc:
        x = layers.layer_norm(enc["final_norm"], x, config.layer_norm_eps)
    return (x, attention["self"]) if return_attention else x


def cross_kv(params: dict, config: Seq2SeqConfig, encoded: jax.Array, source_lengths: jax.Array) -> CrossKV:
    """Projects every decoder layer's cross-attention K/V from encoded [B, S, D], once."""
    project = lambda p: layers.project_kv(p, encoded, config.kv_heads)  # noqa: E731 - one use
    blocks = decoder_view(params)["layers"]
    if isinstance(blocks, list):  # per-layer weights (`model.decode_params`)
        k, v = (jnp.stack(a) for a in zip(*(project(p["cross"]) for p in blocks)))
    else:
        k, v = jax.vmap(project)(blocks["cross"])  # [L, B, S, K, H]
    return CrossKV(k=jnp.swapaxes(k, 2, 3), v=jnp.swapaxes(v, 2, 3),
                   lengths=source_lengths.astype(jnp.int32))


def seq2seq_logits(params: dict, config: Seq2SeqConfig, tokens: jax.Array, lengths: jax.Array,
                   source: jax.Array, source_lengths: jax.Array, dropout_rate: float = 0.0,
                   rng: jax.Array | None = None, return_attention: bool = False, tuning: Tuning = PLAIN,
                   segment_ids=None, remat: str = "none"):
    """Teacher forcing: decoder tokens [B, T] (e.g. [BOS] + target) -> logits float32 [B, T, V].

    With return_attention, returns (logits, {"self": [L,B,N,T,T], "cross": [L,B,N,T,S],
    "encoder": [Le,B,N,S,S]}), float32 probabilities of this very pass. remat: what each
    encoder and decoder layer keeps for the backward pass (`model.remat_block`).

    Raises:
      ValueError for segment_ids: packed documents are the decoder-only family's (one source per
      row gives no document boundary the decoder could keep to).
    """
    if segment_ids is not None:
        raise ValueError("segment_ids (packed documents) are for a decoder-only model (DecoderConfig); "
                         "an encoder-decoder row holds one source and one target")
    enc_rng, dec_rng = (None, None) if rng is None else layers.split_key(rng)
    encoded = encode(params, config, source, source_lengths, dropout_rate, enc_rng, return_attention, tuning,
                     remat)
    encoded, enc_probs = encoded if return_attention else (encoded, None)
    cross = cross_kv(params, config, encoded, source_lengths)
    out = model.decoder_logits(decoder_view(params), config, tokens, lengths, dropout_rate, dec_rng,
                               cross=cross, return_attention=return_attention, tuning=tuning, remat=remat)
    if not return_attention:
        return out
    logits, attention = out
    return logits, {**attention, "encoder": enc_probs}


# --- decoding ---------------------------------------------------------------------------------


@flax.struct.dataclass
class Seq2SeqCache:
    """Decode state of the encoder-decoder: the growing self-attention cache plus the
    cross-attention K/V, projected once from the encoder output and fixed for every step."""

    self_kv: KVCache
    cross: CrossKV


def prefill(params, config: Seq2SeqConfig, tokens, lengths, capacity, source, source_lengths,
            tuning: Tuning = PLAIN, buffer=None):
    """Encodes the source once, projects cross K/V once, and prefills the decoder prompts
    (tokens int32 [B, P] right-padded, lengths int32 [B]) in chunks (into `buffer`'s storage, if
    given: the self-attention cache's)."""
    encoded = encode(params, config, source, source_lengths, tuning=tuning)
    cross = cross_kv(params, config, encoded, source_lengths)
    logits, self_kv = model.prefill(decoder_view(params), config, tokens, lengths, capacity, cross=cross,
                                    tuning=tuning, buffer=buffer)
    return logits, Seq2SeqCache(self_kv=self_kv, cross=cross)


def decode_step(params, config: Seq2SeqConfig, cache: Seq2SeqCache, tokens, positions,
                tuning: Tuning = PLAIN):
    """One cached decoder step against the carried cross K/V."""
    logits, self_kv = model.decode_step(decoder_view(params), config, cache.self_kv, tokens,
                                        positions, cross=cache.cross, tuning=tuning)
    return logits, cache.replace(self_kv=self_kv)


def extend(params, config: Seq2SeqConfig, cache: Seq2SeqCache, tokens, tuning: Tuning = PLAIN):
    """C new decoder tokens per row (int32 [B, C]) against the cache and the carried cross K/V:
    logits float32 [B, C, V] and the cache (`model.extend`)."""
    logits, self_kv = model.extend(decoder_view(params), config, cache.self_kv, tokens, cross=cache.cross,
                                   tuning=tuning)
    return logits, cache.replace(self_kv=self_kv)


@flax.struct.dataclass
class Seq2SeqBuffer:
    """The uncached baseline's state: the decoder's token buffer and the source itself."""

    buf: model.TokenBuffer
    source: jax.Array
    source_lengths: jax.Array


def _recompute_cross(params, config, state_source, source_lengths, tuning: Tuning = PLAIN) -> CrossKV:
    return cross_kv(params, config, encode(params, config, state_source, source_lengths, tuning=tuning),
                    source_lengths)


def prefill_uncached(params, config, tokens, lengths, capacity, source, source_lengths, tuning: Tuning = PLAIN):
    cross = _recompute_cross(params, config, source, source_lengths, tuning)
    logits, buf = model.prefill_uncached(decoder_view(params), config, tokens, lengths, capacity, cross,
                                         tuning=tuning)
    return logits, Seq2SeqBuffer(buf=buf, source=source, source_lengths=source_lengths)


def recompute_step(params, config, state: Seq2SeqBuffer, tokens, positions, tuning: Tuning = PLAIN):
    """Reruns the encoder, the cross projections and the whole decoder buffer every step."""
    cross = _recompute_cross(params, config, state.source, state.source_lengths, tuning)
    logits, buf = model.recompute_step(decoder_view(params), config, state.buf, tokens, positions, cross,
                                       tuning=tuning)
    return logits, state.replace(buf=buf)


# --- the encoder-decoder family ---------------------------------------------------------------


def decode_params(params: dict, config: Seq2SeqConfig, batch: int, tuning: Tuning = PLAIN) -> dict:
    """The decoder's weights laid out for a loop of cached steps (`model.decode_params`)."""
    return {**params, "decoder": model.decode_params(decoder_view(params), config, batch, tuning)}


def _select_rows(cache: Seq2SeqCache, rows: jax.Array, tuning: Tuning = PLAIN) -> Seq2SeqCache:
    return cache.replace(self_kv=model.select_cache_rows(cache.self_kv, rows, tuning))


def _repeat_rows(cache: Seq2SeqCache, n: int) -> Seq2SeqCache:
    return Seq2SeqCache(self_kv=model.repeat_cache_rows(cache.self_kv, n), cross=cache.cross.repeat(n))


FAMILY = family.Family(
    name="encoder-decoder",
    takes_source=True,
    init=init_seq2seq_params,
    forward=seq2seq_logits,
    prefill=prefill,
    step=decode_step,
    extend=extend,
    self_kv=lambda cache: cache.self_kv,
    with_self_kv=lambda cache, kv: cache.replace(self_kv=kv),
    prefill_uncached=prefill_uncached,
    recompute_step=recompute_step,
    select_rows=_select_rows,
    repeat_rows=_repeat_rows,
    decode_params=decode_params,
)
family.register(Seq2SeqConfig, FAMILY)
