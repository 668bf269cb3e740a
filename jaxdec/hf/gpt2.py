"""Hugging Face GPT-2 weights as a jaxdec DecoderConfig and params: `from_gpt2`.

GPT-2 mapping (Conv1D weights are stored [in, out] already: no transposes). Per layer i, HF
names under "h.{i}." map into layer i of params["layers"] (stacked: index i of every leaf):

| HF name (prefix "transformer." optional)  | jaxdec                         | transform            |
|-------------------------------------------|--------------------------------|----------------------|
| wte.weight [V, D]                         | embed [V, D]                   | -                    |
| wpe.weight [P, D]                         | pos_embed [max_len=P, D]       | -                    |
| h.i.ln_1.weight / .bias                   | attn_norm.scale / .bias        | -                    |
| h.i.attn.c_attn.weight [D, 3D] / .bias    | attn.qkv [D, 3D] / qkv_bias    | - (q, k, v column blocks, heads-major: our layout) |
| h.i.attn.c_proj.weight [D, D] / .bias     | attn.out / out_bias            | -                    |
| h.i.ln_2.weight / .bias                   | mlp_norm.scale / .bias         | -                    |
| h.i.mlp.c_fc.weight [D, F] / .bias        | mlp.w_in / b_in                | -                    |
| h.i.mlp.c_proj.weight [F, D] / .bias      | mlp.w_out / b_out              | -                    |
| ln_f.weight / .bias                       | final_norm.scale / .bias       | -                    |
| lm_head.weight [V, D] (no prefix)         | tied to embed, or head [D, V]  | transpose if untied  |

Config: DecoderConfig(vocab_size, num_layers=n_layer, d_model=n_embd, num_heads=n_head,
max_len=n_positions, d_ff=n_inner or 4*n_embd, position="learned", norm_position="pre",
activation=ACTIVATIONS[activation_function], layer_norm_eps=layer_norm_epsilon). Refused:
scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True, add_cross_attention=True.
"""

from __future__ import annotations

import re

import numpy as np

from jaxdec.config import DecoderConfig
from jaxdec.hf.files import _resolve
from jaxdec.hf.mapping import (
    Rule,
    _activation,
    _build,
    _check_filled,
    _count_layers,
    _expected_tree,
    _given,
    _heads,
    _need,
    _same,
    _stack_layers,
    _strip,
    _t,
    _tie,
)

# Defaults of HF's GPT2Config for the fields used here (a bare state dict without a config falls
# back to them, as HF would).
GPT2_DEFAULTS = {
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
    "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": None,
}

_GPT2_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")


def _gpt2_config(tensors: dict, cfg: dict) -> tuple[DecoderConfig, bool]:
    """DecoderConfig from an HF GPT-2 config dict and the tensors' shapes; also whether tied."""
    for key, bad, why in [("scale_attn_weights", False, "attention scores unscaled by 1/sqrt(H)"),
                          ("scale_attn_by_inverse_layer_idx", True, "scores scaled by 1/(layer + 1)"),
                          ("add_cross_attention", True, "cross-attention blocks in a decoder-only LM")]:
        if cfg.get(key, GPT2_DEFAULTS[key]) == bad:
            raise ValueError(f"GPT-2 config {key}={bad} ({why}) cannot be expressed by a jaxdec DecoderConfig")
    wte = _need(tensors, "wte.weight", "vocab_size and n_embd")
    V, D = wte.shape
    n_layer = _given(cfg, "n_layer") or _count_layers(tensors, r"h\.(\d+)\.")
    n_pos = _given(cfg, "n_positions") or _given(cfg, "n_ctx") or _need(tensors, "wpe.weight", "n_positions").shape[0]
    if _given(cfg, "n_inner") is not None:
        d_ff = int(cfg["n_inner"])
    elif "h.0.mlp.c_fc.weight" in tensors:
        d_ff = int(tensors["h.0.mlp.c_fc.weight"].shape[1])
    else:
        d_ff = 4 * int(_given(cfg, "n_embd") or D)
    tie = cfg.get("tie_word_embeddings")
    if tie is None:  # not configured: tied unless a separate lm_head says otherwise
        head = tensors.get("lm_head.weight")
        tie = head is None or (head.shape == wte.shape and np.array_equal(head, wte))
    config = DecoderConfig(
        vocab_size=int(_given(cfg, "vocab_size") or V),
        num_layers=int(n_layer),
        d_model=int(_given(cfg, "n_embd") or D),
        num_heads=_heads(cfg, "n_head", "num_attention_heads"),
        max_len=int(n_pos),
        d_ff=d_ff,
        position="learned",
        norm_position="pre",
        activation=_activation(cfg.get("activation_function", GPT2_DEFAULTS["activation_function"])),
        use_bias=True,
        tie_embeddings=bool(tie),
        layer_norm_eps=float(cfg.get("layer_norm_epsilon", GPT2_DEFAULTS["layer_norm_epsilon"])),
    )
    return config, bool(tie)


