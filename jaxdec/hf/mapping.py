"""The mapping engine shared by the GPT-2 and Marian importers: config helpers and rules.

A mapping is a table of rules {jaxdec path: (HF names, transform)}: the path addresses one leaf of
the params tree, with stacked layers addressed per layer as ("layers", i, ...); the transform
(`_same`, `_t`, `_cat_t`, `_cat`, `_flat`) turns the named HF tensors into that leaf. `_build`
applies a table against the tree `init_params` would build (`_expected_tree`, shapes only), names
every missing, unknown or misshapen tensor in one ValueError, and `_stack_layers` turns the
per-layer lists back into the stacked [L, ...] layout. The tables themselves are in
`jaxdec/hf/gpt2.py` and `jaxdec/hf/marian.py`.

The config helpers read an HF config dict the way both importers do: a field absent or None is
not given (`_given`), head counts must be given (`_heads`), layer counts and widths are inferred
from tensor names and shapes (`_count_layers`, `_need`), activations map through ACTIVATIONS.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.api import init_params
from jaxdec.model import stack_blocks

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
