"""Import Hugging Face GPT-2 and Marian (opus-mt) weights as jaxdec configs and params.

`from_gpt2(source)` -> (DecoderConfig, params) and `from_marian(source)` -> (Seq2SeqConfig, params)
take either a state dict (name -> torch tensor or numpy array, with or without the
"transformer." / "model." prefixes) or a local checkpoint folder (config.json plus
model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin). Nothing is ever
downloaded. Reading safetensors needs only `safetensors` and numpy; a .bin needs torch.
`special_ids(source)` gives the eos / pad / decoder-start ids; `load_checkpoint(folder)` does all
of it, dispatching on config.json's model_type.

The config. A folder's config.json is read. For a bare state dict, pass `config=` (a dict like
config.json, or an HF config object); what it leaves out is inferred from tensor shapes (vocab
size, d_model, layer counts, MLP width, GPT-2's n_positions), then taken from HF's class defaults
(activation, LayerNorm eps, scale_embedding, special ids, ...). The number of attention heads
cannot be read from any shape and must be given (n_head / encoder_attention_heads). GPT-2's
tie_word_embeddings, when not given, is inferred from the data: tied unless an lm_head.weight
differs from wte. Configs jaxdec cannot express raise ValueError naming the field.

Checking. Every expected tensor must be present with the expected shape, and every tensor must
be known: otherwise ValueError names them. Ignored: the non-parameter buffers of old GPT-2
checkpoints (h.N.attn.bias, h.N.attn.masked_bias) and Marian's static sinusoidal tables
(embed_positions.weight), which are checked against `jaxdec.layers.sinusoidal` when present.
Tied copies (lm_head.weight, the per-stack embed_tokens.weight of shared embeddings) may be
present or not; when present they must equal the tensor they are tied to.

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

Marian mapping (nn.Linear weights are stored [out, in]: transposed to our [in, out]). Post-LN,
sinusoidal positions (sines in the first half, cosines in the second, no position offset),
LayerNorm eps 1e-5, embeddings scaled by sqrt(D) iff scale_embedding. "S.l.i." is
"encoder.layers.i." or "decoder.layers.i." (prefix "model." optional) into
layer i of params[encoder|decoder]["layers"] (stacked: index i of every leaf):

| HF name                                             | jaxdec                      | transform                |
|-----------------------------------------------------|-----------------------------|--------------------------|
| encoder/decoder.embed_tokens.weight [V, D], else shared.weight | embed [V, D] when shared, else encoder.embed / decoder.embed | - |
| S.l.i.self_attn.{q,k,v}_proj.weight [D, D]          | attn.qkv [D, 3D]            | transpose each, concat q,k,v |
| S.l.i.self_attn.{q,k,v}_proj.bias                   | attn.qkv_bias [3D]          | concat q, k, v           |
| S.l.i.self_attn.out_proj.weight / .bias             | attn.out / out_bias         | transpose / -            |
| S.l.i.self_attn_layer_norm.weight / .bias           | attn_norm.scale / .bias     | -                        |
| decoder...encoder_attn.q_proj.weight / .bias        | cross.q / q_bias            | transpose / -            |
| decoder...encoder_attn.{k,v}_proj.weight / .bias    | cross.kv [D, 2D] / kv_bias  | transpose each, concat k,v |
| decoder...encoder_attn.out_proj.weight / .bias      | cross.out / out_bias        | transpose / -            |
| decoder...encoder_attn_layer_norm.weight / .bias    | cross_norm.scale / .bias    | -                        |
| S.l.i.fc1.weight [F, D] / .bias                     | mlp.w_in [D, F] / b_in      | transpose / -            |
| S.l.i.fc2.weight [D, F] / .bias                     | mlp.w_out [F, D] / b_out    | transpose / -            |
| S.l.i.final_layer_norm.weight / .bias               | mlp_norm.scale / .bias      | -                        |
| final_logits_bias [1, V] (no prefix; zeros if absent, as in HF) | decoder.logits_bias [V] | flatten          |
| lm_head.weight [V, D] (no prefix)                   | tied to the decoder embed, or decoder.head [D, V] | transpose if untied |
| encoder/decoder.embed_positions.weight              | (none: static table)        | checked vs sinusoidal    |

Config: Seq2SeqConfig(vocab_size, num_encoder_layers=encoder_layers,
num_decoder_layers=decoder_layers, d_model, num_heads=encoder_attention_heads,
max_len=max_position_embeddings, d_ff=encoder_ffn_dim, position="sinusoidal",
norm_position="post", activation=ACTIVATIONS[activation_function], embed_scale=scale_embedding,
share_embeddings=share_encoder_decoder_embeddings (and the two stacks' embeddings equal: transformers
5 unties shared, encoder and decoder embeddings when tie_word_embeddings=False),
tie_embeddings=tie_word_embeddings (when absent: lm_head.weight absent or equal to the decoder
embedding), logits_bias=True). Refused: encoder/decoder heads or FFN widths that differ, decoder_vocab_size !=
vocab_size, and the legacy BART-style flags HF's Marian does not run (normalize_before,
normalize_embedding / layernorm_embedding, add_final_layer_norm, static_position_embeddings=False).
Special ids: eos_token_id (HF default 0), pad_token_id, decoder_start_token_id (= pad_token_id in
opus-mt): decoding starts from [decoder_start_id].
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np

from jaxdec import layers
from jaxdec.config import DecoderConfig, Seq2SeqConfig

# HF activation_function -> jaxdec activation. HF's "gelu_new" and "gelu_pytorch_tanh" are the
# tanh approximation; "gelu" is the exact erf GELU; "swish" is SiLU.
ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "swish": "silu",
    "silu": "silu",
}

# Defaults of HF's GPT2Config and MarianConfig for the fields used here (a bare state dict
# without a config falls back to them, as HF would).
GPT2_DEFAULTS = {
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
    "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": None,
}
MARIAN_DEFAULTS = {
    "activation_function": "gelu", "scale_embedding": False, "max_position_embeddings": 1024,
    "share_encoder_decoder_embeddings": True, "tie_word_embeddings": True,
    "eos_token_id": 0, "pad_token_id": 58100, "decoder_start_token_id": 58100, "bos_token_id": None,
}

_GPT2_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")
_MARIAN_POSITIONS = ("encoder.embed_positions.weight", "decoder.embed_positions.weight")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Token ids that decoding needs.

    eos_id: stop token (None: never stop). pad_id: fills finished rows (GPT-2 has none: eos is
    used, as HF's generate does). decoder_start_id: the encoder-decoder's first decoder token
    (None for a decoder-only model). bos_id: as configured (unused by decoding).
    """

    eos_id: int | None
    pad_id: int | None
    decoder_start_id: int | None = None
    bos_id: int | None = None


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint folder: model_type ("gpt2" or "marian"), config, params, special ids,
    and the raw generation settings (config.json updated by generation_config.json)."""

    model_type: str
    config: DecoderConfig | Seq2SeqConfig
    params: dict
    special: SpecialIds
    generation: dict


# --- reading tensors and configs --------------------------------------------------------------


def _to_numpy(name: str, value) -> np.ndarray:
    """A torch tensor, jax or numpy array -> float32 numpy (a copy)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    arr = np.asarray(value)
    if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"):
        raise ValueError(f"tensor {name!r} has non-float dtype {arr.dtype}")
    return np.array(arr, dtype=np.float32)