def _gpt2_rules(config: DecoderConfig, tensors: dict) -> dict[tuple, Rule]:
    """The GPT-2 mapping table (module docstring): {jaxdec path: (HF names, transform)}."""
    rules: dict[tuple, Rule] = {}
    if config.tie_embeddings:
        rules[("embed",)] = ((_tie(tensors, ["wte.weight", "lm_head.weight"], "the token embedding"),), _same)
    else:
        rules[("embed",)] = (("wte.weight",), _same)
        rules[("head",)] = (("lm_head.weight",), _t)
    rules[("pos_embed",)] = (("wpe.weight",), _same)
    for i in range(config.num_layers):
        h = f"h.{i}."
        for ours, theirs in [(("attn_norm", "scale"), "ln_1.weight"), (("attn_norm", "bias"), "ln_1.bias"),
                             (("attn", "qkv"), "attn.c_attn.weight"), (("attn", "qkv_bias"), "attn.c_attn.bias"),
                             (("attn", "out"), "attn.c_proj.weight"), (("attn", "out_bias"), "attn.c_proj.bias"),
                             (("mlp_norm", "scale"), "ln_2.weight"), (("mlp_norm", "bias"), "ln_2.bias"),
                             (("mlp", "w_in"), "mlp.c_fc.weight"), (("mlp", "b_in"), "mlp.c_fc.bias"),
                             (("mlp", "w_out"), "mlp.c_proj.weight"), (("mlp", "b_out"), "mlp.c_proj.bias")]:
            rules[("layers", i, *ours)] = ((h + theirs,), _same)
    rules[("final_norm", "scale")] = (("ln_f.weight",), _same)
    rules[("final_norm", "bias")] = (("ln_f.bias",), _same)
    return rules


def from_gpt2(source, config=None) -> tuple[DecoderConfig, dict]:
    """An HF GPT-2 LM (GPT2LMHeadModel or GPT2Model weights) as a jaxdec DecoderConfig and params.

    Args:
      source: a state dict {name: torch tensor or numpy array} (with or without "transformer."),
        or a local checkpoint folder (config.json + model.safetensors or pytorch_model.bin).
      config: the HF config (dict, GPT2Config or config.json path); for a folder it replaces
        config.json. For a bare state dict it must give n_head; other fields default to
        the shapes, then to GPT2Config's defaults (module docstring).

    Returns:
      (DecoderConfig, params) with params laid out as `jaxdec.init_params(config, key)`.

    Raises:
      ValueError naming missing, unknown or misshapen tensors, or a config field jaxdec cannot
      express. ImportError for a pytorch_model.bin without torch installed.
    """
    tensors, cfg, _ = _resolve(source, config)
    tensors = _strip(tensors, "transformer.")
    model_type = cfg.get("model_type")
    if model_type not in (None, "gpt2"):
        raise ValueError(f"config model_type is {model_type!r}, expected 'gpt2' (use from_marian for 'marian')")
    dconfig, _ = _gpt2_config(tensors, cfg)
    rules = _gpt2_rules(dconfig, tensors)
    used = {n for names, _ in rules.values() for n in names}
    tied_copy = lambda n: dconfig.tie_embeddings and n == "lm_head.weight" and n not in used  # noqa: E731
    params = _build(rules, tensors, _expected_tree(dconfig),
                    ignored=lambda n: bool(_GPT2_BUFFER.fullmatch(n)) or tied_copy(n), optional={})
    _check_filled(params)
    return dconfig, _stack_layers(params)
