"""The decoder-only LM: init, forward (training), chunked prefill, extend and one decode step.

Small functions per phase share the same layers:
- `forward` (`decoder_logits`): all T positions in parallel under the causal (and padding) mask.
- `extend`: forward a chunk of C new tokens against the KV cache, writing their K/V at the
  cache's end; each row keeps its own positions. `decode_step` is extend with C = 1.
- `prefill`: the prompt in fixed-size chunks through `extend`, only as many chunks as the
  longest prompt needs, so no [B, N, P, P] score tensor is ever built.
`recompute_step` is the uncached baseline: it reruns the whole buffer every step.

The L blocks' parameters are stacked along a leading axis and run under `lax.scan`, so compile
time does not grow with depth. In the cached paths the scan carries the whole [L, B, K, S, H]
cache and updates it in place at the layer's index.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp

from jaxdec import cache as kv_cache
from jaxdec import family, layers
from jaxdec.attention import (attend, attend_cache, attend_causal, causal_mask, combine_masks, decoder_self_mask,
                              key_range_mask)
from jaxdec.cache import CrossKV, KVBuffer, KVCache
from jaxdec.config import DecoderConfig
from jaxdec.tuning import PLAIN, Tuning

# --- parameters -------------------------------------------------------------------------------


def _sublayer_norms(config, name: str) -> dict:
    """The norms of sublayer `name` ("attn", "cross", "mlp") for the config's norm placement:
    {name}_norm before it ("pre", "sandwich") or after the residual add ("post"), and
    {name}_post_norm on its output ("sandwich", "post_branch")."""
    D, kind, placement = config.d_model, config.norm, config.norm_position
    norms = {}
    if placement in ("pre", "post", "sandwich"):
        norms[f"{name}_norm"] = layers.init_norm(D, kind)
    if placement in ("sandwich", "post_branch"):
        norms[f"{name}_post_norm"] = layers.init_norm(D, kind)
    return norms


def init_block(key: jax.Array, config, out_std: float, cross: bool = False) -> dict:
    """One block's parameters: attn, (cross,) mlp and their norms (`_sublayer_norms`)."""
    k_attn, k_cross, k_mlp = jax.random.split(key, 3)
    block = _sublayer_norms(config, "attn") | {"attn": layers.init_attention(k_attn, config, out_std)}
    if cross:
        block |= _sublayer_norms(config, "cross") | {
            "cross": layers.init_attention(k_cross, config, out_std, cross=True)}
    return block | _sublayer_norms(config, "mlp") | {"mlp": layers.init_mlp(k_mlp, config, out_std)}


def init_blocks(key: jax.Array, config, num_layers: int, cross: bool = False) -> dict:
    """num_layers blocks stacked: every leaf of `init_block`'s dict gains a leading [L] axis."""
    out_std = config.init_std / math.sqrt(2 * num_layers)
    return jax.vmap(lambda k: init_block(k, config, out_std, cross))(jax.random.split(key, num_layers))


def stack_blocks(blocks: list[dict]) -> dict:
    """A list of per-layer dicts -> one dict of [L, ...] arrays (the layout every function uses)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)


def unstack_blocks(stacked: dict) -> list[dict]:
    """The inverse of `stack_blocks`: [L, ...] leaves -> a list of L per-layer dicts."""
    L = jax.tree.leaves(stacked)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(L)]


def init_decoder_params(config: DecoderConfig, key: jax.Array) -> dict:
    """Random parameters of the decoder-only LM, float32.

    Returns a pytree: embed [V,D]; pos_embed [max_len,D] (learned positions only); layers: one
    dict {attn, mlp and their norms} whose every leaf has a leading [L] axis (e.g.
    attn.qkv [L, D, (N+2K)*H]); final_norm (every placement but "post"); head [D,V] (untied
    only). Residual output projections use std init_std / sqrt(2L) (GPT-2).
    """
    k_embed, k_pos, k_head, k_layers = jax.random.split(key, 4)
    D = config.d_model
    params: dict = {"embed": layers._normal(k_embed, (config.vocab_size, D), config.init_std)}
    if config.position == "learned":
        params["pos_embed"] = layers._normal(k_pos, (config.max_len, D), config.init_std / 2)
    params["layers"] = init_blocks(k_layers, config, config.num_layers)
    if config.has_final_norm:
        params["final_norm"] = layers.init_norm(D, config.norm)
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


def apply_norm(config, p: dict, x: jax.Array) -> jax.Array:
    """The config's norm (LayerNorm, RMSNorm or Gemma's) with params p over x's last axis."""
    return layers.norm(config.norm, p, x, config.layer_norm_eps)


