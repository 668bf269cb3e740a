"""Reading a local Hugging Face checkpoint folder: weights, config.json, generation settings.

`load_state_dict(folder)` gives the folder's tensors as float32 numpy arrays under their HF names,
from model.safetensors, a sharded model.safetensors.index.json, pytorch_model.bin or a sharded
pytorch_model.bin.index.json. Nothing is ever downloaded. Reading safetensors needs only
`safetensors` and numpy (bfloat16 through `ml_dtypes`); a .bin needs torch.

`_resolve(source, config)` is what every entry point of `jaxdec.hf` starts with: a folder or a
state dict in, (tensors, config dict, generation settings) out.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Mapping

import numpy as np


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