def _read_safetensors_raw(path: str) -> dict[str, np.ndarray]:
    """A minimal safetensors reader for dtypes numpy lacks (bfloat16, via ml_dtypes)."""
    import ml_dtypes

    dtypes = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": ml_dtypes.bfloat16}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise ValueError(f"tensor {name!r} in {path} has unsupported dtype {info['dtype']}")
        lo, hi = info["data_offsets"]
        out[name] = np.frombuffer(data[lo:hi], dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    import safetensors.numpy

    try:
        return safetensors.numpy.load_file(path)
    except TypeError:  # e.g. "data type 'bfloat16' not understood"
        return _read_safetensors_raw(path)


def _read_bin(path: str) -> dict:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path} is a PyTorch pickle: reading it needs torch (pip install torch), or convert "
            "the checkpoint to model.safetensors, which needs only the safetensors package"
        ) from e
    return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict(folder: str) -> dict[str, np.ndarray]:
    """The tensors of a local checkpoint folder, float32 numpy, HF names unchanged.

    Looks for model.safetensors, model.safetensors.index.json (shards), pytorch_model.bin,
    pytorch_model.bin.index.json, in that order.
    """
    def shards(index_file: str) -> list[str]:
        with open(os.path.join(folder, index_file)) as f:
            return sorted(set(json.load(f)["weight_map"].values()))

    candidates = [
        ("model.safetensors", lambda: [("model.safetensors", _read_safetensors)]),
        ("model.safetensors.index.json",
         lambda: [(s, _read_safetensors) for s in shards("model.safetensors.index.json")]),
        ("pytorch_model.bin", lambda: [("pytorch_model.bin", _read_bin)]),
        ("pytorch_model.bin.index.json",
         lambda: [(s, _read_bin) for s in shards("pytorch_model.bin.index.json")]),
    ]
    for marker, files in candidates:
        if os.path.exists(os.path.join(folder, marker)):
            tensors: dict[str, np.ndarray] = {}
            for file, read in files():
                for name, value in read(os.path.join(folder, file)).items():
                    tensors[name] = _to_numpy(name, value)
            return tensors
    raise FileNotFoundError(
        f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin"
    )


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _config_dict(config) -> dict:
    """config: None, a dict, an HF config object (to_dict), or a path to a config.json."""
    if config is None:
        return {}
    if isinstance(config, (str, os.PathLike)):
        return _read_json(os.fspath(config))
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if isinstance(config, Mapping):
        return dict(config)
    raise ValueError(f"config must be a dict, an HF config or a config.json path, got {type(config).__name__}")


