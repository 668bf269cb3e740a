"""jaxdec params back to a Hugging Face folder: `export_folder` (the importer, inverted).

The folder holds what transformers' `AutoModelForCausalLM.from_pretrained(folder)` and
`jaxdec.hf.load_checkpoint(folder)` read: config.json, model.safetensors (float32) and, given a
tokenizer, tokenizer.json, tokenizer_config.json (special tokens, chat template) and
generation_config.json, so the folder stands alone.

The tensors come from the importer's own mapping table (`modern._rules`), each transform
inverted: a transpose is transposed back, a concatenation of q/k/v (weights or biases) is split
at N*H and K*H. config.json is written for one of `EXPORTABLE` (the families whose config the
block's fields determine without per-family patterns), and then read back through the importer:
if that does not give exactly the DecoderConfig being exported, the export is refused naming
each field that differs, before anything is written. So a config the chosen family cannot
express (a bias Llama does not have, Gemma's norms, a sliding window on some layers) is an
error, never a folder that loads as another model.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from jaxdec.config import DecoderConfig
from jaxdec.hf.mapping import _cat, _cat_t, _same, _t
from jaxdec.hf.modern import _rules, modern_config

EXPORTABLE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM"}
_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu"}


def _rope_scaling(config: DecoderConfig) -> dict | None:
    s = config.rope_scaling
    if s is None:
        return None
    out = {"rope_type": s.kind, "factor": s.factor}
    if s.kind == "llama3":
        out.update(original_max_position_embeddings=s.original_max_len, low_freq_factor=s.low_freq_factor,
                   high_freq_factor=s.high_freq_factor)
    elif s.kind == "yarn":
        out.update(original_max_position_embeddings=s.original_max_len, beta_fast=s.beta_fast,
                   beta_slow=s.beta_slow, attention_factor=s.attention_factor, truncate=s.truncate)
    return out


def hf_config(config: DecoderConfig, model_type: str = "llama", *, eos_id: int | None = None,
              bos_id: int | None = None, pad_id: int | None = None) -> dict:
    """config.json for `config` as `model_type` (one of EXPORTABLE).

    Raises:
      ValueError: another model_type, or a config the family cannot express, naming each field
        the importer would read back differently.
    """
    if model_type not in EXPORTABLE:
        raise ValueError(f"export writes config.json for {sorted(EXPORTABLE)}, not {model_type!r}")
    if not isinstance(config, DecoderConfig) or config.position != "rope":
        raise ValueError("export writes Llama-style models (a DecoderConfig with position='rope'); "
                         f"got {type(config).__name__} with position={getattr(config, 'position', None)!r}")
    if config.activation not in _ACTIVATIONS:
        raise ValueError(f"activation {config.activation!r} has no Hugging Face name here")
    cfg = {
        "architectures": [EXPORTABLE[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ff_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": _ACTIVATIONS[config.activation],
        "max_position_embeddings": config.max_len,
        "rms_norm_eps": config.layer_norm_eps,
        "rope_theta": config.rope_base,
        "rope_scaling": _rope_scaling(config),
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }
    if config.rotary_fraction != 1.0:
        cfg["partial_rotary_factor"] = config.rotary_fraction
    if model_type == "llama":
        cfg.update(attention_bias=config.has_qkv_bias, mlp_bias=config.has_mlp_bias, pretraining_tp=1)
    elif model_type == "mistral":
        cfg["sliding_window"] = config.sliding_window
    else:  # qwen2, qwen3
        cfg.update(use_sliding_window=config.sliding_window is not None, sliding_window=config.sliding_window,
                   max_window_layers=min(config.sliding_layers or (0,)) if config.sliding_window else config.num_layers)
        if model_type == "qwen3":
            cfg["attention_bias"] = config.has_qkv_bias
    _check_round_trip(config, cfg, model_type)
    return cfg


_DERIVED = {"qkv_bias": "has_qkv_bias", "out_bias": "has_out_bias", "mlp_bias": "has_mlp_bias"}


def config_differences(a: DecoderConfig, b: DecoderConfig) -> dict[str, tuple]:
    """{field: (a's, b's)} where two configs build different models: bias switches compared by
    their effect (None follows use_bias), and dropout / init_std (training-time) ignored."""
    x, y = dataclasses.asdict(a), dataclasses.asdict(b)
    for field, prop in _DERIVED.items():
        x[field], y[field] = getattr(a, prop), getattr(b, prop)
    x.pop("use_bias"), y.pop("use_bias")  # its effect is in the three switches above
    return {k: (x[k], y[k]) for k in x if x[k] != y[k] and k not in ("dropout", "init_std")}


def _check_round_trip(config: DecoderConfig, cfg: dict, model_type: str) -> None:
    """The importer must read `cfg` back as the same model as `config`."""
    shapes = {"model.embed_tokens.weight": np.empty((config.vocab_size, config.d_model), np.float32)}
    try:
        back = modern_config(model_type, cfg, shapes)
    except ValueError as err:
        raise ValueError(f"this model cannot be written as a {model_type!r} config: {err}") from None
    differ = [f"{k}: {ours!r} (a {model_type} config.json reads back {theirs!r})"
              for k, (ours, theirs) in config_differences(config, back).items()]
    if differ:
        raise ValueError(f"this model cannot be written as a {model_type!r} config.json; the fields it cannot "
                         f"express: {'; '.join(differ)}. Choose another model_type of {sorted(EXPORTABLE)}")


def hf_tensors(params: dict, config: DecoderConfig) -> dict[str, np.ndarray]:
    """{HF name: float32 array} of jaxdec params, the importer's table inverted."""
    nh, kh = config.num_heads * config.head_dim, config.kv_heads * config.head_dim
    cuts = [nh, nh + kh]  # q | k | v columns of qkv
    rules = _rules(config, {"model.embed_tokens.weight": None})
    out: dict[str, np.ndarray] = {}
    for path, (names, fn) in rules.items():
        if path[0] == "layers":  # ("layers", i, ...) addresses layer i of a stacked [L, ...] leaf
            leaf = params["layers"]
            for key in path[2:]:
                leaf = leaf[key]
            leaf = leaf[path[1]]
        else:
            leaf = params
            for key in path:
                leaf = leaf[key]
        x = np.asarray(leaf, np.float32)
        if fn is _same:
            parts = [x]
        elif fn is _t:
            parts = [x.T]
        elif fn is _cat_t:
            parts = [p.T for p in np.split(x, cuts, axis=1)]
        elif fn is _cat:
            parts = np.split(x, cuts, axis=0)
        else:
            raise ValueError(f"no inverse for the transform of {names}")
        for name, part in zip(names, parts, strict=True):
            out[name] = np.ascontiguousarray(part, np.float32)
    return out


