"""Frozen, hashable model configs: static arguments to `jax.jit`, validated on construction."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxdec import checks

Position = Literal["learned", "sinusoidal", "rope"]
NormPosition = Literal["pre", "post", "sandwich", "post_branch"]
Activation = Literal["gelu", "gelu_tanh", "relu", "silu"]
Norm = Literal["layer", "rms", "rms_plus_one"]
MLP = Literal["plain", "gated"]
QKNorm = Literal["none", "head", "projection"]
RopeKind = Literal["linear", "llama3", "yarn"]
Optimizer = Literal["adamw", "lion", "adafactor", "muon"]
Remat = Literal["none", "full", "dots"]

_POSITIONS = ("learned", "sinusoidal", "rope")
_NORM_POSITIONS = ("pre", "post", "sandwich", "post_branch")
_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
_NORMS = ("layer", "rms", "rms_plus_one")
_MLPS = ("plain", "gated")
_QK_NORMS = ("none", "head", "projection")
_ROPE_KINDS = ("linear", "llama3", "yarn")
OPTIMIZERS = ("adamw", "lion", "adafactor", "muon")
REMATS = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling for contexts longer than pretraining (Hugging Face's rope types).

    Attributes:
      kind: "linear" (every frequency divided by factor), "llama3" (wavelengths longer than
        original_max_len / low_freq_factor divided by factor, shorter than original_max_len /
        high_freq_factor kept, a smooth blend between) or "yarn" (a ramp between extrapolated
        and interpolated frequencies over the correction dims of beta_fast / beta_slow
        rotations; cos and sin times attention_factor).
      factor: the context extension factor.
      original_max_len: pretraining context (llama3, yarn).
      low_freq_factor, high_freq_factor: llama3's band edges.
      beta_fast, beta_slow: yarn's correction rotations.
      attention_factor: yarn's cos/sin multiplier; None: 0.1 * ln(factor) + 1.
      truncate: yarn rounds its correction range to whole dims.
    """

    kind: RopeKind
    factor: float
    original_max_len: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        _check_choice("rope_scaling.kind", self.kind, _ROPE_KINDS)
        if not self.factor > 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.kind in ("llama3", "yarn") and self.original_max_len is None:
            raise ValueError(f"rope_scaling kind {self.kind!r} needs original_max_len")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"rope_scaling needs high_freq_factor > low_freq_factor, got "
                             f"{self.high_freq_factor} and {self.low_freq_factor}")


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
    if isinstance(cfg, _ClassicBlock) and cfg.d_model % cfg.num_heads:
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
    if cfg.position == "rope" and cfg.rotary_dim % 2:
        raise ValueError(f"rope needs an even number of rotated dims, got {cfg.rotary_dim} "
                         f"(head dim {cfg.head_dim}, rotary_fraction {cfg.rotary_fraction})")
    if cfg.position == "sinusoidal" and cfg.d_model % 2:
        raise ValueError(f"sinusoidal positions need an even d_model, got {cfg.d_model}")
    if not cfg.layer_norm_eps > 0:
        raise ValueError(f"layer_norm_eps must be > 0, got {cfg.layer_norm_eps}")


