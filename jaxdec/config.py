"""Frozen, hashable model configs: static arguments to `jax.jit`, validated on construction."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxdec import checks

Position = Literal["learned", "sinusoidal", "rope"]
NormPosition = Literal["pre", "post"]
Activation = Literal["gelu", "gelu_tanh", "relu", "silu"]

_POSITIONS = ("learned", "sinusoidal", "rope")
_NORM_POSITIONS = ("pre", "post")
_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


def _check_positive(cfg, name: str) -> None:
    """cfg.name must be an int >= 1 (`checks.positive_int`); a numpy integer is stored as a
    Python int, so configs print, hash and serialise the same whatever the caller passed."""
    object.__setattr__(cfg, name, checks.positive_int(name, getattr(cfg, name)))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _validate_common(cfg, layer_fields: tuple[str, ...]) -> None:
    """Checks shared by the model configs; raises ValueError naming the bad field."""
    for name in ("vocab_size", *layer_fields, "d_model", "num_heads", "max_len"):
        _check_positive(cfg, name)
    if cfg.num_kv_heads is not None:
        _check_positive(cfg, "num_kv_heads")
    if cfg.d_ff is not None:
        _check_positive(cfg, "d_ff")
    if cfg.d_model % cfg.num_heads:
        raise ValueError(
            f"d_model % num_heads must be 0, got d_model={cfg.d_model}, num_heads={cfg.num_heads}"
        )
    if cfg.num_heads % cfg.kv_heads:
        raise ValueError(
            f"num_heads % num_kv_heads must be 0, got num_heads={cfg.num_heads}, "
            f"num_kv_heads={cfg.num_kv_heads}"
        )
    _check_choice("position", cfg.position, _POSITIONS)
    _check_choice("norm_position", cfg.norm_position, _NORM_POSITIONS)
    _check_choice("activation", cfg.activation, _ACTIVATIONS)
    if cfg.position == "rope" and cfg.head_dim % 2:
        raise ValueError(f"rope needs an even head dim, got {cfg.head_dim}")
    if cfg.position == "sinusoidal" and cfg.d_model % 2:
        raise ValueError(f"sinusoidal positions need an even d_model, got {cfg.d_model}")
    if not cfg.layer_norm_eps > 0:
        raise ValueError(f"layer_norm_eps must be > 0, got {cfg.layer_norm_eps}")


class _HeadsMixin:
    """Derived sizes shared by the model configs."""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def ff_dim(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff


@dataclasses.dataclass(frozen=True)
class DecoderConfig(_HeadsMixin):
    """A decoder-only Transformer LM.

    The defaults are GPT-2's choices (pre-LN, learned positions, tanh-GELU, biases, tied head,
    LayerNorm eps 1e-5), so `DecoderConfig(50257, 12, 768, 12, 1024)` is GPT-2 small.

    Attributes:
      vocab_size: V, number of token ids.
      num_layers: L.
      d_model: D.
      num_heads: N, query heads; D must divide by N (head dim H = D // N).
      max_len: the longest sequence (positions 0 .. max_len - 1) the model accepts.
      num_kv_heads: K, key/value heads (grouped-query attention); None means K = N.
      d_ff: F, MLP hidden width; None means 4 * D.
      position: "learned" (GPT-2), "sinusoidal" (original Transformer) or "rope".
      norm_position: "pre" (LayerNorm before each sublayer, plus a final norm) or "post" (after
        each residual add, as in the original Transformer; no final norm).
      activation: "gelu" (exact erf), "gelu_tanh" (GPT-2's approximation), "relu" or "silu".
      use_bias: biases in attention projections and the MLP.
      tie_embeddings: output head is the transposed token embedding.
      layer_norm_eps: epsilon inside LayerNorm.
      rope_base: RoPE frequency base.
      embed_scale: multiply token embeddings by sqrt(D) (original Transformer, Marian).
      init_std: standard deviation of the normal weight init.
    """

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    max_len: int
    num_kv_heads: int | None = None
    d_ff: int | None = None
    position: Position = "learned"
    norm_position: NormPosition = "pre"
    activation: Activation = "gelu_tanh"
    use_bias: bool = True
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    rope_base: float = 10000.0
    embed_scale: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        _validate_common(self, ("num_layers",))


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig(_HeadsMixin):
    """An encoder-decoder Transformer.

    The defaults are the original Transformer's choices (post-LN, ReLU, sinusoidal positions,
    embeddings scaled by sqrt(D) and shared by encoder, decoder and output head). Marian (opus-mt)
    is `activation="silu", logits_bias=True` with the other defaults; a modern model is
    `norm_position="pre", activation="gelu", embed_scale=False`.

    Attributes:
      vocab_size, d_model, num_heads, max_len, num_kv_heads, d_ff, position, norm_position,
        activation, use_bias, layer_norm_eps, rope_base, embed_scale, init_std: as DecoderConfig;
        max_len bounds both the source and the target length.
      num_encoder_layers, num_decoder_layers: layer counts.
      share_embeddings: one token embedding for encoder and decoder.
      tie_embeddings: the output head is the transposed decoder embedding.
      logits_bias: a learned bias on the output logits (Marian's final_logits_bias).
    """

    vocab_size: int
    num_encoder_layers: int
    num_decoder_layers: int
    d_model: int
    num_heads: int
    max_len: int
    num_kv_heads: int | None = None
    d_ff: int | None = None
    position: Position = "sinusoidal"
    norm_position: NormPosition = "post"
    activation: Activation = "relu"
    use_bias: bool = True
    share_embeddings: bool = True
    tie_embeddings: bool = True
    logits_bias: bool = False
    layer_norm_eps: float = 1e-5
    rope_base: float = 10000.0
    embed_scale: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        _validate_common(self, ("num_encoder_layers", "num_decoder_layers"))

    @property
    def num_layers(self) -> int:
        """Decoder layers: the depth of the self-attention KV cache."""
        return self.num_decoder_layers


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; static under `jit` (frozen, hashable).

    Attributes:
      learning_rate: peak learning rate of the warmup + cosine schedule.
      warmup_steps: linear warmup from 0 over this many optimizer updates.
      decay_steps: total updates of the schedule (warmup included); the rate then stays at
        learning_rate * end_lr_fraction.
      end_lr_fraction: final rate as a fraction of the peak.
      b1, b2, eps: AdamW moments.
      weight_decay: decoupled weight decay, applied to matrices only (not norms or biases).
      clip_norm: global gradient-norm clipping threshold (None: no clipping).
      grad_accum_steps: micro-batches averaged per optimizer update (optax.MultiSteps).
      dropout: dropout rate on embeddings and residual branches during training.
      dtype: compute dtype, "float32" or "bfloat16"; parameters and optimizer state stay float32.
      seed: seeds parameter init, data order and dropout.
      max_consecutive_nonfinite: skipped non-finite updates tolerated in a row before the update
        is applied anyway (optax.apply_if_finite's bound).
    """

    learning_rate: float = 1e-3
    warmup_steps: int = 100
    decay_steps: int = 1000
    end_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    grad_accum_steps: int = 1
    dropout: float = 0.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    max_consecutive_nonfinite: int = 100

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps <= self.warmup_steps:
            raise ValueError(
                f"decay_steps must exceed warmup_steps, got decay_steps={self.decay_steps}, "
                f"warmup_steps={self.warmup_steps}"
            )
        _check_positive(self, "grad_accum_steps")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        _check_choice("dtype", self.dtype, ("float32", "bfloat16"))
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {self.clip_norm}")
