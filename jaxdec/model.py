"""The decoder-only LM: init, forward (training), prefill and one cached decode step.

Three small functions per phase share the same layers:
- `forward`: all T positions in parallel under the causal (and padding) mask, for training.
- `prefill`: one forward pass over right-aligned prompts that also writes their K/V to the cache.
- `decode_step`: the newest token's query row only, attending to the cache's valid keys.
`recompute_step` is the uncached baseline: it reruns the whole buffer every step.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from jaxdec import cache as kv_cache
from jaxdec import layers
from jaxdec.attention import attend, causal_mask, combine_masks, decoder_self_mask, key_range_mask
from jaxdec.cache import CrossKV
from jaxdec.config import DecoderConfig

# --- parameters -------------------------------------------------------------------------------


def init_decoder_params(config: DecoderConfig, key: jax.Array) -> dict:
    """Random parameters of the decoder-only LM, float32.

    Returns a pytree: embed [V,D]; pos_embed [max_len,D] (learned positions only); layers: a list
    of L dicts {attn_norm, attn, mlp_norm, mlp}; final_norm (pre-LN only); head [D,V] (untied only).
    Residual output projections use std init_std / sqrt(2L) (GPT-2).
    """
    k_embed, k_pos, k_head, k_layers = jax.random.split(key, 4)
    out_std = config.init_std / math.sqrt(2 * config.num_layers)
    D = config.d_model
    params: dict = {"embed": layers._normal(k_embed, (config.vocab_size, D), config.init_std)}
    if config.position == "learned":
        params["pos_embed"] = layers._normal(k_pos, (config.max_len, D), config.init_std / 2)
    params["layers"] = [
        {
            "attn_norm": layers.init_norm(D),
            "attn": layers.init_attention(k_attn, config, out_std),
            "mlp_norm": layers.init_norm(D),
            "mlp": layers.init_mlp(k_mlp, config, out_std),
        }
        for k_attn, k_mlp in jax.random.split(k_layers, (config.num_layers, 2))
    ]
    if config.norm_position == "pre":
        params["final_norm"] = layers.init_norm(D)
    if not config.tie_embeddings:
        params["head"] = layers._normal(k_head, (D, config.vocab_size), config.init_std)
    return params


# --- shared pieces ----------------------------------------------------------------------------


def embed_inputs(params: dict, config: DecoderConfig, tokens: jax.Array, positions: jax.Array):
    """Token + position embedding: tokens, positions int [B,T] -> x [B,T,D].

    Positions of padding slots may be negative; they are clipped (their rows are never attended).
    """
    x = layers.embed(params["embed"], tokens, config.embed_scale)
    if config.position == "learned":
        x = x + jnp.take(params["pos_embed"], jnp.clip(positions, 0, config.max_len - 1), axis=0)
    elif config.position == "sinusoidal":
        x = x + layers.sinusoidal(positions, config.d_model, x.dtype)
    return x


def sublayer_in(norm: dict, config, x: jax.Array) -> jax.Array:
    """Pre-LN normalises the sublayer's input; post-LN feeds the residual stream as is."""
    return layers.layer_norm(norm, x, config.layer_norm_eps) if config.norm_position == "pre" else x


def sublayer_out(norm: dict, config, x: jax.Array, y: jax.Array) -> jax.Array:
    """Residual add; post-LN normalises the sum."""
    if config.norm_position == "pre":
        return x + y
    return layers.layer_norm(norm, x + y, config.layer_norm_eps)


def self_qkv(p: dict, config, h: jax.Array, positions: jax.Array):
    """h [B,T,D] -> q [B,T,N,H], k, v [B,T,K,H], with RoPE applied to q and k if configured."""
    q, k, v = layers.project_qkv(p, h, config.num_heads, config.kv_heads)
    if config.position == "rope":
        q = layers.rope(q, positions, config.rope_base)
        k = layers.rope(k, positions, config.rope_base)
    return q, k, v


def mlp_sublayer(p: dict, config, x: jax.Array, drop=lambda y: y) -> jax.Array:
    h = sublayer_in(p["mlp_norm"], config, x)
    return sublayer_out(p["mlp_norm"], config, x, drop(layers.mlp(p["mlp"], h, config.activation)))