class _HeadsMixin:
    """Derived sizes shared by the model configs."""

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def ff_dim(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    @property
    def rotary_dim(self) -> int:
        """R: leading channels of each head that RoPE rotates (the rest pass through)."""
        return int(self.head_dim * self.rotary_fraction)

    @property
    def has_qkv_bias(self) -> bool:
        return self.use_bias if self.qkv_bias is None else self.qkv_bias

    @property
    def has_out_bias(self) -> bool:
        return self.use_bias if self.out_bias is None else self.out_bias

    @property
    def has_mlp_bias(self) -> bool:
        return self.use_bias if self.mlp_bias is None else self.mlp_bias

    @property
    def has_final_norm(self) -> bool:
        """Every placement but the original post-LN ends with a norm before the head."""
        return self.norm_position != "post"

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` attends within the sliding window only."""
        if self.sliding_window is None:
            return False
        return self.sliding_layers is None or layer in self.sliding_layers


def _validate_block(cfg) -> None:
    """Checks of the configurable block (DecoderConfig's fields beyond GPT-2's)."""
    _check_choice("norm", cfg.norm, _NORMS)
    _check_choice("mlp", cfg.mlp, _MLPS)
    _check_choice("qk_norm", cfg.qk_norm, _QK_NORMS)
    _check_positive(cfg, "d_model")
    _check_positive(cfg, "num_heads")
    if cfg.head_dim is None:
        if cfg.d_model % cfg.num_heads:
            raise ValueError(f"d_model % num_heads must be 0 (or give head_dim), got "
                             f"d_model={cfg.d_model}, num_heads={cfg.num_heads}")
        object.__setattr__(cfg, "head_dim", cfg.d_model // cfg.num_heads)
    else:
        _check_positive(cfg, "head_dim")
    if not 0.0 < cfg.rotary_fraction <= 1.0:
        raise ValueError(f"rotary_fraction must lie in (0, 1], got {cfg.rotary_fraction}")
    for name in ("attn_scale", "attn_softcap", "final_softcap", "rope_local_base"):
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0 or None, got {value}")
    if cfg.sliding_window is not None:
        _check_positive(cfg, "sliding_window")
    if cfg.sliding_layers is not None:
        layers = tuple(int(i) for i in cfg.sliding_layers)
        bad = [i for i in layers if not 0 <= i < cfg.num_layers]
        if bad:
            raise ValueError(f"sliding_layers {bad} are outside the layers 0 .. {cfg.num_layers - 1}")
        if cfg.sliding_window is None:
            raise ValueError("sliding_layers needs a sliding_window")
        object.__setattr__(cfg, "sliding_layers", tuple(sorted(set(layers))))
    if isinstance(cfg.rope_scaling, dict):  # as a config.json holds it
        object.__setattr__(cfg, "rope_scaling", RopeScaling(**cfg.rope_scaling))
    if cfg.rope_scaling is not None and not isinstance(cfg.rope_scaling, RopeScaling):
        raise ValueError(f"rope_scaling must be a RopeScaling or None, got {cfg.rope_scaling!r}")
    if cfg.position != "rope" and (cfg.rope_scaling is not None or cfg.rope_local_base is not None
                                   or cfg.rotary_fraction != 1.0):
        raise ValueError(f"rope_scaling, rope_local_base and rotary_fraction need position='rope', "
                         f"got position={cfg.position!r}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig(_HeadsMixin):
    """A decoder-only Transformer LM.

    The defaults are GPT-2's choices (pre-LN, learned positions, tanh-GELU, biases, tied head,
    LayerNorm eps 1e-5), so `DecoderConfig(50257, 12, 768, 12, 1024)` is GPT-2 small.

    Attributes:
      vocab_size: V, number of token ids.
      num_layers: L.
      d_model: D.
      num_heads: N, query heads.
      max_len: the longest sequence (positions 0 .. max_len - 1) the model accepts.
      num_kv_heads: K, key/value heads (grouped-query attention); None means K = N.
      d_ff: F, MLP hidden width; None means 4 * D.
      position: "learned" (GPT-2), "sinusoidal" (original Transformer) or "rope".
      norm_position: where each sublayer's norm sits, for a sublayer f and residual x:
        "pre" x + f(n(x)) (GPT-2, Llama); "post" n(x + f(x)) (the original Transformer; no
        final norm); "sandwich" x + n2(f(n1(x))) (Gemma 2 and 3); "post_branch" x + n(f(x))
        (OLMo 2). Every placement but "post" ends with a final norm.
      activation: "gelu" (exact erf), "gelu_tanh" (GPT-2's approximation), "relu" or "silu".
      use_bias: biases in attention projections and the MLP (the default of the three switches
        below).
      tie_embeddings: output head is the transposed token embedding.
      layer_norm_eps: epsilon inside every norm.
      rope_base: RoPE frequency base (of the global layers when rope_local_base is set).
      embed_scale: multiply token embeddings by sqrt(D) (original Transformer, Marian, Gemma).
      init_std: standard deviation of the normal weight init.
      head_dim: H, the width of each head; None means D // N (then D must divide by N).
      norm: "layer" (LayerNorm with bias), "rms" (RMSNorm, x̂ * w) or "rms_plus_one" (Gemma's
        RMSNorm, x̂ * (1 + w), in float32 until the end). The statistics are always float32.
      mlp: "plain" (act(x W_in) W_out) or "gated" (act(x W_gate) * (x W_in), then W_out: SwiGLU
        with silu, GeGLU with gelu_tanh).
      qkv_bias, out_bias, mlp_bias: biases of the Q/K/V projections, the attention output and
        the MLP; None follows use_bias (Qwen2: q/k/v biases only).
      qk_norm: "none", "head" (a norm over H on every query and key head, shared weights [H]:
        Qwen3, Gemma 3) or "projection" (a norm over the whole query [N*H] and key [K*H]
        projections: OLMo 2); after the projection, before RoPE.
      attn_scale: the multiplier of the attention scores; None means H ** -0.5 (Gemma 2 uses
        query_pre_attn_scalar ** -0.5).
      attn_softcap, final_softcap: soft-capping c * tanh(s / c) of the attention scores and of
        the output logits (Gemma 2); None: none.
      sliding_window: W: a sliding layer's query at position q sees keys at q - W < k <= q;
        None: no layer slides.
      sliding_layers: indices of the sliding layers; None: every layer (Mistral).
      rope_local_base: RoPE base of the sliding layers, whose RoPE is then unscaled (Gemma 3);
        None: every layer uses rope_base and rope_scaling.
      rope_scaling: RopeScaling of the frequencies (of the global layers with rope_local_base).
      rotary_fraction: the leading fraction of each head's channels that RoPE rotates.
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
    head_dim: int | None = None
    norm: Norm = "layer"
    mlp: MLP = "plain"
    qkv_bias: bool | None = None
    out_bias: bool | None = None
    mlp_bias: bool | None = None
    qk_norm: QKNorm = "none"
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] | None = None
    rope_local_base: float | None = None
    rope_scaling: RopeScaling | None = None
    rotary_fraction: float = 1.0

    def __post_init__(self) -> None:
        _validate_block(self)
        _validate_common(self, ("num_layers",))


class _ClassicBlock:
    """The encoder-decoder's blocks: LayerNorm, a plain MLP, biases per use_bias, H = D // N, no
    qk-norm, windows or soft-caps (plain class attributes, not config fields)."""

    norm = "layer"
    mlp = "plain"
    qkv_bias = out_bias = mlp_bias = None
    qk_norm = "none"
    attn_scale = attn_softcap = final_softcap = None
    sliding_window = sliding_layers = None
    rope_local_base = rope_scaling = None
    rotary_fraction = 1.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig(_ClassicBlock, _HeadsMixin):
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
        if self.norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position must be 'pre' or 'post' for the encoder-decoder, "
                             f"got {self.norm_position!r}")

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
      weight_decay: decoupled weight decay (times the scheduled learning rate), applied to weight
        matrices only: not to norms, biases or (unless decay_embeddings) embeddings.
      clip_norm: global gradient-norm clipping threshold (None: no clipping).
      grad_accum_steps: micro-batches averaged per optimizer update (optax.MultiSteps).
      dropout: dropout rate on embeddings and residual branches during training.
      dtype: compute dtype, "float32" or "bfloat16"; parameters and optimizer state stay float32.
      seed: seeds parameter init, data order and dropout.
      max_consecutive_nonfinite: skipped non-finite updates tolerated in a row before the update
        is applied anyway (optax.apply_if_finite's bound).
      optimizer: the update rule, each under the same schedule, clipping and decay mask:
        "adamw" (b1, b2, eps); "lion" (sign of the interpolated momentum, b1, b2; its authors use
        a 3-10x lower learning_rate and higher weight_decay than AdamW's); "adafactor" (factored
        second moments, optax's defaults, relative step sizes: learning_rate scales each update by
        its parameter's RMS); "muon" (Newton-Schulz-orthogonalised momentum, beta b1, on each
        layer's weight matrices, with RMS matched to AdamW's so one learning_rate serves both;
        AdamW on embeddings, head, norms and biases). `training.make_optimizer` builds it.
      decay_embeddings: also weight-decay the token and position embeddings. Norms and biases
        are never decayed; weight matrices (and an untied head) always are.
      remat: rematerialisation of each layer in the training step's backward pass: "none" (keep
        every activation the backward pass needs), "full" (keep only each layer's input and
        recompute the layer), "dots" (keep the outputs of the weight matmuls, recompute the rest,
        the attention scores included). The loss and gradients are the same; memory and time
        are not (`python -m jaxdec.tools.bench memory`).
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
    optimizer: Optimizer = "adamw"
    decay_embeddings: bool = False
    remat: Remat = "none"

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
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("remat", self.remat, REMATS)
        if not isinstance(self.decay_embeddings, bool):
            raise ValueError(f"decay_embeddings must be a bool, got {self.decay_embeddings!r}")
