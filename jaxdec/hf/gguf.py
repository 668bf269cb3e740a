"""Reading a llama.cpp GGUF file as Hugging Face tensors, config, tokenizer and chat template.

`read_gguf(path)` gives a `GGUFModel`: the tensors under the names a transformers
`save_pretrained` folder would use (float32 numpy, torch `nn.Linear` layout [out, in]), a config
dict shaped like that folder's config.json, a `tokenizers.Tokenizer` built from the file's
vocabulary, and the chat template. The importers of `jaxdec.hf` take it from there, exactly as
they would a checkpoint folder. Reading needs the `gguf` package (llama.cpp's gguf-py) and numpy;
the tokenizer needs `tokenizers`; `render_chat` needs `jinja2`. Nothing is downloaded.

What llama.cpp's converter (convert_hf_to_gguf.py) changed, and is undone here as transformers
does it (transformers/modeling_gguf_pytorch_utils.py, integrations/ggml.py):
  - names: `blk.{i}.attn_q.weight` -> `model.layers.{i}.self_attn.q_proj.weight`, ... (`_BLOCK_NAMES`)
  - llama architecture (which includes Mistral): the rows of attn_q / attn_k (weights and biases)
    are permuted per head for llama.cpp's interleaved RoPE; `_unpermute_rows` restores HF's
    rotate-half order.
  - gemma2 / gemma3: every norm weight is stored as w + 1; 1 is subtracted.
  - the config lives in metadata keys (`llama.embedding_length`, ...), mapped in `_config`.
  - a tied output head is stored once: no `output.weight` means `tie_word_embeddings`.
  - Llama 3.x RoPE scaling is stored as a `rope_freqs.weight` tensor of per-frequency factors;
    `_llama3_rope_scaling` recovers the HF `rope_scaling` dict and checks it reproduces them.

Architectures: llama (and Mistral, which llama.cpp writes as llama), qwen2, qwen3, gemma2,
gemma3 (its text model). Tokenizers: byte-level BPE (`tokenizer.ggml.model == "gpt2"`: SmolLM,
Llama 3, Qwen, Mistral Nemo, ...). SentencePiece vocabularies ("llama": Llama 2, Mistral 7B, Gemma)
are not built: `tokenizer` is then None and a warning names the type.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import struct
import warnings
from typing import Any, Mapping, NamedTuple

import numpy as np

# --------------------------------------------------------------------------------------------
# The file format: metadata and tensor table, parsed directly.
#
# gguf-py's GGUFReader builds a numpy memmap view per metadata string, a cost that grows with the
# vocabulary; this parser reads the same layout (ggml/docs/gguf.md, versions 2 and 3,
# little-endian) with struct into plain Python values and hands the block data to gguf-py's
# dequantizers. tests/test_gguf.py compares it with GGUFReader.

# metadata value type id -> struct format / numpy dtype (u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64)
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_DTYPES = {k: np.dtype(f.replace("<?", "?")) for k, f in _SCALAR_FORMATS.items()}
_STRING, _ARRAY = 8, 9


class RawTensor(NamedTuple):
    """One tensor as stored: the same attributes as gguf-py's ReaderTensor.

    shape is in ggml order (fastest-moving dimension first); data is float32 / float16 in numpy
    order for F32 / F16, otherwise the raw bytes, one row of blocks per numpy row.
    """

    name: str
    shape: tuple[int, ...]
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray


def _read_string(buf, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    pos += 8
    return bytes(buf[pos:pos + n]).decode("utf-8"), pos + n


def _read_value(buf, pos: int, vtype: int):
    if vtype in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if vtype == _STRING:
        return _read_string(buf, pos)
    if vtype == _ARRAY:
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _NUMPY_DTYPES:
            dtype = _NUMPY_DTYPES[etype]
            values = np.frombuffer(buf, dtype=dtype, count=count, offset=pos).tolist()
            return values, pos + count * dtype.itemsize
        values = []
        for _ in range(count):
            v, pos = _read_value(buf, pos, etype)
            values.append(v)
        return values, pos
    raise ValueError(f"GGUF metadata value type {vtype} at byte {pos} is unknown; expected 0-12")


def read_raw(path: str) -> tuple[dict[str, Any], dict[str, RawTensor]]:
    """(metadata, {name: RawTensor}) of a GGUF file; tensor data stays memory-mapped."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    buf = np.memmap(path, mode="r", dtype=np.uint8)
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{path} starts with {bytes(buf[:4])!r}; expected the GGUF magic b'GGUF'")
    (version,) = struct.unpack_from("<I", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"{path} is GGUF version {version} (or big-endian); expected little-endian 2 or 3")
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos = 24
    fields: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = _read_string(buf, pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        fields[key], pos = _read_value(buf, pos + 4, vtype)

    infos = []
    for _ in range(n_tensors):
        name, pos = _read_string(buf, pos)
        (ndim,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{ndim}Q", buf, pos + 4)
        ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * ndim)
        pos += 4 + 8 * ndim + 12
        infos.append((name, tuple(int(d) for d in dims), ttype, offset))
    align = int(fields.get("general.alignment", 32))
    start = (pos + align - 1) // align * align

    tensors = {}
    for name, dims, ttype, offset in infos:
        try:
            qtype = GGMLQuantizationType(ttype)
        except ValueError:
            raise ValueError(
                f"tensor {name!r} has ggml type id {ttype}, unknown to the installed gguf package"
            ) from None
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise ValueError(
                f"tensor {name!r}: row length {dims[0]} is not a multiple of the {qtype.name} block size {block}"
            )
        rows = tuple(reversed(dims[1:]))
        nbytes = math.prod(dims) // block * block_bytes
        raw = buf[start + offset:start + offset + nbytes]
        if raw.shape[0] != nbytes:
            raise ValueError(f"{path} is truncated: tensor {name!r} needs {nbytes} bytes at {start + offset}")
        if qtype.name == "F32":
            data = raw.view(np.float32).reshape(*rows, dims[0])
        elif qtype.name == "F16":
            data = raw.view(np.float16).reshape(*rows, dims[0])
        else:
            data = raw.reshape(*rows, dims[0] // block * block_bytes)
        tensors[name] = RawTensor(name, dims, qtype, data)
    return fields, tensors


# --------------------------------------------------------------------------------------------
# Tensor types

# ggml type names whose dequantization to float32 is supported: plain floats, the legacy block
# quants and the K-quants. The tests check the block formats against hand-written references.
SUPPORTED_TYPES = frozenset({
    "F32", "F16", "BF16",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
})


def _numpy_shape(tensor) -> tuple[int, ...]:
    """GGUF lists dimensions fastest-moving first (ggml's ne[]); numpy wants them the other way."""
    return tuple(int(d) for d in reversed([int(x) for x in tensor.shape]))


def _check_type(name: str, tensor) -> None:
    type_name = tensor.tensor_type.name
    if type_name not in SUPPORTED_TYPES:
        raise ValueError(
            f"tensor {name!r} has ggml type {type_name}, which cannot be dequantized here; "
            f"expected one of {sorted(SUPPORTED_TYPES)}"
        )


def dequantize(name: str, tensor) -> np.ndarray:
    """A stored tensor (`RawTensor`, or gguf-py's ReaderTensor) as float32 in its numpy shape.

    The block formats are decoded by gguf-py's `gguf.quants.dequantize`, llama.cpp's own numpy
    port. The result is a fresh array: the stored data is a view of the memory-mapped file.
    """
    from gguf import quants

    _check_type(name, tensor)
    data = np.asarray(tensor.data)
    if tensor.tensor_type.name in ("F32", "F16"):
        values = data.astype(np.float32)  # a copy, also for F32
    else:
        values = np.asarray(quants.dequantize(data, tensor.tensor_type), dtype=np.float32)
    return values.reshape(_numpy_shape(tensor))


# --------------------------------------------------------------------------------------------
# Names

# llama.cpp's block tensor names -> the HF module path inside `model.layers.{i}`. The norms are
# per family: in Llama `post_attention_layernorm` is the norm before the MLP (llama.cpp's
# ffn_norm); Gemma 2/3 have four norms per block (sandwich norms).
_ATTN_MLP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_GEMMA_NORMS = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_NAMES = {
    "llama": {**_ATTN_MLP, **_LLAMA_NORMS},
    "qwen2": {**_ATTN_MLP, **_LLAMA_NORMS},
    "qwen3": {**_ATTN_MLP, **_LLAMA_NORMS},
    "gemma2": {**_ATTN_MLP, **_GEMMA_NORMS},
    "gemma3": {**_ATTN_MLP, **_GEMMA_NORMS},
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Tensors that are not parameters of the HF model: consumed into the config instead.
_CONFIG_TENSORS = frozenset({"rope_freqs.weight"})

SUPPORTED_ARCHITECTURES = tuple(_BLOCK_NAMES)

_BLOCK_RE = re.compile(r"blk\.(\d+)\.([A-Za-z0-9_]+)\.(weight|bias)")
_TOP_RE = re.compile(r"([A-Za-z0-9_]+)\.(weight|bias)")


def hf_name(arch: str, gguf_name: str) -> str | None:
    """The HF parameter name for a GGUF tensor name, or None when the architecture has none."""
    if m := _BLOCK_RE.fullmatch(gguf_name):
        layer, leaf, kind = m.groups()
        module = _BLOCK_NAMES[arch].get(leaf)
        return None if module is None else f"model.layers.{layer}.{module}.{kind}"
    if m := _TOP_RE.fullmatch(gguf_name):
        leaf, kind = m.groups()
        module = _TOP_NAMES.get(leaf)
        return None if module is None else f"{module}.{kind}"
    return None


# --------------------------------------------------------------------------------------------
# Value transforms


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `LlamaModel.permute` of attn_q / attn_k rows (and biases).

    llama.cpp rotates adjacent channel pairs (2i, 2i+1); HF rotates i with i + head_dim/2. The
    converter reorders each head's rows from [first half; second half] to interleaved pairs;
    this is the inverse, identical to transformers' `_reverse_permute_weights`.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot un-permute {rows} rows into {n_head} heads; expected a multiple of {2 * n_head}")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_hf_values(arch: str, gguf_name: str, w: np.ndarray, config: Mapping) -> np.ndarray:
    """Per-family value changes llama.cpp made on conversion, reversed (see the module docstring)."""
    if arch == "llama":
        if ".attn_q." in gguf_name:
            return _unpermute_rows(w, config["num_attention_heads"])
        if ".attn_k." in gguf_name:
            return _unpermute_rows(w, config["num_key_value_heads"])
    if arch in ("gemma2", "gemma3") and gguf_name.endswith("norm.weight"):
        return w - np.float32(1.0)  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w
    return w


# --------------------------------------------------------------------------------------------
# Metadata and config


_BIG_ARRAY = 256  # arrays longer than this (vocabularies, merges) are left out of `metadata`


def _scalar_metadata(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if not (isinstance(v, list) and len(v) > _BIG_ARRAY)}


def _model_type(arch: str, name: str | None) -> str:
    """The HF model_type. llama.cpp writes Mistral as llama; the model's name tells them apart.

    transformers requires general.name to equal "mistral" exactly; any name containing it
    (case-insensitive) is taken here, since the files in the wild say "Mistral-7B-Instruct-v0.3".
    """
    if arch not in _BLOCK_NAMES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; expected one of {list(_BLOCK_NAMES)}")
    if arch == "llama" and name and "mistral" in name.lower():
        return "mistral"
    return {"gemma3": "gemma3_text"}.get(arch, arch)


def _one_int(key: str, value) -> int:
    """A per-layer list (some files store head counts per layer) must be uniform to fit HF configs."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"{key} varies per layer ({value}); expected one value for all layers")
        value = value[0]
    return int(value)


# GGUF key (after the "{arch}." prefix) -> HF config field, for every supported architecture
# (transformers' GGUF_CONFIG_MAPPING; head_dim is handled in `_head_dim`).
_COMMON_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
_INT_FIELDS = {"max_position_embeddings", "num_hidden_layers", "intermediate_size", "hidden_size",
               "num_attention_heads", "num_key_value_heads", "vocab_size"}
_REQUIRED = ("block_count", "embedding_length", "attention.head_count")
_TOKEN_IDS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}


def _head_dim(arch: str, fields: Mapping[str, Any]) -> int | None:
    """head_dim when the file states it.

    attention.key_length is written by llama.cpp whenever head_dim != hidden/heads (Qwen3,
    Gemma). For llama, transformers reads rope.dimension_count, which llama.cpp always writes and
    which equals head_dim there (llama has no partial rotary); both must agree when both exist.
    """
    key_length = fields.get(f"{arch}.attention.key_length")
    value_length = fields.get(f"{arch}.attention.value_length")
    if key_length is not None and value_length is not None and value_length != key_length:
        raise ValueError(f"{arch}.attention.value_length={value_length} != key_length={key_length}; expected equal")
    rope_dims = fields.get(f"{arch}.rope.dimension_count") if arch == "llama" else None
    if key_length is not None and rope_dims is not None and key_length != rope_dims:
        raise ValueError(
            f"{arch}.rope.dimension_count={rope_dims} != attention.key_length={key_length}: partial rotary "
            "embeddings cannot be expressed in a llama config"
        )
    value = key_length if key_length is not None else rope_dims
    return None if value is None else int(value)


def _rope_scaling(arch: str, fields: Mapping[str, Any]) -> dict | None:
    """`rope_scaling` from {arch}.rope.scaling.* (linear, yarn), or None."""
    kind = fields.get(f"{arch}.rope.scaling.type")
    factor = fields.get(f"{arch}.rope.scaling.factor", fields.get(f"{arch}.rope.scale_linear"))
    if kind is None and factor is not None:
        kind = "linear"  # old files: rope.scale_linear alone
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        if factor is None:
            raise ValueError(f"{arch}.rope.scaling.type is yarn but rope.scaling.factor is missing; expected both")
        out = {"rope_type": "yarn", "factor": float(factor)}
        orig = fields.get(f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            out["original_max_position_embeddings"] = int(orig)
        for key, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if (v := fields.get(f"{arch}.rope.scaling.{key}")) is not None:
                out[hf] = float(v)
        return out
    raise ValueError(f"{arch}.rope.scaling.type={kind!r} is not supported; expected none, linear or yarn")


def _llama3_factors(theta: float, head_dim: int, factor: float, low: float, high: float, orig: int) -> np.ndarray:
    """llama.cpp's rope_freqs for HF's llama3 scaling (convert_hf_to_gguf.py, LlamaModel)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (orig / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, mid))


def _llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int) -> dict | None:
    """The HF llama3 `rope_scaling` whose llama.cpp factors are `factors`, or None if all are 1.

    The file keeps only the factors, not the four parameters that made them. The released
    Llama 3.x models use low 1, high 4, original context 8192 (factor 8 or 32); a few other
    values are tried too, and a candidate is accepted only if it reproduces every factor.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.shape[0] != head_dim // 2:
        raise ValueError(f"rope_freqs.weight has {factors.shape[0]} factors; expected head_dim/2 = {head_dim // 2}")
    if np.all(factors == 1.0):
        return None
    factor = float(factors.max())
    for orig in (8192, 4096, 16384, 32768, 2048):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)):
            if np.allclose(_llama3_factors(theta, head_dim, factor, low, high, orig), factors, rtol=1e-5, atol=0):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": orig}
    raise ValueError(
        "rope_freqs.weight holds per-frequency RoPE factors that match no llama3 rope_scaling "
        f"(factor {factor}, tried original contexts 2048-32768, low/high 1-8); expected llama3-style factors"
    )


def _config(arch: str, model_type: str, fields: Mapping[str, Any], tensor_names: list[str],
            rope_freqs: np.ndarray | None) -> dict:
    """The HF config.json-like dict the metadata describes."""
    missing = [f"{arch}.{k}" for k in _REQUIRED if f"{arch}.{k}" not in fields]
    if missing:
        raise ValueError(f"GGUF metadata lacks {missing}; expected every {arch} file to state them")
    cfg: dict[str, Any] = {"model_type": model_type}
    for key, hf in _COMMON_KEYS.items():
        if (v := fields.get(f"{arch}.{key}")) is not None:
            cfg[hf] = _one_int(f"{arch}.{key}", v) if hf in _INT_FIELDS else float(v)
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    # llama.cpp's own default when a file omits the base (llama_model_loader: 10000).
    cfg.setdefault("rope_theta", 10000.0)
    if "vocab_size" not in cfg and "tokenizer.ggml.tokens" in fields:
        cfg["vocab_size"] = len(fields["tokenizer.ggml.tokens"])
    if (head_dim := _head_dim(arch, fields)) is not None:
        cfg["head_dim"] = head_dim
    cfg["tie_word_embeddings"] = "output.weight" not in tensor_names
    for key, hf in _TOKEN_IDS.items():
        if (v := fields.get(key)) is not None:
            cfg[hf] = int(v)
    scaling = _rope_scaling(arch, fields)
    if rope_freqs is not None:
        if scaling is not None:
            raise ValueError(f"file has both rope_freqs.weight and {arch}.rope.scaling.*; expected one")
        hd = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
        scaling = _llama3_rope_scaling(rope_freqs, cfg["rope_theta"], hd)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    cfg.update(_family_config(arch, model_type, fields, tensor_names, cfg))
    return cfg


def _family_config(arch: str, model_type: str, fields: Mapping[str, Any], tensor_names: list[str],
                   cfg: Mapping[str, Any]) -> dict:
    """Fields that exist in one family's HF config only."""
    has = lambda leaf: any(n.endswith(leaf) for n in tensor_names)  # noqa: E731
    if arch in ("llama", "qwen3"):
        out = {"hidden_act": "silu", "attention_bias": has(".attn_q.bias")}
        if arch == "llama":
            out["mlp_bias"] = has(".ffn_up.bias")
        if model_type == "mistral":
            out["sliding_window"] = None  # llama.cpp runs llama-arch files with full attention
        return out
    if arch == "qwen2":
        return {"hidden_act": "silu"}
    # Gemma 2 / 3. query_pre_attn_scalar is not in the file: llama.cpp derives the attention
    # scale from the model size (llama-model.cpp: the 27B models use hidden/heads, the others
    # head_dim), which is what their HF configs say. Block counts 46 and 62 are the 27B models.
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    big = cfg["num_hidden_layers"] == {"gemma2": 46, "gemma3": 62}[arch]
    out = {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": cfg["hidden_size"] // cfg["num_attention_heads"] if big else head_dim,
    }
    if (w := fields.get(f"{arch}.attention.sliding_window")) is not None:
        out["sliding_window"] = int(w)
    if arch == "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if (v := fields.get(f"gemma2.{key}")) is not None:
                out[key] = float(v)
        return out
    # gemma3: llama.cpp fixes the local RoPE base at 10000 and the pattern at 5 local : 1 global,
    # and uses no local layers when the file states no sliding window (llama-model.cpp).
    pattern = 6
    local = bool(out.get("sliding_window"))
    out.update({
        "rope_local_base_freq": 10000.0,
        "sliding_window_pattern": pattern,
        "layer_types": ["sliding_attention" if local and (i + 1) % pattern else "full_attention"
                        for i in range(cfg["num_hidden_layers"])],
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    })
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types (tokenizer.ggml.token_type)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level vocabularies are spelled."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the regexes llama.cpp splits with (llama-vocab.cpp), applied in order.
# The single-regex entries are transformers' GGUF table (gguf_tokenizer_mapping.py). The
# digit-first group ("\p{N}" isolated, then GPT-2's regex) is llama.cpp's for SmolLM, StarCoder
# and others; transformers leaves those at plain GPT-2, which differs when two or more
# whitespace characters precede a digit ("\n\n1." tokenizes as "ĊĊ","1" here and in llama.cpp).
# Types not listed (llama.cpp's "default", deepseek, falcon, ...) split with other regex sets in
# llama.cpp; they get GPT-2's regex, as in transformers, with a warning.
_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    **{k: (_LLAMA3_SPLIT,) for k in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                                     "midm-2.0", "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe")},
    **{k: (_QWEN2_SPLIT,) for k in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez")},
    "qwen35": (_QWEN35_SPLIT,),
    "tekken": (_TEKKEN_SPLIT,),
    **{k: (_GPT4O_SPLIT,) for k in ("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2")},
    **{k: (r"\p{N}", _GPT2_SPLIT) for k in ("smollm", "starcoder", "refact", "command-r", "codeshell",
                                            "exaone", "minerva")},
    **{k: (_GPT2_SPLIT,) for k in ("gpt-2", "mpt", "olmo", "jais", "trillion", "granite-docling")},
}