def output_logits(params: dict, config, x: jax.Array) -> jax.Array:
    """x [B,T,D] -> logits [B,T,V] in float32 (final norm for pre-LN; tied or separate head)."""
    if "final_norm" in params:
        x = layers.layer_norm(params["final_norm"], x, config.layer_norm_eps)
    if config.tie_embeddings:
        logits = jnp.einsum("BTD,VD->BTV", x, params["embed"].astype(x.dtype))
    else:
        logits = jnp.einsum("BTD,DV->BTV", x, params["head"].astype(x.dtype))
    if "logits_bias" in params:
        logits = logits + params["logits_bias"][None, None, :]
    return logits.astype(jnp.float32)


def _dropper(rate: float, rng: jax.Array | None):
    """A function drop(y, site) applying dropout with a per-site key folded from rng."""
    if rate == 0.0 or rng is None:
        return lambda y, site: y
    return lambda y, site: layers.dropout(y, rate, jax.random.fold_in(rng, site))


def cross_sublayer(p: dict, config, x: jax.Array, cross: CrossKV, layer: int, drop=lambda y: y,
                   zero_unseen_values: bool = True):
    """Cross-attention: Q from the decoder stream x [B,T,D], K/V precomputed from the encoder."""
    h = sublayer_in(p["cross_norm"], config, x)
    q = layers.project_q(p["cross"], h, config.num_heads)
    o = attend(q, cross.k[layer], cross.v[layer], cross.mask()[:, None, :], heads_first=True,
               zero_unseen_values=zero_unseen_values)
    return sublayer_out(p["cross_norm"], config, x, drop(layers.project_out(p["cross"], o)))


def run_layers(params: dict, config, x, positions, mask, dropout_rate=0.0, rng=None, cross=None):
    """All blocks over a full sequence; returns x [B,T,D] and each layer's (k, v) [B,T,K,H].

    mask: bool broadcastable to [B, T, T]. cross: CrossKV for encoder-decoder blocks, which run
    cross-attention between self-attention and the MLP.
    """
    drop = _dropper(dropout_rate, rng)
    kvs = []
    for i, p in enumerate(params["layers"]):
        h = sublayer_in(p["attn_norm"], config, x)
        q, k, v = self_qkv(p["attn"], config, h, positions)
        o = layers.project_out(p["attn"], attend(q, k, v, mask))
        x = sublayer_out(p["attn_norm"], config, x, drop(o, 3 * i + 1))
        if cross is not None:
            x = cross_sublayer(p, config, x, cross, i, lambda y, s=3 * i + 2: drop(y, s))
        x = mlp_sublayer(p, config, x, lambda y, s=3 * i + 3: drop(y, s))
        kvs.append((k, v))
    return x, kvs


# --- forward (teacher forcing) ----------------------------------------------------------------


def decoder_logits(params, config, tokens, lengths, dropout_rate=0.0, rng=None, cross=None):
    """Traceable forward pass without host checks: tokens [B,T], lengths [B] -> logits [B,T,V].

    cross: the encoder's cross-attention K/V, for the encoder-decoder's decoder.
    """
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    x = embed_inputs(params, config, tokens, positions)
    x = _dropper(dropout_rate, rng)(x, 0)
    mask = decoder_self_mask(lengths, T)
    x, _ = run_layers(params, config, x, positions, mask, dropout_rate, rng, cross=cross)
    return output_logits(params, config, x)


# --- cached decoding --------------------------------------------------------------------------


def aligned_positions(starts: jax.Array, width: int) -> jax.Array:
    """Positions of right-aligned slots: slot s of example b is at s - starts[b]; int32 [B, W]."""
    return (jnp.arange(width)[None, :] - starts[:, None]).astype(jnp.int32)


def aligned_self_mask(starts: jax.Array, width: int) -> jax.Array:
    """Causal mask over right-aligned slots that hides each example's left padding: [B, W, W]."""
    valid_keys = key_range_mask(starts, jnp.full_like(starts, width), width)  # [B, W]
    return combine_masks(causal_mask(width)[None], valid_keys[:, None, :])