def sublayer_in(p: dict, name: str, config, x: jax.Array) -> jax.Array:
    """The input of block p's sublayer `name`: normalised for "pre" and "sandwich", else the
    residual stream as is."""
    return apply_norm(config, p[f"{name}_norm"], x) if f"{name}_norm" in p and config.norm_position != "post" else x


def sublayer_out(p: dict, name: str, config, x: jax.Array, y: jax.Array) -> jax.Array:
    """The residual add of sublayer `name`'s output y: normalised first for "sandwich" and
    "post_branch"; the sum normalised for "post"."""
    if f"{name}_post_norm" in p:
        y = apply_norm(config, p[f"{name}_post_norm"], y)
    if config.norm_position == "post":
        return apply_norm(config, p[f"{name}_norm"], x + y)
    return x + y


@flax.struct.dataclass
class LayerConstants:
    """What differs between layers besides their weights, as arrays with a leading [L] axis, so a
    layer scan reads row i and compiles one block whatever the mix of layer kinds.

    freqs: float32 [L, R/2] RoPE inverse frequencies (None without RoPE); rope_mult: float32
    [L], yarn's cos/sin multiplier; window: int32 [L], the sliding window (a bound no sequence
    reaches on global layers; None when no layer slides).
    """

    freqs: jax.Array | None
    rope_mult: jax.Array | None
    window: jax.Array | None

    def layer(self, i) -> "LayerConstants":
        return jax.tree.map(lambda a: a[i], self)


# The window of a global layer in a model with sliding layers: wider than any cache.
NO_WINDOW = 2**30


def layer_constants(config) -> LayerConstants:
    """Each layer's RoPE table and window (`LayerConstants`) from the config.

    With rope_local_base, sliding layers rotate with that base unscaled and global layers with
    rope_base and rope_scaling (Gemma 3); otherwise every layer uses rope_base and rope_scaling.
    """
    L = config.num_layers
    sliding = [config.is_sliding(i) for i in range(L)]
    freqs = mult = window = None
    if config.position == "rope":
        global_freqs, global_mult = layers.rope_frequencies(config.rotary_dim, config.rope_base, config.rope_scaling)
        tables, mults = [global_freqs], [global_mult]
        if config.rope_local_base is not None:
            local_freqs, local_mult = layers.rope_frequencies(config.rotary_dim, config.rope_local_base)
            tables, mults = [global_freqs, local_freqs], [global_mult, local_mult]
        kind = jnp.asarray([1 if s and len(tables) > 1 else 0 for s in sliding], jnp.int32)
        freqs = jnp.stack(tables)[kind]  # [L, R/2]
        mult = jnp.asarray(mults, jnp.float32)[kind]  # [L]
    if config.sliding_window is not None:
        window = jnp.asarray([config.sliding_window if s else NO_WINDOW for s in sliding], jnp.int32)
    return LayerConstants(freqs=freqs, rope_mult=mult, window=window)


def _qk_norm(p: dict, config, q: jax.Array, k: jax.Array):
    """qk-norm of q [B,T,N,H] and k [B,T,K,H]: per head over H, or over each whole projection."""
    if config.qk_norm == "head":
        return apply_norm(config, p["q_norm"], q), apply_norm(config, p["k_norm"], k)
    if config.qk_norm == "projection":
        flat = lambda norm, a: apply_norm(config, norm, a.reshape(*a.shape[:2], -1)).reshape(a.shape)  # noqa: E731
        return flat(p["q_norm"], q), flat(p["k_norm"], k)
    return q, k


