"""Building blocks shared by every model: embeddings, positions, norms, MLP, attention projections.

Parameters are plain dicts of arrays (an explicit pytree). Each `init_*` returns one; each apply
function is pure. Shape letters follow shared/DESIGN.md.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


# --- init -------------------------------------------------------------------------------------


def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(key, shape, jnp.float32)


def init_norm(d_model: int, kind: str = "layer") -> dict:
    """A norm's params at its identity: LayerNorm scale ones [D] and bias zeros [D]; RMSNorm
    scale ones [D]; Gemma's (1 + w) RMSNorm scale zeros [D]."""
    if kind == "layer":
        return {"scale": jnp.ones((d_model,), jnp.float32), "bias": jnp.zeros((d_model,), jnp.float32)}
    fill = jnp.zeros if kind == "rms_plus_one" else jnp.ones
    return {"scale": fill((d_model,), jnp.float32)}


def init_attention(key: jax.Array, config, out_std: float, cross: bool = False) -> dict:
    """Attention projections as 2-D matrices (one matmul each, no per-step weight transposes).

    Self-attention fuses Q, K and V into qkv [D, (N + 2K) * H] (GPT-2's c_attn layout): one
    matmul per step instead of three. Cross-attention keeps q [D, N*H] and kv [D, 2K*H] apart,
    since K/V come from the encoder. out [N*H, D]. Biases have the output width (qkv_bias /
    q_bias, kv_bias with config.has_qkv_bias; out_bias with has_out_bias). qk-norm adds q_norm
    and k_norm: scale [H] ("head") or [N*H] and [K*H] ("projection").
    """
    D, N, K, H = config.d_model, config.num_heads, config.kv_heads, config.head_dim
    k_in, k_kv, k_out = jax.random.split(key, 3)
    if cross:
        p = {"q": _normal(k_in, (D, N * H), config.init_std),
             "kv": _normal(k_kv, (D, 2 * K * H), config.init_std)}
    else:
        p = {"qkv": _normal(k_in, (D, (N + 2 * K) * H), config.init_std)}
    if config.has_qkv_bias:
        p |= {f"{name}_bias": jnp.zeros(w.shape[1:], jnp.float32) for name, w in p.items()}
    p["out"] = _normal(k_out, (N * H, D), out_std)
    if config.has_out_bias:
        p["out_bias"] = jnp.zeros((D,), jnp.float32)
    if config.qk_norm != "none":
        q_width, k_width = (H, H) if config.qk_norm == "head" else (N * H, K * H)
        p |= {"q_norm": init_norm(q_width, config.norm), "k_norm": init_norm(k_width, config.norm)}
    return p


def init_mlp(key: jax.Array, config, out_std: float) -> dict:
    """MLP: w_in [D,F], w_out [F,D]; gated adds w_gate [D,F]; biases b_in (b_gate) [F], b_out [D]
    with config.has_mlp_bias."""
    D, F = config.d_model, config.ff_dim
    k_in, k_out = jax.random.split(key)
    p = {"w_in": _normal(k_in, (D, F), config.init_std), "w_out": _normal(k_out, (F, D), out_std)}
    if config.mlp == "gated":  # its own key folded in, so a plain MLP's init stays as it was
        p["w_gate"] = _normal(jax.random.fold_in(key, 1), (D, F), config.init_std)
    if config.has_mlp_bias:
        p |= {"b_in": jnp.zeros((F,), jnp.float32), "b_out": jnp.zeros((D,), jnp.float32)}
        if config.mlp == "gated":
            p["b_gate"] = jnp.zeros((F,), jnp.float32)
    return p


# --- embeddings and positions -----------------------------------------------------------------


def embed(table: jax.Array, tokens: jax.Array, scale: bool) -> jax.Array:
    """Token embedding lookup: table [V,D], tokens int [B,T] -> [B,T,D].

    With scale, multiplied by sqrt(D) (original Transformer, Marian).
    """
    x = jnp.take(table, tokens, axis=0)
    return x * jnp.asarray(math.sqrt(table.shape[-1]), x.dtype) if scale else x


def sinusoidal(positions: jax.Array, d_model: int, dtype=jnp.float32) -> jax.Array:
    """Sinusoidal position encodings, positions int [B,T] -> [B,T,D].

    Layout: sines in the first D/2 channels, cosines in the last D/2 (the tensor2tensor / Marian
    layout; the paper interleaves them, which is the same up to a fixed channel permutation).
    Channel i of each half has frequency 10000^(-2i/D).
    """
    half = d_model // 2
    freqs = jnp.exp(-math.log(10000.0) * 2.0 * jnp.arange(half, dtype=jnp.float32) / d_model)
    angles = positions.astype(jnp.float32)[..., None] * freqs[None, None, :]  # [B, T, D/2]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1).astype(dtype)


