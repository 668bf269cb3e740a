"""The encoder-decoder Transformer, built from the decoder-only model's layers.

Encoder: bidirectional self-attention with the source padding mask. Decoder: each block runs
masked self-attention, then cross-attention (Q from the decoder, K/V from the encoder output),
then the MLP. For decoding, the encoder runs once, each decoder layer's cross K/V are projected
once (`cross_kv`) and carried through the scan; only the self-attention cache grows.

Parameters: {"embed" (shared, if share_embeddings), "encoder": {"embed"?, "pos_embed"?, "layers",
"final_norm"?}, "decoder": {"embed"?, "pos_embed"?, "layers", "final_norm"?, "logits_bias"?,
"head"?}}. `decoder_view` / `encoder_view` return a decoder-only-shaped dict, so every function
of `model` applies to the decoder unchanged.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from jaxdec import layers, model
from jaxdec.attention import padding_mask
from jaxdec.cache import CrossKV, KVCache
from jaxdec.config import Seq2SeqConfig


def _init_stack(key: jax.Array, config: Seq2SeqConfig, num_layers: int, cross: bool) -> dict:
    D = config.d_model
    out_std = config.init_std / math.sqrt(2 * num_layers)
    k_layers, k_pos = jax.random.split(key)
    stack: dict = {"layers": []}
    for k_attn, k_cross, k_mlp in jax.random.split(k_layers, (num_layers, 3)):
        layer = {"attn_norm": layers.init_norm(D), "attn": layers.init_attention(k_attn, config, out_std)}
        if cross:
            layer |= {"cross_norm": layers.init_norm(D),
                      "cross": layers.init_attention(k_cross, config, out_std, cross=True)}
        layer |= {"mlp_norm": layers.init_norm(D), "mlp": layers.init_mlp(k_mlp, config, out_std)}
        stack["layers"].append(layer)
    if config.position == "learned":
        stack["pos_embed"] = layers._normal(k_pos, (config.max_len, D), config.init_std / 2)
    if config.norm_position == "pre":
        stack["final_norm"] = layers.init_norm(D)
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
           dropout_rate: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
    """The encoder: source int32 [B, S], source_lengths int32 [B] -> encoded [B, S, D].

    Padding keys are masked in every layer, so outputs at real positions do not depend on what
    the padding holds.
    """
    enc = encoder_view(params)
    B, S = source.shape
    positions = jnp.broadcast_to(jnp.arange(S), (B, S))
    x = model.embed_inputs(enc, config, source, positions)
    if dropout_rate > 0.0 and rng is not None:
        x = layers.dropout(x, dropout_rate, jax.random.fold_in(rng, 0))
    mask = padding_mask(source_lengths, S)[:, None, :]  # [B, 1, S]
    x, _ = model.run_layers(enc, config, x, positions, mask, dropout_rate, rng)
    if "final_norm" in enc:
        x = layers.layer_norm(enc["final_norm"], x, config.layer_norm_eps)
    return x


def cross_kv(params: dict, config: Seq2SeqConfig, encoded: jax.Array, source_lengths: jax.Array) -> CrossKV:
    """Projects every decoder layer's cross-attention K/V from encoded [B, S, D], once."""
    ks, vs = [], []
    for p in decoder_view(params)["layers"]:
        k, v = layers.project_kv(p["cross"], encoded, config.kv_heads)  # [B, S, K, H]
        ks.append(jnp.swapaxes(k, 1, 2))
        vs.append(jnp.swapaxes(v, 1, 2))
    return CrossKV(k=jnp.stack(ks), v=jnp.stack(vs), lengths=source_lengths.astype(jnp.int32))


def seq2seq_logits(params: dict, config: Seq2SeqConfig, tokens: jax.Array, lengths: jax.Array,
                   source: jax.Array, source_lengths: jax.Array, dropout_rate: float = 0.0,
                   rng: jax.Array | None = None) -> jax.Array:
    """Teacher forcing: decoder tokens [B, T] (e.g. [BOS] + target) -> logits float32 [B, T, V]."""
    enc_rng, dec_rng = (None, None) if rng is None else jax.random.split(rng)
    encoded = encode(params, config, source, source_lengths, dropout_rate, enc_rng)
    cross = cross_kv(params, config, encoded, source_lengths)
    return model.decoder_logits(decoder_view(params), config, tokens, lengths, dropout_rate, dec_rng,
                                cross=cross)


# --- decoding ---------------------------------------------------------------------------------


@flax.struct.dataclass
class Seq2SeqCache:
    """Decode state of the encoder-decoder: the growing self-attention cache plus the fixed
    cross-attention K/V. With `encoded` set instead of `cross`, every step re-projects the cross
    K/V from the encoder output (a benchmark of what caching them saves)."""

    self_kv: KVCache
    cross: CrossKV | None
    encoded: jax.Array | None = None
    source_lengths: jax.Array | None = None


def prefill(params, config: Seq2SeqConfig, tokens, starts, capacity, source, source_lengths,
            cache_cross: bool = True):
    """Encodes the source once, projects cross K/V once, and prefills the decoder prompts."""
    encoded = encode(params, config, source, source_lengths)
    cross = cross_kv(params, config, encoded, source_lengths)
    logits, self_kv = model.prefill(decoder_view(params), config, tokens, starts, capacity, cross=cross)
    if cache_cross:
        return logits, Seq2SeqCache(self_kv=self_kv, cross=cross)
    return logits, Seq2SeqCache(self_kv=self_kv, cross=None, encoded=encoded,
                                source_lengths=source_lengths.astype(jnp.int32))


def decode_step(params, config: Seq2SeqConfig, cache: Seq2SeqCache, tokens, positions):
    """One cached decoder step against the carried cross K/V (or re-projected ones)."""
    cross = cache.cross
    if cross is None:
        cross = cross_kv(params, config, cache.encoded, cache.source_lengths)
    logits, self_kv = model.decode_step(decoder_view(params), config, cache.self_kv, tokens,
                                        positions, cross=cross)
    return logits, cache.replace(self_kv=self_kv)


@flax.struct.dataclass
class Seq2SeqBuffer:
    """The uncached baseline's state: the decoder's token buffer and the source itself."""

    buf: model.TokenBuffer
    source: jax.Array
    source_lengths: jax.Array


def _recompute_cross(params, config, state_source, source_lengths) -> CrossKV:
    return cross_kv(params, config, encode(params, config, state_source, source_lengths), source_lengths)


def prefill_uncached(params, config, tokens, starts, capacity, source, source_lengths):
    cross = _recompute_cross(params, config, source, source_lengths)
    logits, buf = model.prefill_uncached(decoder_view(params), config, tokens, starts, capacity, cross)
    return logits, Seq2SeqBuffer(buf=buf, source=source, source_lengths=source_lengths)


def recompute_step(params, config, state: Seq2SeqBuffer, tokens, positions):
    """Reruns the encoder, the cross projections and the whole decoder buffer every step."""
    cross = _recompute_cross(params, config, state.source, state.source_lengths)
    logits, buf = model.recompute_step(decoder_view(params), config, state.buf, tokens, positions, cross)
    return logits, state.replace(buf=buf)