def _token(tok, i: int | None) -> str | None:
    return None if i is None else tok.id_to_token(int(i))


def export_folder(folder: str | os.PathLike, params: dict, config: DecoderConfig, *, model_type: str = "llama",
                  tokenizer=None, chat_template: str | None = None, eos_id: int | None = None,
                  bos_id: int | None = None, pad_id: int | None = None) -> str:
    """Writes a Hugging Face folder of the model; returns its path.

    Args:
      folder: created if missing; files of the same names are replaced.
      params, config: the model (a Llama-style DecoderConfig).
      model_type: one of EXPORTABLE; the config must be expressible in it (`hf_config`).
      tokenizer: a `tokenizers.Tokenizer` or `jaxdec.hf.TextTokenizer` (then its special ids
        are the defaults of eos_id / bos_id / pad_id), or None for no tokenizer files.
      chat_template: written into tokenizer_config.json.

    Raises:
      ValueError before writing anything: a config the family cannot express, params unlike
      the config.
    """
    from safetensors.numpy import save_file

    from jaxdec.api import check_params

    tok = getattr(tokenizer, "tok", tokenizer)
    if tokenizer is not None and hasattr(tokenizer, "eos_id"):
        eos_id = tokenizer.eos_id if eos_id is None else eos_id
        bos_id = tokenizer.bos_id if bos_id is None else bos_id
        pad_id = tokenizer.pad_id if pad_id is None else pad_id
    cfg = hf_config(config, model_type, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id)
    check_params(params, config)
    tensors = hf_tensors(params, config)
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    generation = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    if tok is not None:
        tok.save(os.path.join(folder, "tokenizer.json"))
        tc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_len,
              "clean_up_tokenization_spaces": False, "bos_token": _token(tok, bos_id),
              "eos_token": _token(tok, eos_id), "pad_token": _token(tok, pad_id)}
        if chat_template is not None:
            tc["chat_template"] = chat_template
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({k: v for k, v in tc.items() if v is not None}, f, indent=2)
    return folder
