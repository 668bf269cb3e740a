"""Building blocks shared by every model: embeddings, positions, norms, MLP, attention projections.

Parameters are plain dicts of arrays (an explicit pytree). Each `init_*` returns one; each apply
function is pure. Shape letters follow shared/DESIGN.md.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxdec.config import DecoderConfig

# --- init -------------------------------------------------------------------------------------


def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(key, shape, jnp.float32)


def init_norm(d_model: int) -> dict:
    """LayerNorm params: scale ones [D], bias zeros [D]."""
    return {"scale": jnp.ones((d_model,), jnp.float32), "bias": jnp.zeros((d_model,), jnp.float32)}


def init_attention(key: jax.Array, config: DecoderConfig, out_std: float) -> dict:
    """Q/K/V/O projections: wq [D,N,H], wk/wv [D,K,H], wo [N,H,D] (+ biases if use_bias)."""
    D, N, K, H = config.d_model, config.num_heads, config.kv_heads, config.head_dim
    kq, kk, kv, ko = jax.random.split(key, 4)
    p = {
        "wq": _normal(kq, (D, N, H), config.init_std),
        "wk": _normal(kk, (D, K, H), config.init_std),
        "wv": _normal(kv, (D, K, H), config.init_std),
        "wo": _normal(ko, (N, H, D), out_std),
    }
    if config.use_bias:
        p |= {
            "bq": jnp.zeros((N, H), jnp.float32),
            "bk": jnp.zeros((K, H), jnp.float32),
            "bv": jnp.zeros((K, H), jnp.float32),
            "bo": jnp.zeros((D,), jnp.float32),
        }
    return p


def init_mlp(key: jax.Array, config: DecoderConfig, out_std: float) -> dict:
    """MLP: w_in [D,F], w_out [F,D] (+ biases if use_bias)."""
    D, F = config.d_model, config.ff_dim
    k_in, k_out = jax.random.split(key)
    p = {"w_in": _normal(k_in, (D, F), config.init_std), "w_out": _normal(k_out, (F, D), out_std)}
    if config.use_bias:
        p |= {"b_in": jnp.zeros((F,), jnp.float32), "b_out": jnp.zeros((D,), jnp.float32)}
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
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, D/2]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1).astype(dtype)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding, rotate-half convention (GPT-NeoX, Llama).

    x [B,T,N,H], positions int [B,T] -> [B,T,N,H]. Channel pair (i, i + H/2) is rotated by
    position * base^(-2i/H).
    """
    H = x.shape[-1]
    freqs = base ** (-jnp.arange(0, H, 2, dtype=jnp.float32) / H)  # [H/2]
    angles = positions.astype(jnp.float32)[..., None, None] * freqs  # [B, T, 1, H/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# --- norms, MLP, dropout ----------------------------------------------------------------------


def layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32; x [..., D] -> [..., D]."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"] + p["bias"]).astype(x.dtype)


def activation(name: str, x: jax.Array) -> jax.Array:
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.relu(x)


def mlp(p: dict, x: jax.Array, act: str) -> jax.Array:
    """Position-wise MLP: x [B,T,D] -> [B,T,D] through F hidden units."""
    h = jnp.einsum("BTD,DF->BTF", x, p["w_in"])
    if "b_in" in p:
        h = h + p["b_in"]
    h = activation(act, h)
    out = jnp.einsum("BTF,FD->BTD", h, p["w_out"])
    return out + p["b_out"] if "b_out" in p else out


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when rate is 0 or key is None (evaluation)."""
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


# --- attention projections --------------------------------------------------------------------


def project_q(p: dict, x: jax.Array) -> jax.Array:
    """x [B,T,D] -> q [B,T,N,H]."""
    q = jnp.einsum("BTD,DNH->BTNH", x, p["wq"])
    return q + p["bq"] if "bq" in p else q


def project_kv(p: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B,S,D] -> k, v [B,S,K,H]."""
    k = jnp.einsum("BSD,DKH->BSKH", x, p["wk"])
    v = jnp.einsum("BSD,DKH->BSKH", x, p["wv"])
    if "bk" in p:
        k, v = k + p["bk"], v + p["bv"]
    return k, v


def project_out(p: dict, out: jax.Array) -> jax.Array:
    """Attention output [B,T,N,H] -> [B,T,D]."""
    y = jnp.einsum("BTNH,NHD->BTD", out, p["wo"])
    return y + p["bo"] if "bo" in p else y
