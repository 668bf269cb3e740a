"""Work counted from a config, not measured: the one FLOP model of the tools, and the bytes a
decode step reads. The benchmarks divide measured seconds by these; the explain report draws
them beside its timings.

FLOPs count the matmuls only (2 per multiply-add): the QKV and output projections, attention
scores and probs @ V over every key given (no causal discount), the MLP and the output head.
Elementwise work (norms, softmax, activations) is left out; XLA's own count of a forward pass is
within 15% above (tests/test_costs.py).
"""

from __future__ import annotations

import jax

from jaxdec.config import DecoderConfig, Seq2SeqConfig


def block_flops(config, rows: int, keys: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one self-attention block + MLP over `rows` queries
    attending to `keys` keys: QKV and output projections, scores, probs @ V, the MLP (three
    matrices when gated: gate, up and down)."""
    D, N, K, H, F = config.d_model, config.num_heads, config.kv_heads, config.head_dim, config.ff_dim
    projections = 2 * rows * D * (N + 2 * K) * H + 2 * rows * N * H * D
    attention = 2 * 2 * rows * keys * N * H
    mlp_matrices = 3 if config.mlp == "gated" else 2
    return projections + attention + mlp_matrices * 2 * rows * D * F


def decoder_flops(config, rows: int, keys: int, logit_rows: int, source_len: int = 0) -> int:
    """FLOPs of the decoder stack over `rows` query rows and `keys` self-attention keys, plus
    cross-attention to `source_len` encoder positions (encoder-decoder) and the output head on
    `logit_rows` rows."""
    D, N, H, V = config.d_model, config.num_heads, config.head_dim, config.vocab_size
    per_layer = block_flops(config, rows, keys)
    if source_len:
        per_layer += 2 * rows * D * N * H * 2 + 2 * 2 * rows * source_len * N * H  # Q, out; scores, PV
    return config.num_layers * per_layer + 2 * logit_rows * D * V


def encoder_flops(config: Seq2SeqConfig, source_len: int) -> int:
    """FLOPs of the encoder over `source_len` positions plus every decoder layer's cross K/V
    projection of its output."""
    D, K, H = config.d_model, config.kv_heads, config.head_dim
    return (config.num_encoder_layers * block_flops(config, source_len, source_len)
            + config.num_decoder_layers * 2 * source_len * D * 2 * K * H)


def train_step_flops(config: DecoderConfig, batch: int, seq: int) -> int:
    """Model FLOPs of one train step of a decoder-only model on `batch` sequences of `seq`
    tokens: forward + backward = 3x the forward pass, which computes every row against every
    key (the full, unmasked attention products) and the head on every row."""
    return 3 * batch * decoder_flops(config, seq, seq, seq)


def decode_bytes_per_step(config: DecoderConfig, params: dict, capacity: int) -> int:
    """Bytes one batch-1 cached step must read: every weight once (the tied head reads the
    whole [V, D] embedding; the lookup only one row of it and of pos_embed), plus a full KV
    cache (an upper bound: a step reads only the filled blocks)."""
    leaves = jax.tree.leaves(params.get("layers"))
    layer_bytes = sum(x.nbytes for x in leaves)
    head = params["embed"] if config.tie_embeddings else params["head"]
    kv = 2 * config.num_layers * capacity * config.kv_heads * config.head_dim * head.dtype.itemsize
    other = sum(x.nbytes for k, x in params.items() if k in ("final_norm",) for x in jax.tree.leaves(x))
    return layer_bytes + head.nbytes + other + kv