def self_qkv(p: dict, config, h: jax.Array, positions: jax.Array, consts: LayerConstants):
    """h [B,T,D] -> q [B,T,N,H], k, v [B,T,K,H], qk-normed and rotated (RoPE) if configured.

    consts: this layer's row of `layer_constants`."""
    q, k, v = layers.project_qkv(p, h, config.num_heads, config.kv_heads)
    q, k = _qk_norm(p, config, q, k)
    if config.position == "rope":
        q = layers.rope(q, positions, freqs=consts.freqs, multiplier=consts.rope_mult)
        k = layers.rope(k, positions, freqs=consts.freqs, multiplier=consts.rope_mult)
    return q, k, v


def attention_options(config) -> dict:
    """The static keyword arguments of `attend` / `attend_cache` for the config's scores."""
    return {"scale": config.attn_scale, "softcap": config.attn_softcap}


def window_mask(window: jax.Array | None, query_slots: jax.Array, key_slots: jax.Array) -> jax.Array | None:
    """A sliding window over slots (positions within a row differ as slots do): bool, True
    where query_slots[t] - window < key_slots[s], with a leading batch axis of 1 ([1, T, S]); None
    without a window."""
    if window is None:
        return None
    return (key_slots[None, :] > query_slots[:, None] - window)[None]  # [1, T, S]


def mlp_sublayer(p: dict, config, x: jax.Array, drop=lambda y: y) -> jax.Array:
    h = sublayer_in(p, "mlp", config, x)
    return sublayer_out(p, "mlp", config, x, drop(layers.mlp(p["mlp"], h, config.activation)))


def output_logits(params: dict, config, x: jax.Array) -> jax.Array:
    """x [B,T,D] -> logits [B,T,V] in float32 (final norm, tied or separate head, soft-cap)."""
    if "final_norm" in params:
        x = apply_norm(config, params["final_norm"], x)
    if "embed_t" in params:  # the tied head's [D, V] copy (`decode_params`)
        logits = jnp.einsum("BTD,DV->BTV", x, params["embed_t"].astype(x.dtype))
    elif config.tie_embeddings:
        logits = jnp.einsum("BTD,VD->BTV", x, params["embed"].astype(x.dtype))
    else:
        logits = jnp.einsum("BTD,DV->BTV", x, params["head"].astype(x.dtype))
    if "logits_bias" in params:
        logits = logits + params["logits_bias"][None, None, :]
    return layers.softcap(logits.astype(jnp.float32), config.final_softcap)


def _dropper(rate: float, rng: jax.Array | None):
    """A function drop(y, site) applying dropout with a per-site key folded from rng."""
    if rate == 0.0 or rng is None:
        return lambda y, site: y
    return lambda y, site: layers.dropout(y, rate, layers.fold_key(rng, site))


def cross_sublayer(p: dict, config, x: jax.Array, cross_k: jax.Array, cross_v: jax.Array,
                   cross_mask: jax.Array, drop=lambda y: y, return_probs: bool = False):
    """Cross-attention: Q from the decoder stream x [B,T,D], K/V [B,K,S,H] precomputed from the
    encoder, cross_mask bool [B,S] (real source positions). With return_probs also the
    probabilities [B,N,T,S]."""
    h = sublayer_in(p, "cross", config, x)
    q = layers.project_q(p["cross"], h, config.num_heads)
    # The projected K/V of source padding are finite: no zeroing pass is needed.
    o = attend(q, cross_k, cross_v, cross_mask[:, None, :], heads_first=True,
               zero_unseen_values=False, return_probs=return_probs)
    o, probs = o if return_probs else (o, None)
    return sublayer_out(p, "cross", config, x, drop(layers.project_out(p["cross"], o))), probs


def _cross_xs(cross: CrossKV | None):
    """The per-layer scan inputs of cross-attention: (k, v) [L, B, K, S, H], or None."""
    return None if cross is None else (cross.k, cross.v)