# llama.cpp's LLAMA3 pre-type group: a word that is itself a token is taken whole, without
# merges (tokenizer.json's "ignore_merges": true), and BOS is added unless the file says not to.
_LLAMA3_GROUP = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                           "lfm2", "jina-v5-nano"})


def _pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers

    if pre is None or pre not in _PRE_SPLITS:
        if pre is not None:
            warnings.warn(
                f"tokenizer.ggml.pre={pre!r} is not a pre-tokenizer known here; splitting with GPT-2's "
                f"regex as transformers does (known: {sorted(_PRE_SPLITS)})",
                stacklevel=3,
            )
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_SPLITS[pre]]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def build_tokenizer(fields: Mapping[str, Any]):
    """A `tokenizers.Tokenizer` from the tokenizer.ggml.* metadata (byte-level BPE only).

    Mirrors transformers' GGUF converter (integrations/gguf/gguf_tokenizer_mapping.py): tokens
    not spelled in GPT-2's byte alphabet are respelled; control tokens (and the bos/eos/unk/pad
    tokens) are special, so they encode as one id wherever they occur and are skipped by
    `decode(..., skip_special_tokens=True)`; user-defined tokens are added whole but not special.
    A BOS/EOS post-processor is set when tokenizer.ggml.add_bos_token / add_eos_token say so
    (for llama.cpp's LLAMA3 pre-types BOS is on unless the file says otherwise, as in llama.cpp).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model={kind!r} is not supported; expected 'gpt2' (byte-level BPE)")
    tokens = list(fields["tokenizer.ggml.tokens"])
    merges = fields.get("tokenizer.ggml.merges")
    if merges is None:
        raise ValueError("tokenizer.ggml.merges is missing; expected the merge list of a byte-level BPE vocabulary")
    types = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    pre_type = fields.get("tokenizer.ggml.pre")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                               ignore_merges=pre_type in _LLAMA3_GROUP))
    tok.pre_tokenizer = _pre_tokenizer(pre_type)
    tok.decoder = decoders.ByteLevel()

    named = {int(fields[k]) for k in _TOKEN_IDS if fields.get(k) is not None}
    # A "control" token spelled outside the byte alphabet is a llama.cpp mislabel (transformers
    # skips those too): adding it would create a new id past the vocabulary.
    special = [i for i, (t, y) in enumerate(zip(tokens, types))
               if (y == _CONTROL and set(t) <= alphabet) or i in named]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(set(special))])
    # user-defined tokens spelled outside the alphabet are skipped for the same reason (transformers too)
    user = [i for i, (t, y) in enumerate(zip(tokens, types)) if y == _USER_DEFINED and set(t) <= alphabet]
    if user:
        tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
    for i in special + user:
        if tok.token_to_id(tokens[i]) != i:
            raise ValueError(f"added token {tokens[i]!r} maps to id {tok.token_to_id(tokens[i])}; expected {i}")

    bos, eos = fields.get("tokenizer.ggml.bos_token_id"), fields.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", pre_type in _LLAMA3_GROUP)) and bos is not None
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        pre = [f"{tokens[bos]}:0"] if add_bos else []
        post = [f"{tokens[eos]}:0"] if add_eos else []
        single = " ".join([*pre, "$A:0", *post])
        second = [x.replace(":0", ":1") for x in pre] + ["$B:1"] + [x.replace(":0", ":1") for x in post]
        pair = single + " " + " ".join(second)
        specials = sorted({(tokens[i], i) for i, on in ((bos, add_bos), (eos, add_eos)) if on})
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return tok


# --------------------------------------------------------------------------------------------
# Chat template


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **context) -> str:
    """Render a chat template as transformers' `apply_chat_template(..., tokenize=False)` does.

    Same jinja2 set-up (utils/chat_template_utils.py): a sandboxed environment with trim_blocks
    and lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, and a `tojson` that does
    not escape HTML. Templates are untrusted text from the file, hence the sandbox. `context`
    passes further variables (tools, documents, ...) to the template.
    """
    import json
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=bos_token, eos_token=eos_token, **context,
    )


# --------------------------------------------------------------------------------------------
# The file


@dataclasses.dataclass(frozen=True)
class GGUFModel:
    """A GGUF file in Hugging Face terms (see the module docstring)."""

    model_type: str
    config: dict
    tensors: dict
    tokenizer: Any  # tokenizers.Tokenizer, or None for a vocabulary type not built here
    chat_template: str | None
    metadata: dict


def read_gguf(path: str) -> GGUFModel:
    """Read a GGUF file: HF-named float32 tensors, HF config dict, tokenizer, chat template.

    All checks (architecture, tensor names, tensor types) run before any tensor is dequantized.
    """
    path = os.fspath(path)
    fields, by_name = read_raw(path)
    arch = fields.get("general.architecture")
    if arch is None:
        raise ValueError(f"{path} has no general.architecture; expected one of {list(_BLOCK_NAMES)}")
    model_type = _model_type(arch, fields.get("general.name"))

    names = {n: hf_name(arch, n) for n in by_name if n not in _CONFIG_TENSORS}
    unknown = sorted(n for n, h in names.items() if h is None)
    if unknown:
        raise ValueError(f"{path}: tensors {unknown[:8]}{' ...' if len(unknown) > 8 else ''} have no HF name "
                         f"for architecture {arch!r}; expected only llama.cpp's {arch} tensors")
    for n, t in by_name.items():
        _check_type(n, t)

    rope_freqs = by_name.get("rope_freqs.weight")
    rope_freqs = None if rope_freqs is None else dequantize("rope_freqs.weight", rope_freqs)
    config = _config(arch, model_type, fields, list(by_name), rope_freqs)
    tensors = {h: _to_hf_values(arch, n, dequantize(n, by_name[n]), config) for n, h in names.items()}

    tokenizer = None
    if fields.get("tokenizer.ggml.model") == "gpt2":
        tokenizer = build_tokenizer(fields)
    elif "tokenizer.ggml.tokens" in fields:
        warnings.warn(f"{path}: tokenizer.ggml.model={fields.get('tokenizer.ggml.model')!r} is not built here "
                      "(only 'gpt2', byte-level BPE); GGUFModel.tokenizer is None", stacklevel=2)
    return GGUFModel(
        model_type=model_type,
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        chat_template=fields.get("tokenizer.chat_template"),
        metadata=_scalar_metadata(fields),
    )