def _resolve(source, config) -> tuple[dict[str, np.ndarray], dict, dict]:
    """(tensors, config dict, generation settings) from a folder or a state dict."""
    if isinstance(source, (str, os.PathLike)):
        folder = os.fspath(source)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
        cfg = _read_json(os.path.join(folder, "config.json")) if config is None else _config_dict(config)
        gen_path = os.path.join(folder, "generation_config.json")
        generation = {**cfg, **(_read_json(gen_path) if os.path.exists(gen_path) else {})}
        return load_state_dict(folder), cfg, generation
    if not isinstance(source, Mapping):
        raise ValueError(f"source must be a state dict or a checkpoint folder path, got {type(source).__name__}")
    cfg = _config_dict(config)
    return {k: _to_numpy(k, v) for k, v in source.items()}, cfg, cfg


def _strip(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Drops an optional leading prefix; a name present both ways must hold the same tensor."""
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        short = name[len(prefix):] if name.startswith(prefix) else name
        if short in out and not np.array_equal(out[short], value):
            raise ValueError(f"tensor {short!r} appears with and without the {prefix!r} prefix, with different values")
        out[short] = value
    return out


def _given(cfg: dict, key: str):
    """cfg[key] unless absent or None."""
    value = cfg.get(key)
    return None if value is None else value


def _activation(name) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation_function {name!r} is not supported; jaxdec maps {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _count_layers(names, pattern: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
    return max(found) + 1 if found else 0


def _need(tensors: dict, name: str, why: str) -> np.ndarray:
    if name not in tensors:
        raise ValueError(f"missing tensor {name!r} (needed to infer {why})")
    return tensors[name]


def _heads(cfg: dict, *keys: str) -> int:
    for key in keys:
        if _given(cfg, key) is not None:
            return int(cfg[key])
    raise ValueError(
        f"the number of attention heads cannot be inferred from tensor shapes: pass "
        f"config={{{keys[0]!r}: ...}} (or a checkpoint folder with its config.json)"
    )


# --- building params from a mapping table ------------------------------------------------------

Rule = tuple[tuple[str, ...], Callable[..., np.ndarray]]  # (HF names, transform)


def _same(x):
    return x


def _t(x):
    """nn.Linear [out, in] -> [in, out]."""
    return x.T


def _cat_t(*xs):
    """Several nn.Linear weights -> one [in, sum(out)] matrix, in the given order."""
    return np.concatenate([x.T for x in xs], axis=1)


def _cat(*xs):
    return np.concatenate(xs, axis=0)


def _flat(x):
    return x.reshape(-1)


def _build(rules: dict[tuple, Rule], tensors: dict[str, np.ndarray], expected: dict,
           ignored: Callable[[str], bool], optional: dict[str, np.ndarray]) -> dict:
    """Applies rules {jaxdec path: (HF names, transform)} and checks names and shapes.

    expected: the jaxdec params tree of the config (shapes via jax.eval_shape); the result has
    exactly its structure. optional: HF names that may be absent, with their default values.
    Raises ValueError naming missing, unknown or misshapen tensors.
    """
    used = {n for names, _ in rules.values() for n in names}
    missing = sorted(n for n in used if n not in tensors and n not in optional)
    unknown = sorted(n for n in tensors if n not in used and not ignored(n))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_names(missing)}")
        if unknown:
            parts.append(f"unknown tensors: {_names(unknown)}")
        raise ValueError("; ".join(parts))
    params = _skeleton(expected)
    for path, (names, fn) in rules.items():
        args = [tensors[n] if n in tensors else optional[n] for n in names]
        want = tuple(_lookup(expected, path).shape)
        try:
            value = fn(*args)
        except ValueError as e:
            raise ValueError(f"tensors {_shapes(names, args)} cannot be combined into {path}: {e}") from None
        if value.shape != want:
            raise ValueError(f"tensor(s) {_shapes(names, args)} give {'.'.join(map(str, path))} "
                             f"shape {value.shape}, expected {want} for this config")
        _assign(params, path, jnp.asarray(value, jnp.float32))
    return params


def _names(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _shapes(names, args) -> str:
    return ", ".join(f"{n} {tuple(a.shape)}" for n, a in zip(names, args))


def _skeleton(tree):
    """Same containers as tree, leaves None (filled by _assign)."""
    if isinstance(tree, dict):
        return {k: _skeleton(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_skeleton(v) for v in tree]
    return None


def _lookup(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _assign(tree, path, value) -> None:
    _lookup(tree, path[:-1])[path[-1]] = value


def _check_filled(tree, path=()) -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _check_filled(v, path + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            _check_filled(v, path + (i,))
    elif tree is None:  # a mapping-table bug, not a user error
        raise AssertionError(f"no rule fills params{list(path)}")


def _expected_tree(config) -> dict:
    """The params tree init_params would build for config, shapes only, nothing allocated, with
    every stacked "layers" dict split into a list of per-layer dicts (the rules address layer i
    as ("layers", i, ...)); `_stack_layers` turns the filled tree back into the one layout."""
    import jax

    from jaxdec.api import init_params

    def split(tree):
        if not isinstance(tree, dict):
            return tree
        out = {k: split(v) for k, v in tree.items() if k != "layers"}
        if "layers" in tree:
            L = jax.tree.leaves(tree["layers"])[0].shape[0]
            out["layers"] = [jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype),
                                          tree["layers"]) for _ in range(L)]
        return out

    return split(jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0)))


def _stack_layers(tree):
    """Per-layer lists of dicts -> the stacked [L, ...] layout that every jaxdec function uses."""
    from jaxdec.model import stack_blocks

    if not isinstance(tree, dict):
        return tree
    return {k: stack_blocks(v) if k == "layers" else _stack_layers(v) for k, v in tree.items()}


def _tie(tensors: dict, names: list[str], what: str) -> str:
    """Of tied copies, the first present name; all present copies must be equal."""
    present = [n for n in names if n in tensors]
    if not present:
        raise ValueError(f"missing tensors: {what} (one of {', '.join(names)})")
    for n in present[1:]:
        if tensors[n].shape != tensors[present[0]].shape or not np.array_equal(tensors[n], tensors[present[0]]):
            raise ValueError(f"{n} differs from {present[0]}, but the config ties them")
    return present[0]


# --- GPT-2 ------------------------------------------------------------------------------------


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


# --- Marian -----------------------------------------------------------------------------------


_MARIAN_REFUSED = [
    ("normalize_before", True, "pre-LN blocks"),
    ("normalize_embedding", True, "a LayerNorm on the embeddings (layernorm_embedding)"),
    ("add_final_layer_norm", True, "a final LayerNorm after each stack"),
    ("static_position_embeddings", False, "learned positions"),
    ("add_bias_logits", True, "a logits bias Marian does not use"),
]


def _marian_config(tensors: dict, cfg: dict) -> Seq2SeqConfig:
    for key, bad, why in _MARIAN_REFUSED:
        if cfg.get(key) is bad:
            raise ValueError(f"Marian config {key}={bad} ({why}) is not what HF's MarianMTModel runs, "
                             "and jaxdec cannot express it")
    enc_name, dec_name, share, tie = _marian_embeddings(tensors, cfg)
    V, D = tensors[enc_name].shape
    vocab = int(_given(cfg, "vocab_size") or V)
    dec_vocab = int(_given(cfg, "decoder_vocab_size") or vocab)
    if dec_vocab != vocab:
        raise ValueError(f"decoder_vocab_size={dec_vocab} differs from vocab_size={vocab}: "
                         "jaxdec's Seq2SeqConfig has one vocabulary")
    heads = _heads(cfg, "encoder_attention_heads", "num_attention_heads")
    if int(cfg.get("decoder_attention_heads") or heads) != heads:
        raise ValueError(f"encoder_attention_heads={heads} and decoder_attention_heads="
                         f"{cfg['decoder_attention_heads']} differ: jaxdec uses one num_heads")
    enc_ff = _given(cfg, "encoder_ffn_dim")
    if enc_ff is None and "encoder.layers.0.fc1.weight" in tensors:
        enc_ff = tensors["encoder.layers.0.fc1.weight"].shape[0]
    dec_ff = _given(cfg, "decoder_ffn_dim")
    if dec_ff is None and "decoder.layers.0.fc1.weight" in tensors:
        dec_ff = tensors["decoder.layers.0.fc1.weight"].shape[0]
    if enc_ff is not None and dec_ff is not None and int(enc_ff) != int(dec_ff):
        raise ValueError(f"encoder_ffn_dim={enc_ff} and decoder_ffn_dim={dec_ff} differ: jaxdec uses one d_ff")
    max_len = _given(cfg, "max_position_embeddings")
    if max_len is None:
        tables = [tensors[n].shape[0] for n in _MARIAN_POSITIONS if n in tensors]
        max_len = tables[0] if tables else MARIAN_DEFAULTS["max_position_embeddings"]
    d_model = int(_given(cfg, "d_model") or D)
    return Seq2SeqConfig(
        vocab_size=vocab,
        num_encoder_layers=int(_given(cfg, "encoder_layers") or _count_layers(tensors, r"encoder\.layers\.(\d+)\.")),
        num_decoder_layers=int(_given(cfg, "decoder_layers") or _count_layers(tensors, r"decoder\.layers\.(\d+)\.")),
        d_model=d_model,
        num_heads=heads,
        max_len=int(max_len),
        d_ff=int(enc_ff if enc_ff is not None else (dec_ff if dec_ff is not None else 4 * d_model)),
        position="sinusoidal",
        norm_position="post",
        activation=_activation(cfg.get("activation_function", MARIAN_DEFAULTS["activation_function"])),
        use_bias=True,
        share_embeddings=bool(share),
        tie_embeddings=bool(tie),
        logits_bias=True,
        layer_norm_eps=1e-5,  # HF's Marian uses nn.LayerNorm's default
        embed_scale=bool(cfg.get("scale_embedding", MARIAN_DEFAULTS["scale_embedding"])),
    )


def _marian_layer_rules(stack: str, i: int, cross: bool) -> dict[tuple, Rule]:
    """One encoder or decoder layer's rows of the Marian mapping table."""
    hf = f"{stack}.layers.{i}."
    me = (stack, "layers", i)
    a = hf + "self_attn."
    rules: dict[tuple, Rule] = {
        (*me, "attn", "qkv"): ((a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), _cat_t),
        (*me, "attn", "qkv_bias"): ((a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"), _cat),
        (*me, "attn", "out"): ((a + "out_proj.weight",), _t),
        (*me, "attn", "out_bias"): ((a + "out_proj.bias",), _same),
        (*me, "attn_norm", "scale"): ((hf + "self_attn_layer_norm.weight",), _same),
        (*me, "attn_norm", "bias"): ((hf + "self_attn_layer_norm.bias",), _same),
        (*me, "mlp", "w_in"): ((hf + "fc1.weight",), _t),
        (*me, "mlp", "b_in"): ((hf + "fc1.bias",), _same),
        (*me, "mlp", "w_out"): ((hf + "fc2.weight",), _t),
        (*me, "mlp", "b_out"): ((hf + "fc2.bias",), _same),
        (*me, "mlp_norm", "scale"): ((hf + "final_layer_norm.weight",), _same),
        (*me, "mlp_norm", "bias"): ((hf + "final_layer_norm.bias",), _same),
    }
    if cross:
        c = hf + "encoder_attn."
        rules |= {
            (*me, "cross", "q"): ((c + "q_proj.weight",), _t),
            (*me, "cross", "q_bias"): ((c + "q_proj.bias",), _same),
            (*me, "cross", "kv"): ((c + "k_proj.weight", c + "v_proj.weight"), _cat_t),
            (*me, "cross", "kv_bias"): ((c + "k_proj.bias", c + "v_proj.bias"), _cat),
            (*me, "cross", "out"): ((c + "out_proj.weight",), _t),
            (*me, "cross", "out_bias"): ((c + "out_proj.bias",), _same),
            (*me, "cross_norm", "scale"): ((hf + "encoder_attn_layer_norm.weight",), _same),
            (*me, "cross_norm", "bias"): ((hf + "encoder_attn_layer_norm.bias",), _same),
        }
    return rules


def _marian_embeddings(tensors: dict, cfg: dict) -> tuple[str, str, bool, bool]:
    """Which tensors embed the encoder's and the decoder's tokens; whether they are one
    (shared) and whether the output head is tied to the decoder's.

    HF's Marian embeds each stack with its own embed_tokens, tied to "shared" when
    share_encoder_decoder_embeddings (transformers 5 unties everything, shared included, when
    tie_word_embeddings=False, so the copies can then differ). A stack's embed_tokens is used
    when present, else shared.weight; the two are one jaxdec "embed" when configured shared and
    equal. The head is tied per tie_word_embeddings, or, when the config does not say, iff
    lm_head.weight is absent or equals the decoder embedding.
    """
    share_flag = cfg.get("share_encoder_decoder_embeddings", MARIAN_DEFAULTS["share_encoder_decoder_embeddings"])

    def stack_embed(stack: str) -> str:
        for name in (f"{stack}.embed_tokens.weight", *(["shared.weight"] if share_flag else [])):
            if name in tensors:
                return name
        raise ValueError(f"missing tensors: {stack}.embed_tokens.weight"
                         + (" (or shared.weight)" if share_flag else ""))

    enc, dec = stack_embed("encoder"), stack_embed("decoder")
    share = bool(share_flag) and _equal(tensors[enc], tensors[dec])
    tie = cfg.get("tie_word_embeddings")
    head = tensors.get("lm_head.weight")
    if tie is None:
        tie = head is None or _equal(head, tensors[dec])
    elif tie and head is not None and not _equal(head, tensors[dec]):
        raise ValueError(f"lm_head.weight differs from {dec}, but the config ties them")
    return enc, dec, share, bool(tie)


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b)


def _marian_rules(config: Seq2SeqConfig, tensors: dict, enc: str, dec: str) -> dict[tuple, Rule]:
    """The Marian mapping table (module docstring)."""
    rules: dict[tuple, Rule] = {}
    if config.share_embeddings:
        rules[("embed",)] = ((enc,), _same)
    else:
        rules[("encoder", "embed")] = ((enc,), _same)
        rules[("decoder", "embed")] = ((dec,), _same)
    if not config.tie_embeddings:
        rules[("decoder", "head")] = (("lm_head.weight",), _t)
    rules[("decoder", "logits_bias")] = (("final_logits_bias",), _flat)
    for i in range(config.num_encoder_layers):
        rules |= _marian_layer_rules("encoder", i, cross=False)
    for i in range(config.num_decoder_layers):
        rules |= _marian_layer_rules("decoder", i, cross=True)
    return rules


def _check_positions(tensors: dict, d_model: int) -> None:
    """Marian's stored static tables must be our sinusoidal table (sines first, no offset)."""
    for name in _MARIAN_POSITIONS:
        if name not in tensors:
            continue
        table = tensors[name]
        if table.ndim != 2 or table.shape[1] != d_model:
            raise ValueError(f"{name} has shape {table.shape}, expected [positions, {d_model}]")
        ours = np.asarray(layers.sinusoidal(jnp.arange(table.shape[0])[None, :], d_model))[0]
        # HF builds the table in float64; ours is float32 (angle error ~1e-4 at position 1000).
        err = float(np.max(np.abs(table - ours))) if table.size else 0.0
        if err > 1e-3:
            raise ValueError(f"{name} is not the sinusoidal table jaxdec computes (max difference {err:.3g}): "
                             "positions would not match")


def from_marian(source, config=None) -> tuple[Seq2SeqConfig, dict]:
    """An HF Marian model (MarianMTModel or MarianModel weights, e.g. opus-mt) as a jaxdec
    Seq2SeqConfig and params.

    Args:
      source: a state dict {name: torch tensor or numpy array} (with or without "model."), or a
        local checkpoint folder (config.json + model.safetensors or pytorch_model.bin).
      config: the HF config (dict, MarianConfig or config.json path); for a folder it replaces
        config.json. For a bare state dict it must give encoder_attention_heads; other fields
        default to the shapes, then to MarianConfig's defaults (module docstring).

    Returns:
      (Seq2SeqConfig, params) laid out as `jaxdec.init_params(config, key)`.

    Raises:
      ValueError naming missing, unknown or misshapen tensors, a stored position table that is
      not ours, or a config jaxdec cannot express. ImportError for a .bin without torch.
    """
    tensors, cfg, _ = _resolve(source, config)
    tensors = _strip(tensors, "model.")
    model_type = cfg.get("model_type")
    if model_type not in (None, "marian"):
        raise ValueError(f"config model_type is {model_type!r}, expected 'marian' (use from_gpt2 for 'gpt2')")
    sconfig = _marian_config(tensors, cfg)
    _check_positions(tensors, sconfig.d_model)
    enc, dec, _, _ = _marian_embeddings(tensors, cfg)
    rules = _marian_rules(sconfig, tensors, enc, dec)
    # Embedding copies the model does not read: tied copies (checked equal above) and, when
    # each stack has its own embed_tokens, the unused "shared".
    copies = {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
              *(["lm_head.weight"] if sconfig.tie_embeddings else [])}
    used = {n for names, _ in rules.values() for n in names}
    V = sconfig.vocab_size
    params = _build(rules, tensors, _expected_tree(sconfig),
                    ignored=lambda n: n in _MARIAN_POSITIONS or (n in copies and n not in used),
                    optional={"final_logits_bias": np.zeros((1, V), np.float32)})
    _check_filled(params)
    return sconfig, _stack_layers(params)


# --- special ids and whole checkpoints ---------------------------------------------------------


def _single_id(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(set(value)) > 1:
            raise ValueError(f"{name}={value}: jaxdec decodes with a single eos id")
        return int(value[0]) if value else None
    return int(value)


def _special(model_type: str, settings: dict, vocab_size: int) -> SpecialIds:
    defaults = GPT2_DEFAULTS if model_type == "gpt2" else MARIAN_DEFAULTS
    get = lambda k: settings[k] if k in settings else defaults.get(k)  # noqa: E731
    eos = _single_id("eos_token_id", get("eos_token_id"))
    pad = _single_id("pad_token_id", get("pad_token_id"))
    if model_type == "gpt2":
        special = SpecialIds(eos_id=eos, pad_id=eos if pad is None else pad,
                             bos_id=_single_id("bos_token_id", get("bos_token_id")))
    else:
        start = _single_id("decoder_start_token_id", get("decoder_start_token_id"))
        special = SpecialIds(eos_id=eos, pad_id=pad, decoder_start_id=pad if start is None else start,
                             bos_id=_single_id("bos_token_id", get("bos_token_id")))
    for name in ("eos_id", "pad_id", "decoder_start_id"):  # the ids decoding uses
        value = getattr(special, name)
        if value is not None and not 0 <= value < vocab_size:
            raise ValueError(f"{name}={value} is outside the vocabulary [0, {vocab_size}): "
                             "pass config= with the model's special token ids")
    return special


def _model_type(cfg: dict, tensors: dict) -> str:
    model_type = cfg.get("model_type")
    if model_type is None:
        names = set(tensors)
        if any(n.endswith("wte.weight") for n in names):
            return "gpt2"
        if any("encoder.layers." in n for n in names):
            return "marian"
    if model_type not in ("gpt2", "marian"):
        raise ValueError(f"model_type {model_type!r} is not supported: jaxdec imports 'gpt2' and 'marian'")
    return model_type


def special_ids(source, config=None) -> SpecialIds:
    """eos / pad / decoder-start ids of a checkpoint folder (config.json, then
    generation_config.json, as HF's generate reads them) or of a config dict.

    For a state dict, only the config is read (HF defaults fill the gaps: GPT-2 eos 50256 and pad
    = eos; Marian eos 0, pad = decoder start = 58100); the tensors give the vocabulary size that
    the ids are checked against.
    """
    tensors, cfg, generation = _resolve(source, config)
    model_type = _model_type(cfg, tensors)
    vocab = _given(cfg, "vocab_size")
    if vocab is None:
        embeds = [t for n, t in tensors.items() if re.search(r"(wte|shared|embed_tokens)\.weight$", n)]
        vocab = embeds[0].shape[0] if embeds else 2**31 - 1
    return _special(model_type, generation, int(vocab))


def load_checkpoint(folder: str) -> Checkpoint:
    """A local GPT-2 or Marian checkpoint folder, dispatched on config.json's model_type."""
    tensors, cfg, generation = _resolve(folder, None)
    model_type = _model_type(cfg, tensors)
    convert = from_gpt2 if model_type == "gpt2" else from_marian
    config, params = convert(tensors, cfg)
    return Checkpoint(model_type=model_type, config=config, params=params,
                      special=_special(model_type, generation, config.vocab_size), generation=generation)