def scan_blocks(body, carry, stacked: dict, extra_xs=None, unroll: int = 1):
    """Runs body(carry, (layer_params, layer_index, extra)) -> (carry, y) over the stacked
    blocks with `lax.scan`, `unroll` blocks per iteration: compile time stays that of a few
    blocks whatever the depth."""
    L = jax.tree.leaves(stacked)[0].shape[0]
    return jax.lax.scan(body, carry, (stacked, jnp.arange(L, dtype=jnp.int32), extra_xs),
                        unroll=min(L, unroll))


# What `jax.checkpoint` keeps of each layer for the backward pass, by `TrainConfig.remat`.
# "dots" keeps the matmuls without batch dimensions: the projections and the MLP, whose outputs
# cost O(T * D) memory and most of the FLOPs. The attention's own dots (scores and weighted
# values) have batch dimensions (B, K), so they are recomputed: their [B, N, T, T] scores are
# what grows fastest with T. `checkpoint_dots` would keep those scores too.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_block(body, remat: str = "none"):
    """The scan body `body` under `jax.checkpoint` with the `REMAT_POLICIES[remat]` policy, or
    unchanged for "none". Inside a scan of one layer per iteration, common-subexpression
    elimination cannot merge the recomputation with the forward pass, so prevent_cse is off
    (JAX's advice for scan bodies)."""
    if remat == "none":
        return body
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of ('none', {', '.join(map(repr, REMAT_POLICIES))}), got {remat!r}")
    return jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)


