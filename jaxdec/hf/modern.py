"""Llama-style Hugging Face checkpoints as a jaxdec DecoderConfig and params: `from_modern`.

One mapping covers the families transformers builds from the Llama block (`FAMILIES`): llama,
mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, olmo2 and phi3. They differ only in config
fields and in which norms a block holds; every nn.Linear weight [out, in] is transposed to
jaxdec's [in, out]. Phi-3 fuses the projections: self_attn.qkv_proj [(N+2K)*H, D] (q, k, v rows
in order: jaxdec's qkv, transposed) and mlp.gate_up_proj [2F, D] (gate rows, then up rows).
Per layer i, under "model.layers.{i}.":

| HF name                                          | jaxdec (layer i of params["layers"])   | transform        |
|--------------------------------------------------|----------------------------------------|------------------|
| self_attn.{q,k,v}_proj.weight [N*H|K*H, D]        | attn.qkv [D, (N+2K)*H]                 | transpose, concat |
| self_attn.{q,k,v}_proj.bias                       | attn.qkv_bias                          | concat           |
| self_attn.o_proj.weight [D, N*H] / .bias          | attn.out [N*H, D] / out_bias           | transpose / -    |
| self_attn.{q,k}_norm.weight                       | attn.q_norm.scale / k_norm.scale       | -                |
| mlp.gate_proj / up_proj / down_proj .weight       | mlp.w_gate / w_in / w_out              | transpose        |
| mlp.{gate,up,down}_proj.bias                      | mlp.b_gate / b_in / b_out              | -                |
| input_layernorm.weight                            | attn_norm.scale                        | -                |
| post_attention_layernorm.weight                   | mlp_norm.scale ("pre"), else attn_post_norm.scale | -     |
| pre_feedforward_layernorm.weight                  | mlp_norm.scale ("sandwich")            | -                |
| post_feedforward_layernorm.weight                 | mlp_post_norm.scale                    | -                |

and model.embed_tokens.weight [V, D] -> embed, model.norm.weight -> final_norm.scale,
lm_head.weight [V, D] -> head [D, V] (transposed; absent or equal to the embedding when tied).
Gemma's norm weights are stored as HF keeps them (w, applied as 1 + w: `norm="rms_plus_one"`).

The config: both shapes transformers writes are read, v4's `rope_theta` + `rope_scaling`
("type" or "rope_type") and v5's `rope_parameters` (nested per layer type for Gemma 3). A missing
RoPE base is an error, never a silent default. Sliding windows follow each family's rule
(`_sliding`): Mistral's on every layer, Qwen's only with use_sliding_window, and `layer_types`
(or Gemma 3's `sliding_window_pattern`, Gemma 2's even layers) where the family has them.
"""

from __future__ import annotations

import math
import warnings

from jaxdec.config import DecoderConfig, RopeScaling
from jaxdec.hf.files import _resolve
from jaxdec.hf.mapping import (
    Rule,
    _activation,
    _build,
    _cat,
    _cat_t,
    _check_filled,
    _expected_tree,
    _given,
    _heads,
    _need,
    _same,
    _stack_layers,
    _t,
    _tie,
)


def _spec(norm="rms", norm_position="pre", qk_norm="none", embed_scale=False, act="silu",
          tie=False, qkv_bias=None, out_bias=None, mlp_bias=None):
    return dict(norm=norm, norm_position=norm_position, qk_norm=qk_norm, embed_scale=embed_scale,
                act=act, tie=tie, qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=mlp_bias)