# --- packed documents -------------------------------------------------------------------------
# Several documents share a row, told apart by segment ids int [B, T]: 1, 2, ... per document,
# 0 for padding. A document is a run of equal ids, so an id reused later in the row starts a new
# document rather than joining the earlier one.


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """bool [B, T]: True where a document begins, at t = 0 and wherever segment_ids[t] differs
    from segment_ids[t - 1]. A document is a run of equal ids (padding, id 0, is runs too)."""
    B = segment_ids.shape[0]
    return jnp.concatenate([jnp.ones((B, 1), jnp.bool_), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 at each document: segment_ids int [B, T] -> int32 [B, T]
    (slot t minus the slot its document began at)."""
    T = segment_ids.shape[1]
    slots = jnp.arange(T, dtype=jnp.int32)[None, :]
    begun = jax.lax.cummax(jnp.where(segment_starts(segment_ids), slots, 0), axis=1)  # [B, T]
    return slots - begun


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """bool [B, T, T]: query t may see key s iff both lie in the same document (run of equal
    ids). With the causal mask this is block-diagonal causal: no token sees another document,
    and no real token sees padding (id 0 runs are documents no real token is in)."""
    document = jnp.cumsum(segment_starts(segment_ids).astype(jnp.int32), axis=1)  # [B, T], run index
    return document[:, :, None] == document[:, None, :]


def rope_frequencies(rotary_dim: int, base: float, scaling=None) -> tuple[jax.Array, float]:
    """RoPE's inverse frequencies float32 [R/2] (base^(-2i/R)) after `scaling` (a
    config.RopeScaling or None), and the cos/sin multiplier (yarn's attention factor, else 1).

    The scalings follow Hugging Face's `modeling_rope_utils` (linear, llama3, yarn). The table is
    computed on the host in float64 and rounded once to float32: a float32 power is off by a few
    ulps, and a frequency's error grows with the position it multiplies.
    """
    R = rotary_dim
    freqs = float(base) ** (-np.arange(0, R, 2, dtype=np.float64) / R)  # [R/2]
    attention_factor = 1.0
    if scaling is not None and scaling.kind == "linear":
        freqs = freqs / scaling.factor
    elif scaling is not None and scaling.kind == "llama3":
        factor, old = scaling.factor, scaling.original_max_len
        low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
        wavelen = 2 * math.pi / freqs
        scaled = np.where(wavelen > low_wavelen, freqs / factor, freqs)
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        freqs = np.where(medium, smoothed, scaled)
    elif scaling is not None:
        # yarn: interpolated (divided by factor) where a dim turns fewer than beta_slow times over
        # the original context, extrapolated (kept) where more than beta_fast, a linear ramp between.
        def correction_dim(rotations):
            return R * math.log(scaling.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
        if scaling.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, R - 1)
        high = high + 0.001 if low == high else high
        ramp = np.clip((np.arange(R // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        keep = 1.0 - ramp  # the extrapolated share of each dim
        freqs = (freqs / scaling.factor) * (1.0 - keep) + freqs * keep
        attention_factor = scaling.attention_factor
        if attention_factor is None:
            attention_factor = 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0
    return jnp.asarray(freqs.astype(np.float32)), float(attention_factor)


def rope(x: jax.Array, positions: jax.Array, freqs: jax.Array, multiplier: jax.Array | float = 1.0) -> jax.Array:
    """Rotary position embedding, rotate-half convention (GPT-NeoX, Llama).

    x [B,T,N,H], positions int [B,T] -> [B,T,N,H]. With freqs float32 [R/2] (R <= H, from
    `rope_frequencies`), channel pair (i, i + R/2) of the first R channels is rotated by
    position * freqs[i] and the last H - R channels pass through unchanged (partial rotary);
    cos and sin are times `multiplier`.
    """
    H = x.shape[-1]
    R = 2 * freqs.shape[-1]
    angles = positions.astype(jnp.float32)[..., None, None] * freqs[None, None, None, :]  # [B, T, 1, R/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if not (isinstance(multiplier, float) and multiplier == 1.0):
        cos, sin = cos * multiplier, sin * multiplier
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf[..., :R], 2, axis=-1)
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin] + ([xf[..., R:]] if R < H else [])
    return jnp.concatenate(parts, axis=-1).astype(x.dtype)


# --- norms, MLP, dropout ----------------------------------------------------------------------


def layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32; x [..., D] -> [..., D]."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    # E[x^2] - E[x]^2 (flax's fast variance): both sums in one pass over x, so XLA emits one
    # multi-output reduction instead of two dependent ones; the max() guards rounding below 0.
    var = jnp.maximum(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    # The affine part in float32 too (the params may have been cast to a bfloat16 compute dtype).
    scale = jnp.reshape(p["scale"].astype(jnp.float32), (1,) * (x.ndim - 1) + (-1,))
    bias = jnp.reshape(p["bias"].astype(jnp.float32), (1,) * (x.ndim - 1) + (-1,))
    return (y * scale + bias).astype(x.dtype)


def rms_norm(p: dict, x: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
    """RMSNorm over the last axis in float32; x [..., D] -> [..., D].

    Llama's form casts x̂ back to x's dtype before the weight; Gemma's (plus_one) multiplies by
    (1 + w) in float32 and casts last, as Hugging Face computes each.
    """
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    scale = jnp.reshape(p["scale"].astype(jnp.float32), (1,) * (x.ndim - 1) + (-1,))
    if plus_one:
        return (y * (1.0 + scale)).astype(x.dtype)
    return y.astype(x.dtype) * scale.astype(x.dtype)


def norm(kind: str, p: dict, x: jax.Array, eps: float) -> jax.Array:
    """The configured norm: "layer" (LayerNorm), "rms" or "rms_plus_one" (`rms_norm`)."""
    if kind == "layer":
        return layer_norm(p, x, eps)
    return rms_norm(p, x, eps, plus_one=kind == "rms_plus_one")


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) in float32 (Gemma 2's soft-capping of scores and logits); x unchanged
    for None."""
    return x if cap is None else cap * jnp.tanh(x.astype(jnp.float32) / cap)


def activation(name: str, x: jax.Array) -> jax.Array:
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "silu":
        return jax.nn.silu(x)
    return jax.nn.relu(x)


def mlp(p: dict, x: jax.Array, act: str) -> jax.Array:
    """Position-wise MLP: x [B,T,D] -> [B,T,D] through F hidden units; gated (a "w_gate" in p)
    as act(x W_gate) * (x W_in), the SwiGLU / GeGLU form."""
    h = dense(x, p["w_in"], p.get("b_in"))  # [B, T, F]
    if "w_gate" in p:
        h = activation(act, dense(x, p["w_gate"], p.get("b_gate"))) * h
    else:
        h = activation(act, h)
    return dense(h, p["w_out"], p.get("b_out"))


def _per_row(key: jax.Array) -> bool:
    """Whether `key` holds per-row keys [B] (typed keys [B], or raw uint32 keys [B, 2])."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    return key.ndim == (1 if typed else 2)


def fold_key(key: jax.Array, data: int) -> jax.Array:
    """`jax.random.fold_in` of one key, or of each of per-row keys [B]."""
    if not _per_row(key):
        return jax.random.fold_in(key, data)
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(key)


def split_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two independent keys from one key, or from each of per-row keys [B] (two [B] arrays)."""
    if not _per_row(key):
        a, b = jax.random.split(key)
        return a, b
    pairs = jax.vmap(jax.random.split)(key)  # [B, 2]
    return pairs[:, 0], pairs[:, 1]


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when rate is 0 or key is None (evaluation).

    key: one key for the whole x, or per-row keys [B] for x [B, ...], each row's mask drawn
    from its own key, so a row's mask does not depend on which other rows share the batch (a
    train step's row groups, `tuning.Tuning.row_groups`, draw the same masks as one group).
    """
    if rate == 0.0 or key is None:
        return x
    if not _per_row(key):
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    else:
        keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, x.shape[1:]))(key)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


# --- attention projections --------------------------------------------------------------------


def dense(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    """x [B,T,I] @ w [I,O] (+ b [O]) -> [B,T,O], computed in x's dtype.

    The rows are flattened first: a 2-D [B*T, I] x [I, O] matmul, whose weight gradient is one
    [I, B*T] x [B*T, O] dot. With a [B,T,I] einsum XLA's CPU backend contracted two axes for it
    and added layout copies (`python -m jaxdec.tools.bench train` measures the step).
    """
    B, T, I = x.shape
    y = jnp.matmul(x.reshape(B * T, I), w.astype(x.dtype)).reshape(B, T, -1)  # [B, T, O]
    return y if b is None else y + b.astype(x.dtype)[None, None, :]


def _heads(x: jax.Array, num_heads: int) -> jax.Array:
    """[B,T,n*H] -> [B,T,n,H]."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def project_qkv(p: dict, x: jax.Array, num_heads: int, kv_heads: int):
    """Self-attention: x [B,T,D] -> q [B,T,N,H], k, v [B,T,K,H] from one fused matmul."""
    qkv = dense(x, p["qkv"], p.get("qkv_bias"))
    H = qkv.shape[-1] // (num_heads + 2 * kv_heads)
    q, k, v = jnp.split(qkv, [num_heads * H, (num_heads + kv_heads) * H], axis=-1)
    return _heads(q, num_heads), _heads(k, kv_heads), _heads(v, kv_heads)


def project_q(p: dict, x: jax.Array, num_heads: int) -> jax.Array:
    """Cross-attention query: x [B,T,D] -> q [B,T,N,H]."""
    return _heads(dense(x, p["q"], p.get("q_bias")), num_heads)


def project_kv(p: dict, x: jax.Array, kv_heads: int) -> tuple[jax.Array, jax.Array]:
    """Cross-attention keys/values: x [B,S,D] -> k, v [B,S,K,H]."""
    k, v = jnp.split(dense(x, p["kv"], p.get("kv_bias")), 2, axis=-1)
    return _heads(k, kv_heads), _heads(v, kv_heads)


def project_out(p: dict, out: jax.Array) -> jax.Array:
    """Attention output [B,T,N,H] -> [B,T,D]."""
    return dense(out.reshape(*out.shape[:2], -1), p["out"], p.get("out_bias"))