def causal_query_block(T: int, tuning: Tuning = PLAIN) -> int:
    """Query rows per block of a causal self-attention over T positions (`attend_causal`)."""
    return max(tuning.causal_min_rows, -(-T // tuning.causal_blocks))


def run_layers(params: dict, config, x, positions, mask, dropout_rate=0.0, rng=None, cross=None,
               return_attention: bool = False, causal: bool = False, tuning: Tuning = PLAIN,
               remat: str = "none"):
    """All blocks over a full sequence: x [B,T,D] -> x [B,T,D], attention.

    mask: bool broadcastable to [B, T, T]. causal: the mask hides every later key (decoder
    self-attention), so the attention skips the masked upper triangle (`attend_causal`). cross:
    CrossKV for encoder-decoder blocks, which run cross-attention between self-attention and the
    MLP. With return_attention, attention is {"self": float32 [L, B, N, T, T], "cross": float32
    [L, B, N, T, S] or None} (from one pass over the whole square); else None. tuning: the
    causal query blocks and the layer unroll. remat: what each block keeps for the backward pass
    (`remat_block`); the values are the same whatever it is.
    """
    drop = _dropper(dropout_rate, rng)
    cross_mask = None if cross is None else cross.mask()
    T = x.shape[1]
    options = attention_options(config)
    if causal and not return_attention:
        self_attend = functools.partial(attend_causal, query_block=causal_query_block(T, tuning), **options)
    else:
        self_attend = functools.partial(attend, return_probs=return_attention, **options)
    consts = layer_constants(config)
    slots = jnp.arange(T, dtype=jnp.int32)

    def block(x, xs):
        p, i, cross_kv = xs
        c = consts.layer(i)
        h = sublayer_in(p, "attn", config, x)
        q, k, v = self_qkv(p["attn"], config, h, positions, c)
        o = self_attend(q, k, v, combine_masks(mask, window_mask(c.window, slots, slots)))
        o, self_probs = o if return_attention else (o, None)
        x = sublayer_out(p, "attn", config, x, drop(layers.project_out(p["attn"], o), 3 * i + 1))
        cross_probs = None
        if cross_kv is not None:
            x, cross_probs = cross_sublayer(p, config, x, *cross_kv, cross_mask,
                                            lambda y: drop(y, 3 * i + 2), return_attention)
        x = mlp_sublayer(p, config, x, lambda y: drop(y, 3 * i + 3))
        return x, ({"self": self_probs, "cross": cross_probs} if return_attention else None)

    # Under remat the scan runs one layer per iteration: layers unrolled into one loop body let
    # XLA schedule the recomputation with the forward pass, and the memory saving is lost
    # (`python -m jaxdec.tools.bench memory` measures it).
    return scan_blocks(remat_block(block, remat), x, params["layers"], _cross_xs(cross),
                       unroll=tuning.layer_unroll if remat == "none" else 1)


# --- forward (teacher forcing) ----------------------------------------------------------------


def decoder_logits(params, config, tokens, lengths, dropout_rate=0.0, rng=None, cross=None,
                   return_attention: bool = False, tuning: Tuning = PLAIN, segment_ids=None,
                   remat: str = "none"):
    """Traceable forward pass without host checks: tokens [B,T], lengths [B] -> logits [B,T,V].

    cross: the encoder's cross-attention K/V, for the encoder-decoder's decoder. With
    return_attention, returns (logits, {"self": float32 [L,B,N,T,T], "cross": float32
    [L,B,N,T,S] or None}), the probabilities this very pass used. segment_ids: int [B, T],
    packed documents (runs of equal ids; 0 marks padding): each token attends only within its
    document (`layers.segment_mask`) and positions restart at each (`layers.segment_positions`),
    so a document's logits are those it has alone. remat: `remat_block`'s choice for training.
    """
    B, T = tokens.shape
    mask = decoder_self_mask(lengths, T)
    if segment_ids is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    else:
        positions = layers.segment_positions(segment_ids)
        mask = combine_masks(mask, layers.segment_mask(segment_ids))
    x = embed_inputs(params, config, tokens, positions)
    x = _dropper(dropout_rate, rng)(x, 0)
    x, attention = run_layers(params, config, x, positions, mask, dropout_rate, rng, cross=cross,
                              return_attention=return_attention, causal=True, tuning=tuning,
                              remat=remat)
    logits = output_logits(params, config, x)
    return (logits, attention) if return_attention else logits


# --- cached decoding --------------------------------------------------------------------------


def aligned_positions(starts: jax.Array, width: int) -> jax.Array:
    """Positions of right-aligned slots: slot s of example b is at s - starts[b]; int32 [B, width]."""
    return (jnp.arange(width, dtype=jnp.int32)[None, :] - starts[:, None]).astype(jnp.int32)


def aligned_self_mask(starts: jax.Array, width: int) -> jax.Array:
    """Causal mask over right-aligned slots that hides each example's left padding: [B, width, width]."""
    valid_keys = key_range_mask(starts, jnp.full_like(starts, width), width)  # [B, width]
    return combine_masks(causal_mask(width)[None], valid_keys[:, None, :])


def right_align(prompts: jax.Array, lengths: jax.Array, width: jax.Array | int):
    """Moves right-padded prompts [B, P] so that every one ends at slot `width` (<= P; may be
    traced): example b's tokens land in slots width - lengths[b] .. width - 1; every other
    slot holds token 0. Returns tokens int32 [B, P] and starts int32 [B]."""
    starts = (width - lengths).astype(jnp.int32)
    return kv_cache.place_rows(prompts, lengths, starts, prompts.shape[1]), starts


def _extend_hidden(params: dict, config, cache: KVCache, tokens: jax.Array, cross=None,
                   tuning: Tuning = PLAIN):
    """The layers of `extend`: tokens int32 [B, C] -> final hidden states [B, C, D], new cache."""
    C = tokens.shape[1]
    positions = (jnp.reshape(cache.end, (-1, 1)) + jnp.arange(C, dtype=jnp.int32)[None, :]
                 - cache.starts[:, None]).astype(jnp.int32)  # [B, C]
    x = embed_inputs(params, config, tokens, positions)  # [B, C, D]
    cross_mask = None if cross is None else cross.mask()
    consts = layer_constants(config)
    options = attention_options(config)

    def block(carry, xs):
        x, k_all, v_all = carry
        p, i, cross_kv = xs
        c = consts.layer(i)
        h = sublayer_in(p, "attn", config, x)
        q, k, v = self_qkv(p["attn"], config, h, positions, c)
        k_all, v_all = kv_cache.write_layer(k_all, v_all, i, cache.end, k, v)
        o = attend_cache(q, k_all, v_all, cache.starts, cache.end, layer=i, block_size=tuning.cache_block,
                         window=c.window, sum_chunk=tuning.sum_chunk, **options)
        x = sublayer_out(p, "attn", config, x, layers.project_out(p["attn"], o))
        if cross_kv is not None:
            x, _ = cross_sublayer(p, config, x, *cross_kv, cross_mask)
        return (mlp_sublayer(p, config, x), k_all, v_all), None

    carry = (x, cache.k, cache.v)
    if isinstance(params["layers"], (list, tuple)):  # per-layer weights (`decode_params`)
        cross_xs = _cross_xs(cross)
        for i, p in enumerate(params["layers"]):
            extra = None if cross_xs is None else jax.tree.map(lambda a, i=i: a[i], cross_xs)
            carry, _ = block(carry, (p, i, extra))
    else:
        carry, _ = scan_blocks(block, carry, params["layers"], _cross_xs(cross))
    x, k_all, v_all = carry
    return x, kv_cache.advance(cache.replace(k=k_all, v=v_all), C)


def decode_params(params: dict, config, batch: int, tuning: Tuning = PLAIN) -> dict:
    """params laid out for a loop of cached steps over `batch` rows: "layers" as a list of L
    per-layer dicts when L <= tuning.split_layers_max (deeper models scan the stacked layers),
    and, with tuning.tied_head_copy, for a tied head with batch > 1, "embed_t": the embedding's
    [D, V] transposed copy. Params laid out already are taken as they are (and lose "embed_t"
    for batch 1). The plain tuning leaves params unchanged.

    Inside a loop, reading layer i of a stacked [L, ...] weight copies it first on CPU (a
    dynamic slice is its own kernel; the matmul does not read through it), so every step read
    the weights twice and wrote them once. Split once before the loop, each step's matmuls read
    the weights in place; the cost is one copy of the layer weights while the loop runs, and a
    step program that grows with depth (hence the bound).

    The tied head multiplies a few rows by the [V, D] embedding contracted on its minor axis.
    On CPU that matmul runs slower than the same one against a [D, V] weight for 2 to 16 rows
    (`python -m jaxdec.tools.bench gpt2`, batch 8), so the loop reads a copy made once per call. One
    row (a matrix-vector product) reads [V, D] as fast, and keeps it without the copy.
    """
    out = dict(params)
    stacked = not isinstance(params["layers"], list)
    if stacked and jax.tree.leaves(params["layers"])[0].shape[0] <= tuning.split_layers_max:
        out["layers"] = unstack_blocks(params["layers"])
    if config.tie_embeddings and batch > 1 and tuning.tied_head_copy:
        if "embed_t" not in params:  # params laid out already (`decode.decode_params`) keep theirs
            out["embed_t"] = params["embed"].T  # [D, V]; loop-invariant, so computed once before the loop
    else:
        out.pop("embed_t", None)
    return out


def extend(params: dict, config: DecoderConfig, cache: KVCache, tokens: jax.Array,
           cross: CrossKV | None = None, tuning: Tuning = PLAIN):
    """Forwards a chunk of C new tokens per row against the cache: the primitive under prefill,
    the decode step and (later) speculative verification.

    Row b's tokens go to slots end .. end + C - 1, at positions end - starts[b] + t (each row
    at its own offset); token t attends to the row's cached keys and to new tokens 0 .. t.
    Attention reads only the filled blocks of the cache.

    Args:
      cache: a KVCache with end + C <= capacity (checked on the host by the callers: a write
        past the end would be clamped onto the last slots).
      tokens: int32 [B, C].
      cross: the encoder's cross-attention K/V (encoder-decoder only).

    Returns:
      logits float32 [B, C, V] and the cache with end advanced by C.
    """
    x, cache = _extend_hidden(params, config, cache, tokens, cross, tuning)
    return output_logits(params, config, x), cache


def prefill(params: dict, config: DecoderConfig, tokens: jax.Array, lengths: jax.Array, capacity: int,
            cross: CrossKV | None = None, tuning: Tuning = PLAIN, buffer: KVBuffer | None = None):
    """Writes right-padded prompts into a new cache, in chunks of `chunk_size` tokens.

    The prompts are right-aligned against the longest one (P' = max(lengths)), and only the
    ceil(P' / chunk) chunks that hold prompt tokens are run, each attending to the cache so
    far: cost and peak memory follow the real prompt lengths, not P or the capacity, and no
    [B, N, P, P] score tensor is built. Equal to one pass over the whole prompt up to rounding.

    Args:
      tokens: int32 [B, P], example b's prompt in columns 0 .. lengths[b] - 1.
      lengths: int32 [B], 1 <= lengths[b] <= P.
      capacity: S >= P, cache slots.
      cross: the encoder's cross-attention K/V (encoder-decoder only).
      tuning: the query rows per chunk (tuning.prefill_chunk) and the attention's blocks.
      buffer: storage to write the cache into instead of new zeros (`cache.KVBuffer`, shaped
        [L, B, K, capacity, H] in the params' dtype; its contents are never attended).

    Returns:
      logits float32 [B, V] after each prompt's last token, and the KVCache (starts[b] =
      P' - lengths[b], end = P').
    """
    B, P = tokens.shape
    C = min(tuning.prefill_chunk, P)
    width = jnp.max(lengths).astype(jnp.int32)
    aligned, starts = right_align(tokens, lengths, width)
    dtype = jnp.result_type(params["embed"])
    cache = kv_cache.init_cache(config.num_layers, B, capacity, config.kv_heads, config.head_dim, dtype, buffer)
    cache = cache.replace(starts=starts)

    def chunk(c, carry):
        cache, last = carry
        # The last chunk is read shifted back so that it ends inside the prompt buffer; its
        # overlap with the previous chunk recomputes (and rewrites) the same keys and values.
        s0 = jnp.minimum(c * C, P - C).astype(jnp.int32)  # the cache's end is int32 (also under x64)
        x, cache = _extend_hidden(params, config, cache.replace(end=s0),
                                  jax.lax.dynamic_slice_in_dim(aligned, s0, C, axis=1), cross, tuning)
        at = width - 1 - s0  # where the prompts' last token sits in this chunk, if it does
        row = jax.lax.dynamic_index_in_dim(x, jnp.clip(at, 0, C - 1), axis=1, keepdims=False)
        return cache, jnp.where((at >= 0) & (at < C), row, last)

    last = jnp.zeros((B, config.d_model), jnp.result_type(params["embed"]))
    cache, last = jax.lax.fori_loop(0, (width + C - 1) // C, chunk, (cache, last))
    # Only the last position's logits are needed to sample the first new token.
    return output_logits(params, config, last[:, None])[:, 0], cache.replace(end=width)


def decode_step(params: dict, config: DecoderConfig, cache: KVCache, tokens: jax.Array,
                positions: jax.Array, cross: CrossKV | None = None, tuning: Tuning = PLAIN):
    """One cached step: tokens int32 [B] -> logits float32 [B, V], updated cache.

    Computes only the new query row; its K/V go to slot cache.end, then it attends to the
    filled slots starts[b] .. end of the cache (and, with cross, to the encoder's K/V).
    positions int32 [B] are implied by the cache (end - starts) and kept for the loop's
    step-function interface.
    """
    del positions
    logits, cache = extend(params, config, cache, tokens[:, None], cross, tuning)
    return logits[:, 0], cache


# --- uncached baseline ------------------------------------------------------------------------


@flax.struct.dataclass
class TokenBuffer:
    """The uncached baseline's state: every token so far, right-aligned like the KV cache.

    tokens int32 [B, S]; starts int32 [B]; end int32 [] (next slot to fill).
    """

    tokens: jax.Array
    starts: jax.Array
    end: jax.Array


def _full_logits_at(params, config, buf: TokenBuffer, slot, cross=None, tuning: Tuning = PLAIN) -> jax.Array:
    """Recomputes the whole buffer [B, S] and returns the logits at `slot`: [B, V]."""
    S = buf.tokens.shape[1]
    positions = aligned_positions(buf.starts, S)
    x = embed_inputs(params, config, buf.tokens, positions)
    x, _ = run_layers(params, config, x, positions, aligned_self_mask(buf.starts, S), cross=cross, tuning=tuning)
    x = jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=1)
    return output_logits(params, config, x)[:, 0]


def prefill_uncached(params, config, tokens: jax.Array, lengths: jax.Array, capacity: int, cross=None,
                     tuning: Tuning = PLAIN):
    """Like `prefill`, but the state is the token buffer and logits come from a full recompute."""
    B, P = tokens.shape
    width = jnp.max(lengths).astype(jnp.int32)
    aligned, starts = right_align(tokens, lengths, width)
    buf = TokenBuffer(
        tokens=jnp.zeros((B, capacity), jnp.int32).at[:, :P].set(aligned),
        starts=starts,
        end=width,
    )
    return _full_logits_at(params, config, buf, width - 1, cross, tuning), buf


def recompute_step(params, config, buf: TokenBuffer, tokens: jax.Array, positions: jax.Array, cross=None,
                   tuning: Tuning = PLAIN):
    """The waste the cache removes: append tokens [B] and rerun every position of the buffer."""
    del positions  # implied by the buffer's layout
    new = jax.lax.dynamic_update_slice(buf.tokens, tokens[:, None].astype(jnp.int32),
                                       kv_cache.slice_start(0, buf.end))
    buf = buf.replace(tokens=new)
    return _full_logits_at(params, config, buf, buf.end, cross, tuning), buf.replace(end=buf.end + 1)


# --- the decoder-only family ------------------------------------------------------------------


def _forward(params, config: DecoderConfig, tokens, lengths, source=None, source_lengths=None,
             dropout_rate: float = 0.0, rng=None, return_attention: bool = False, tuning: Tuning = PLAIN,
             segment_ids=None, remat: str = "none"):
    del source, source_lengths  # a decoder-only model has no encoder
    return decoder_logits(params, config, tokens, lengths, dropout_rate, rng,
                          return_attention=return_attention, tuning=tuning, segment_ids=segment_ids,
                          remat=remat)


def _prefill(params, config: DecoderConfig, tokens, lengths, capacity: int, source=None,
             source_lengths=None, tuning: Tuning = PLAIN, buffer: KVBuffer | None = None):
    del source, source_lengths
    return prefill(params, config, tokens, lengths, capacity, tuning=tuning, buffer=buffer)


def _prefill_uncached(params, config: DecoderConfig, tokens, lengths, capacity: int, source=None,
                      source_lengths=None, tuning: Tuning = PLAIN):
    del source, source_lengths
    return prefill_uncached(params, config, tokens, lengths, capacity, tuning=tuning)


def select_cache_rows(cache: KVCache, rows: jax.Array, tuning: Tuning = PLAIN) -> KVCache:
    """The cache's batch rows reordered by rows int32 [R], filled blocks only."""
    return kv_cache.select_rows(cache, rows, tuning.cache_block)


def repeat_cache_rows(cache: KVCache, n: int) -> KVCache:
    """Each batch row of the cache repeated n times: B -> B * n rows (beam search's start)."""
    return cache.replace(k=jnp.repeat(cache.k, n, axis=1), v=jnp.repeat(cache.v, n, axis=1),
                         starts=jnp.repeat(cache.starts, n, axis=0))


FAMILY = family.Family(
    name="decoder-only",
    takes_source=False,
    init=init_decoder_params,
    forward=_forward,
    prefill=_prefill,
    step=decode_step,
    extend=lambda params, config, cache, tokens, tuning=PLAIN: extend(params, config, cache, tokens, tuning=tuning),
    prefill_uncached=_prefill_uncached,
    recompute_step=recompute_step,
    select_rows=select_cache_rows,
    repeat_rows=repeat_cache_rows,
    decode_params=decode_params,
)
family.register(DecoderConfig, FAMILY)