# model_type -> the block's fixed choices and the HF class defaults a config.json may omit.
# qkv_bias / out_bias / mlp_bias: None reads attention_bias / mlp_bias from the config.
FAMILIES: dict[str, dict] = {
    "llama": _spec(),
    "mistral": _spec(qkv_bias=False, out_bias=False, mlp_bias=False),
    "qwen2": _spec(qkv_bias=True, out_bias=False, mlp_bias=False),
    "qwen3": _spec(qk_norm="head", mlp_bias=False),
    "gemma": _spec(norm="rms_plus_one", embed_scale=True, act="gelu_pytorch_tanh", tie=True, mlp_bias=False),
    "gemma2": _spec(norm="rms_plus_one", norm_position="sandwich", embed_scale=True,
                    act="gelu_pytorch_tanh", tie=True, mlp_bias=False),
    "gemma3_text": _spec(norm="rms_plus_one", norm_position="sandwich", qk_norm="head", embed_scale=True,
                         act="gelu_pytorch_tanh", tie=True, mlp_bias=False),
    "olmo2": _spec(norm_position="post_branch", qk_norm="projection", mlp_bias=False),
    "phi3": _spec(qkv_bias=False, out_bias=False, mlp_bias=False),
}
FUSED = ("phi3",)  # families whose checkpoints fuse q/k/v and gate/up into one matrix each


# --- the config ---------------------------------------------------------------------------------


def _layer_types_nested(params: dict) -> bool:
    return any(isinstance(v, dict) for v in params.values())


def _rope_dicts(cfg: dict) -> tuple[dict, dict | None]:
    """(global rope params, local rope params or None) from either config shape, each a dict
    with rope_type, rope_theta and the scaling fields."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and _layer_types_nested(params):  # v5, per layer type (Gemma 3)
        full = dict(params.get("full_attention") or {})
        local = params.get("sliding_attention")
        return full, (dict(local) if local is not None else None)
    full = dict(params or {})
    if _given(cfg, "rope_theta") is not None:
        full.setdefault("rope_theta", cfg["rope_theta"])
    if isinstance(cfg.get("rope_scaling"), dict):
        for key, value in cfg["rope_scaling"].items():
            full.setdefault(key, value)
    if _given(cfg, "partial_rotary_factor") is not None:
        full.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])
    local = None
    if _given(cfg, "rope_local_base_freq") is not None:
        local = {"rope_type": "default", "rope_theta": cfg["rope_local_base_freq"]}
    return full, local


def _rope_type(params: dict) -> str:
    return params.get("rope_type", params.get("type")) or "default"


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_scaling(params: dict, max_len: int) -> RopeScaling | None:
    """RopeScaling of HF rope params, as transformers' `modeling_rope_utils` computes them."""
    kind = _rope_type(params)
    if kind == "default":
        return None
    original = params.get("original_max_position_embeddings") or max_len
    if kind == "linear":
        return RopeScaling("linear", float(params["factor"]))
    if kind == "llama3":
        return RopeScaling("llama3", float(params["factor"]), original_max_len=int(original),
                           low_freq_factor=float(params["low_freq_factor"]),
                           high_freq_factor=float(params["high_freq_factor"]))
    if kind == "yarn":
        factor = params.get("factor") or max_len / original
        attention = params.get("attention_factor")
        if attention is None:
            mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
            attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
                         if mscale and mscale_all else _yarn_mscale(factor))
        return RopeScaling("yarn", float(factor), original_max_len=int(original),
                           beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                           attention_factor=float(attention), truncate=bool(params.get("truncate", True)))
    raise ValueError(f"rope type {kind!r} is not supported: jaxdec applies 'default', 'linear', "
                     "'llama3' and 'yarn' ('dynamic' rescales at run time with the sequence length)")


def _theta(params: dict, what: str) -> float:
    if params.get("rope_theta") is None:
        raise ValueError(f"the config gives no RoPE base for {what} (rope_theta or rope_parameters.rope_theta)")
    return float(params["rope_theta"])


def _sliding(model_type: str, cfg: dict, L: int) -> tuple[int | None, tuple[int, ...] | None]:
    """(window, sliding layer indices or None for all) by each family's rule."""
    window = _given(cfg, "sliding_window")
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        return None, None
    if window is None or model_type in ("llama", "gemma", "olmo2"):
        return None, None
    types = cfg.get("layer_types")
    if types is None:
        if model_type in ("mistral", "phi3"):
            return int(window), None
        if model_type in ("qwen2", "qwen3"):
            first = int(cfg.get("max_window_layers", 0))
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(L)]
        elif model_type == "gemma2":
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)]
        else:  # gemma3_text
            pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(L)]
    if len(types) != L:
        raise ValueError(f"layer_types has {len(types)} entries for {L} layers")
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"layer_types {unknown} are not supported: jaxdec knows 'sliding_attention' and 'full_attention'")
    layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return (int(window), layers) if layers else (None, None)