def prefill(params: dict, config: DecoderConfig, tokens: jax.Array, starts: jax.Array, capacity: int,
            cross: CrossKV | None = None):
    """One forward pass over right-aligned prompts, writing their K/V into a new cache.

    Args:
      tokens: int32 [B, W], example b's prompt in slots starts[b] .. W - 1 (left-padded).
      starts: int32 [B].
      capacity: S >= W, cache slots.
      cross: the encoder's cross-attention K/V (encoder-decoder only).

    Returns:
      logits float32 [B, V] at slot W - 1 (every prompt's last token), and the KVCache (end = W).
    """
    B, W = tokens.shape
    positions = aligned_positions(starts, W)
    x = embed_inputs(params, config, tokens, positions)
    x, kvs = run_layers(params, config, x, positions, aligned_self_mask(starts, W), cross=cross)
    dtype = kvs[0][0].dtype
    cache = kv_cache.init_cache(config.num_layers, B, capacity, config.kv_heads, config.head_dim, dtype)
    for i, (k, v) in enumerate(kvs):
        cache = kv_cache.write(cache, i, k, v)
    cache = kv_cache.advance(cache.replace(starts=starts.astype(jnp.int32)), W)
    # Only the last position's logits are needed to sample the first new token.
    return output_logits(params, config, x[:, -1:])[:, 0], cache


def decode_step(params: dict, config: DecoderConfig, cache, tokens: jax.Array, positions: jax.Array,
                cross: CrossKV | None = None):
    """One cached step: tokens, positions int32 [B] -> logits float32 [B, V], updated cache.

    Computes only the new query row; its K/V go to slot cache.end, then it attends to slots
    starts[b] .. end of the cache (and, with cross, to the encoder's precomputed K/V).
    """
    x = embed_inputs(params, config, tokens[:, None], positions[:, None])  # [B, 1, D]
    mask = kv_cache.query_mask(cache, 1)  # [B, 1, S]
    for i, p in enumerate(params["layers"]):
        h = sublayer_in(p["attn_norm"], config, x)
        q, k, v = self_qkv(p["attn"], config, h, positions[:, None])
        cache = kv_cache.write(cache, i, k, v)
        # Unseen cache slots hold zeros or the prefill's K/V of left padding, finite by
        # construction: skip attend's per-step zeroing pass over the whole cache.
        o = attend(q, cache.k[i], cache.v[i], mask, heads_first=True, zero_unseen_values=False)
        x = sublayer_out(p["attn_norm"], config, x, layers.project_out(p["attn"], o))
        if cross is not None:
            x = cross_sublayer(p, config, x, cross, i, zero_unseen_values=False)
        x = mlp_sublayer(p, config, x)
    return output_logits(params, config, x)[:, 0], kv_cache.advance(cache, 1)


# --- uncached baseline ------------------------------------------------------------------------


@flax.struct.dataclass
class TokenBuffer:
    """The uncached baseline's state: every token so far, right-aligned like the KV cache.

    tokens int32 [B, S]; starts int32 [B]; end int32 [] (next slot to fill).
    """

    tokens: jax.Array
    starts: jax.Array
    end: jax.Array


def _full_logits_at(params, config, buf: TokenBuffer, slot, cross=None) -> jax.Array:
    """Recomputes the whole buffer [B, S] and returns the logits at `slot`: [B, V]."""
    S = buf.tokens.shape[1]
    positions = aligned_positions(buf.starts, S)
    x = embed_inputs(params, config, buf.tokens, positions)
    x, _ = run_layers(params, config, x, positions, aligned_self_mask(buf.starts, S), cross=cross)
    x = jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=1)
    return output_logits(params, config, x)[:, 0]


def prefill_uncached(params, config, tokens: jax.Array, starts: jax.Array, capacity: int, cross=None):
    """Like `prefill`, but the state is the token buffer and logits come from a full recompute."""
    B, W = tokens.shape
    buf = TokenBuffer(
        tokens=jnp.zeros((B, capacity), jnp.int32).at[:, :W].set(tokens),
        starts=starts.astype(jnp.int32),
        end=jnp.asarray(W, jnp.int32),
    )
    return _full_logits_at(params, config, buf, W - 1, cross), buf


def recompute_step(params, config, buf: TokenBuffer, tokens: jax.Array, positions: jax.Array, cross=None):
    """The waste the cache removes: append tokens [B] and rerun every position of the buffer."""
    del positions  # implied by the buffer's layout
    new = jax.lax.dynamic_update_slice(buf.tokens, tokens[:, None].astype(jnp.int32), (0, buf.end))
    buf = buf.replace(tokens=new)
    return _full_logits_at(params, config, buf, buf.end, cross), buf.replace(end=buf.end + 1)