def modern_config(model_type: str, cfg: dict, tensors: dict) -> DecoderConfig:
    """DecoderConfig of a Llama-style HF config dict (shapes from the tensors where it is silent)."""
    spec = FAMILIES[model_type]
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=True (a bidirectional encoder) is not a decoder jaxdec runs")
    embed = _need(tensors, "model.embed_tokens.weight", "vocab_size and hidden_size")
    V, D = embed.shape
    L = int(_given(cfg, "num_hidden_layers") or 0)
    if not L:
        raise ValueError("config.json gives no num_hidden_layers")
    N = _heads(cfg, "num_attention_heads")
    K = int(_given(cfg, "num_key_value_heads") or N)
    H = _given(cfg, "head_dim")
    H = int(H) if H is not None else int(_given(cfg, "hidden_size") or D) // N
    max_len = int(_given(cfg, "max_position_embeddings") or 2048)
    full, local = _rope_dicts(cfg)
    fraction = float(full.get("partial_rotary_factor", 1.0))
    window, sliding_layers = _sliding(model_type, cfg, L)
    local_base = None
    if local is not None and (model_type == "gemma3_text"):
        if _rope_type(local) != "default":
            raise ValueError(f"a scaled RoPE on the sliding layers ({_rope_type(local)!r}) is not supported")
        local_base = _theta(local, "the sliding layers")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or spec["act"]
    bias = lambda fixed, key: fixed if fixed is not None else bool(cfg.get(key, False))  # noqa: E731
    qpas = _given(cfg, "query_pre_attn_scalar")
    return DecoderConfig(
        vocab_size=int(_given(cfg, "vocab_size") or V),
        num_layers=L,
        d_model=int(_given(cfg, "hidden_size") or D),
        num_heads=N,
        max_len=max_len,
        num_kv_heads=K,
        d_ff=int(_given(cfg, "intermediate_size") or _need(tensors, "model.layers.0.mlp.down_proj.weight",
                                                            "intermediate_size").shape[1]),
        position="rope",
        norm_position=spec["norm_position"],
        activation=_activation(act),
        use_bias=False,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", spec["tie"])),
        layer_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_base=_theta(full, "the model" if local_base is None else "the global layers"),
        embed_scale=spec["embed_scale"],
        head_dim=H,
        norm=spec["norm"],
        mlp="gated",
        qkv_bias=bias(spec["qkv_bias"], "attention_bias"),
        out_bias=bias(spec["out_bias"], "attention_bias"),
        mlp_bias=bias(spec["mlp_bias"], "mlp_bias"),
        qk_norm=spec["qk_norm"],
        attn_scale=None if qpas is None or model_type not in ("gemma2", "gemma3_text") else float(qpas) ** -0.5,
        attn_softcap=_given(cfg, "attn_logit_softcapping") if model_type in ("gemma2", "gemma3_text") else None,
        final_softcap=_given(cfg, "final_logit_softcapping") if model_type in ("gemma2", "gemma3_text") else None,
        sliding_window=window,
        sliding_layers=sliding_layers,
        rope_local_base=local_base,
        rope_scaling=_rope_scaling(full, max_len),
        rotary_fraction=fraction,
    )


# --- the tensors --------------------------------------------------------------------------------


def _gate_half(x):
    """gate_up_proj [2F, D] -> the gate's [D, F]."""
    return x[: x.shape[0] // 2].T


def _up_half(x):
    """gate_up_proj [2F, D] -> the up projection's [D, F]."""
    return x[x.shape[0] // 2:].T


def _rules(config: DecoderConfig, tensors: dict, fused: bool = False) -> dict[tuple, Rule]:
    """The mapping table (module docstring): {jaxdec path: (HF names, transform)}."""
    rules: dict[tuple, Rule] = {}
    if config.tie_embeddings:
        rules[("embed",)] = ((_tie(tensors, ["model.embed_tokens.weight", "lm_head.weight"], "the token embedding"),), _same)
    else:
        rules[("embed",)] = (("model.embed_tokens.weight",), _same)
        rules[("head",)] = (("lm_head.weight",), _t)
    rules[("final_norm", "scale")] = (("model.norm.weight",), _same)
    norms = {"pre": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
             "sandwich": {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                          "mlp_norm": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm"},
             "post_branch": {"attn_post_norm": "post_attention_layernorm",
                             "mlp_post_norm": "post_feedforward_layernorm"}}[config.norm_position]
    for i in range(config.num_layers):
        h, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        me = ("layers", i)
        if fused:
            rules[(*me, "attn", "qkv")] = ((a + "qkv_proj.weight",), _t)
            rules[(*me, "mlp", "w_gate")] = ((m + "gate_up_proj.weight",), _gate_half)
            rules[(*me, "mlp", "w_in")] = ((m + "gate_up_proj.weight",), _up_half)
        else:
            rules[(*me, "attn", "qkv")] = ((a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), _cat_t)
            rules[(*me, "mlp", "w_gate")] = ((m + "gate_proj.weight",), _t)
            rules[(*me, "mlp", "w_in")] = ((m + "up_proj.weight",), _t)
        rules[(*me, "mlp", "w_out")] = ((m + "down_proj.weight",), _t)
        rules[(*me, "attn", "out")] = ((a + "o_proj.weight",), _t)
        if config.has_qkv_bias:
            rules[(*me, "attn", "qkv_bias")] = ((a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"), _cat)
        if config.has_out_bias:
            rules[(*me, "attn", "out_bias")] = ((a + "o_proj.bias",), _same)
        if config.qk_norm != "none":
            rules[(*me, "attn", "q_norm", "scale")] = ((a + "q_norm.weight",), _same)
            rules[(*me, "attn", "k_norm", "scale")] = ((a + "k_norm.weight",), _same)
        if config.has_mlp_bias:
            for ours, theirs in (("b_gate", "gate_proj"), ("b_in", "up_proj"), ("b_out", "down_proj")):
                rules[(*me, "mlp", ours)] = ((m + theirs + ".bias",), _same)
        for ours, theirs in norms.items():
            rules[(*me, ours, "scale")] = ((h + theirs + ".weight",), _same)
    return rules


# Buffers some checkpoints carry that are not parameters.
def _ignored(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")


def from_modern(source, config=None, model_type: str | None = None) -> tuple[DecoderConfig, dict]:
    """A Llama-style HF causal LM (one of `FAMILIES`) as a jaxdec DecoderConfig and params.

    Args:
      source: a state dict {HF name: torch tensor or numpy array} or a local checkpoint folder.
      config: the HF config (dict, HF config object or config.json path); for a folder it
        replaces config.json. Head counts and the RoPE base must be given.
      model_type: overrides the config's model_type.

    Raises:
      ValueError naming an unsupported model_type or config value, or missing, unknown or
      misshapen tensors.
    """
    tensors, cfg, _ = _resolve(source, config)
    model_type = model_type or cfg.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not a Llama-style family jaxdec imports: "
                         f"{sorted(FAMILIES)}")
    dconfig = modern_config(model_type, cfg, tensors)
    rules = _rules(dconfig, tensors, fused=model_type in FUSED)
    used = {n for names, _ in rules.values() for n in names}
    tied_copy = lambda n: dconfig.tie_embeddings and n == "lm_head.weight" and n not in used  # noqa: E731
    params = _build(rules, tensors, _expected_tree(dconfig),
                    ignored=lambda n: _ignored(n) or tied_copy(n), optional={})
    _check_filled(params)
    return dconfig, _stack_layers(params)


def first_id(name: str, value) -> int | None:
    """A config's special id `name` (an int or a list) as the one id jaxdec uses: the first, with
    a warning naming the others (an eos_token_id list: decoding will not stop at them)."""
    if isinstance(value, (list, tuple)):
        ids = list(dict.fromkeys(int(v) for v in value))
        if len(ids) > 1:
            warnings.warn(f"{name} {ids}: jaxdec uses one id, {ids[0]}; pass eos_id= / pad_id= to choose another",
                          stacklevel=3)
        return ids[0] if ids else None
    return None if value is None else int(value)
