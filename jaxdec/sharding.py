"""Sharding over a device mesh: logical axis names for every array, one rules table, placement.

jaxdec writes no communication code: arrays carry a `NamedSharding`, `jax.jit` partitions the
program over the mesh (GSPMD / Shardy), and XLA inserts the collectives.

The mesh has three axes:
- `data`: the batch is split over it; parameters are replicated.
- `fsdp`: the batch is split over it too, and parameters and optimizer state are split along
  their model dimension D (ZeRO-3 / FSDP: gathered just in time inside the compiled step).
- `tensor`: attention heads, MLP hidden units and the vocabulary are split over it (Megatron).

Every dimension of every array has a logical name (`param_axes`, `cache_axes`), and `RULES`
maps each logical name to mesh axes. A mesh axis that does not divide the dimension (or that
an earlier dimension of the same array already uses) is dropped, so a dimension is replicated
rather than refused: GQA with 2 KV heads on `tensor=4` simply keeps its KV heads whole.

Parameters are named by their leaf key (`qkv`, `w_in`, ...), the same in params, optimizer
moments and accumulated gradients, so one table covers every tree that mirrors the params. A
leaf with one more dimension than its entry is a stack of layers (leading L axis).
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxdec import cache as kv_cache
from jaxdec import checks

PyTree = Any

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes it may be split over, in order. Unlisted logical names (and None)
# are never split: layers, positions, head_dim and, above all, cache_seq (a decode step writes
# one slot; splitting the slots would move the whole cache every step).
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
}

# Parameter leaf key -> logical axes of one layer's (or the model's) array. Fused projections
# (qkv [D, (N+2K)*H], kv [D, 2*K*H]) are split along their fused head features.
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "embed": ("vocab", "embed"),  # [V, D]
    "pos_embed": ("positions", "embed"),  # [max_len, D]
    "head": ("embed", "vocab"),  # [D, V]
    "logits_bias": ("vocab",),  # [V]
    "scale": ("embed",),  # a norm's [D] (qk-norm: [H], [N*H] or [K*H])
    "bias": ("embed",),
    "qkv": ("embed", "heads"),  # [D, (N+2K)*H]
    "qkv_bias": ("heads",),
    "q": ("embed", "heads"),  # [D, N*H]
    "q_bias": ("heads",),
    "kv": ("embed", "kv_heads"),  # [D, 2*K*H]
    "kv_bias": ("kv_heads",),
    "out": ("heads", "embed"),  # [N*H, D]
    "out_bias": ("embed",),
    "w_in": ("embed", "mlp"),  # [D, F]
    "b_in": ("mlp",),
    "w_gate": ("embed", "mlp"),  # [D, F]
    "b_gate": ("mlp",),
    "w_out": ("mlp", "embed"),  # [F, D]
    "b_out": ("embed",),
}

# KV cache / cross K/V fields -> logical axes ([L, B, K, S, H] and [B]).
CACHE_AXES: dict[str, tuple[str | None, ...]] = {
    "k": ("layers", "batch", "kv_heads", "cache_seq", "head_dim"),
    "v": ("layers", "batch", "kv_heads", "cache_seq", "head_dim"),
    "starts": ("batch",),
    "lengths": ("batch",),
    "end": (),
}


# ----------------------------------------------------------------------------------- mesh


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: every device of every process).

    Axis types are Auto: jit propagates shardings through the model and `RULES` pin the
    parameters, optimizer state, batch and cache (Explicit axes would need sharding annotations
    on every einsum in the model).

    Raises:
      ValueError: an axis size that is not a positive int, or sizes whose product differs from
        the device count.
    """
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        sizes[name] = checks.positive_int(f"mesh axis {name}", size)
    data, fsdp, tensor = sizes["data"], sizes["fsdp"], sizes["tensor"]
    devices = jax.devices() if devices is None else list(devices)
    if data * fsdp * tensor != len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} devices, "
            f"but {len(devices)} are available (simulate CPU devices with --num-cpu-devices or "
            "JAX_NUM_CPU_DEVICES)"
        )
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=2,tensor=2' -> {'data': 2, 'fsdp': 2, 'tensor': 2} (omitted axes are 1).

    Raises:
      ValueError: an unknown axis, a repeated axis, or a size that is not a positive integer.
    """
    sizes = {name: 1 for name in MESH_AXES}
    seen = set()
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        name = name.strip()
        if not sep or name not in sizes:
            raise ValueError(f"mesh entry {part.strip()!r} in {text!r}: expected AXIS=SIZE with AXIS "
                             f"one of {MESH_AXES}")
        if name in seen:
            raise ValueError(f"mesh axis {name} given twice in {text!r}")
        seen.add(name)
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"mesh axis {name} must be a positive integer, got {value.strip()!r}")
        sizes[name] = int(value)
    return sizes


# ------------------------------------------------------------------------------ the rules


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
                    fsdp_fallback: bool = False) -> PartitionSpec:
    """The PartitionSpec `RULES` give an array of `shape` with logical `axes` on `mesh`.

    Each dimension takes the mesh axes its logical name maps to, in order, skipping any whose
    size does not divide what remains of the dimension or that an earlier dimension took.
    With `fsdp_fallback` (parameters and optimizer state), an array that no rule split over
    `fsdp` (a bias [L, F], a vector [V]) is split over it along its largest dimension that
    stays divisible, the layer axis excepted: every array is then ZeRO-3 sharded. Mesh axes of
    size 1 divide everything, so the spec names what the rules ask for whatever the mesh sizes.
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
    used: set[str] = set()
    chosen: list[list[str]] = []
    for name, size in zip(axes, shape):
        chosen.append([])
        for axis in RULES.get(name, ()) if name is not None else ():
            if axis not in used and size % (_ways(chosen[-1], mesh) * mesh.shape[axis]) == 0:
                chosen[-1].append(axis)
                used.add(axis)
    if fsdp_fallback and "fsdp" not in used:
        fits = [i for i, (name, size) in enumerate(zip(axes, shape))
                if name != "layers" and size % (_ways(chosen[i], mesh) * mesh.shape["fsdp"]) == 0]
        if fits:
            chosen[max(fits, key=lambda i: shape[i] // _ways(chosen[i], mesh))].append("fsdp")
    # A dimension split over several mesh axes takes them in mesh order, so its blocks follow
    # device order. XLA 0.10's SPMD partitioner (Shardy and GSPMD alike) miscompiled the
    # transposed order: a gradient constrained to P(None, ("tensor", "fsdp")) on the (1, 2, 4)
    # mesh came out 0.06 off, while P(None, ("fsdp", "tensor")) was exact.
    chosen = [sorted(c, key=MESH_AXES.index) for c in chosen]
    return PartitionSpec(*[None if not c else c[0] if len(c) == 1 else tuple(c) for c in chosen])


def _ways(mesh_axes: list[str], mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in mesh_axes)


def _dict_keys(path) -> list[str]:
    return [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]


def param_axes(path, shape: tuple[int, ...]) -> tuple[str | None, ...]:
    """Logical axes of one parameter-like leaf, from its key path and shape.

    A leaf mirrors a parameter when its last dict key is in `PARAM_AXES` (params, Adam moments,
    accumulated gradients); one extra leading dimension under a `layers` key is the layer stack.
    Scalars (optimizer counters) have no axes.

    Raises:
      ValueError: a non-scalar leaf with no entry, or a rank that fits neither layout.
    """
    if len(shape) == 0:
        return ()
    keys = _dict_keys(path)
    where = jax.tree_util.keystr(tuple(path))
    if not keys or keys[-1] not in PARAM_AXES:
        raise ValueError(f"no logical axes for the array at {where} with shape {tuple(shape)}: "
                         f"add its leaf name to jaxdec.sharding.PARAM_AXES")
    axes = PARAM_AXES[keys[-1]]
    if len(shape) == len(axes) + 1 and "layers" in keys:
        return ("layers", *axes)
    if len(shape) != len(axes):
        raise ValueError(f"the array at {where} has shape {tuple(shape)}, but {keys[-1]!r} "
                         f"has logical axes {axes}")
    return axes


def tree_shardings(tree: PyTree, mesh: Mesh, axes_fn=param_axes) -> PyTree:
    """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by `axes_fn`."""

    def one(path, leaf):
        shape = tuple(np.shape(leaf))
        spec = logical_to_spec(axes_fn(path, shape), shape, mesh, fsdp_fallback=axes_fn is param_axes)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def cache_axes(path, shape: tuple[int, ...]) -> tuple[str | None, ...]:
    """Logical axes of a KVCache / CrossKV field (by its attribute name)."""
    name = path[-1].name if isinstance(path[-1], jax.tree_util.GetAttrKey) else None
    if name == "end" and len(shape) == 1:  # a per-row write slot (speculative decoding)
        return ("batch",)
    if name not in CACHE_AXES or len(CACHE_AXES[name]) != len(shape):
        raise ValueError(f"no logical axes for cache field {jax.tree_util.keystr(tuple(path))} "
                         f"with shape {tuple(shape)}")
    return CACHE_AXES[name]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Rows over data x fsdp (where they divide), every other dimension whole."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh))


def constrain(tree: PyTree, mesh: Mesh | None, axes_fn=param_axes) -> PyTree:
    """Inside jit: pins every leaf of `tree` to the sharding the rules give it (no-op without a
    mesh). Used on parameters, gradients, optimizer state, batches and caches so that XLA's
    propagation cannot drift between steps."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, tree_shardings(tree, mesh, axes_fn))


def batch_axes(path, shape: tuple[int, ...]) -> tuple[str | None, ...]:
    """Every batch array is [B, ...]: rows split, the rest whole."""
    return ("batch",) + (None,) * (len(shape) - 1) if shape else ()


# ------------------------------------------------------------------------------- placement


def shard_params(params: PyTree, mesh: Mesh) -> PyTree:
    """Places a parameter tree (or any tree mirroring it) on `mesh` by the rules."""
    return jax.device_put(params, tree_shardings(params, mesh))


def shard_cache(cache: PyTree, mesh: Mesh) -> PyTree:
    """Places a KVCache or CrossKV by the rules: batch over data x fsdp, KV heads over tensor,
    slots never split."""
    return jax.device_put(cache, tree_shardings(cache, mesh, cache_axes))


def _row_blocks(mesh: Mesh) -> tuple[int, int]:
    """(row blocks of a fully split batch, how many of them this process's devices hold)."""
    blocks = mesh.shape["data"] * mesh.shape["fsdp"]
    probe = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    local = {idx[0].start for idx in probe.addressable_devices_indices_map((blocks,)).values()}
    return blocks, len(local)


def process_rows(global_batch_size: int, mesh: Mesh) -> slice:
    """The rows of a [global_batch_size, ...] batch that this process feeds to its devices.

    One process: every row. With P processes the rows split over data x fsdp are split between
    the processes in mesh order (process p reads a contiguous block); a batch the mesh cannot
    split is read whole by every process.
    """
    sharding = batch_sharding(mesh, (global_batch_size,))
    index = sharding.addressable_devices_indices_map((global_batch_size,)).values()
    rows = sorted({(i[0].start or 0, global_batch_size if i[0].stop is None else i[0].stop) for i in index})
    for (_, stop), (start, _) in zip(rows, rows[1:]):
        if stop != start:
            raise ValueError(f"this process's rows {rows} of the batch are not contiguous on mesh {mesh.shape}")
    return slice(rows[0][0], rows[-1][1])


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Places a batch dict of [B_local, ...] arrays as global arrays split over data x fsdp.

    Args:
      batch: arrays whose rows are this process's rows (`process_rows`); one process: all rows.
      mesh: the (data, fsdp, tensor) mesh.

    Returns:
      the same dict of global jax.Arrays [B, ...], B = B_local x processes sharing the batch.

    Raises:
      ValueError: with several processes, rows that do not split evenly over data x fsdp.
    """
    if jax.process_count() == 1:
        return {k: jax.device_put(v, batch_sharding(mesh, np.shape(v))) for k, v in batch.items()}
    blocks, local_blocks = _row_blocks(mesh)
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.shape[0] % local_blocks:
            raise ValueError(f"batch[{name!r}] has {value.shape[0]} rows on this process, not a "
                             f"multiple of its {local_blocks} row blocks (data x fsdp = {blocks})")
        global_shape = (value.shape[0] * blocks // local_blocks, *value.shape[1:])
        sharding = batch_sharding(mesh, global_shape)
        if sharding.spec[0] is None or math.prod(
                mesh.shape[a] for a in np.atleast_1d(sharding.spec[0])) != blocks:
            raise ValueError(f"global batch of {global_shape[0]} rows does not split over "
                             f"data x fsdp = {blocks}; use a batch size divisible by {blocks}")
        out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def bytes_per_device(tree: PyTree) -> dict:
    """Bytes of `tree` held by each device (addressable shards), by device id, and the total
    bytes of the logical arrays."""
    per_device: dict[int, int] = {}
    total = 0
    for leaf in jax.tree.leaves(tree):
        total += leaf.size * leaf.dtype.itemsize
        for shard in leaf.addressable_shards:
            per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    return {"per_device": per_device, "total": total}


# --------------------------------------------------------------------------- processes


def init_devices(num_cpu_devices: int | None = None, coordinator_address: str | None = None,
                 num_processes: int | None = None, process_id: int | None = None,
                 auto_detect: bool = False) -> None:
    """Sets up this process's devices and joins a multi-process run; call before any JAX work.

    Args:
      num_cpu_devices: simulate this many CPU devices (as JAX_NUM_CPU_DEVICES does).
      coordinator_address, num_processes, process_id: join a run of `num_processes` processes
        through the coordinator at host:port (process 0 serves it). Each falls back to the
        environment variable JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
      auto_detect: call `jax.distributed.initialize()` with no arguments: JAX reads the cluster's
        own variables (SLURM, Open MPI, Kubernetes, Cloud TPU).

    Raises:
      ValueError: a device count that can no longer be set (JAX already started), or a partial
        or inconsistent process setup, before anything is run.
    """
    if num_cpu_devices is not None:
        num_cpu_devices = checks.positive_int("num_cpu_devices", num_cpu_devices)
        try:
            jax.config.update("jax_num_cpu_devices", num_cpu_devices)
        except RuntimeError as err:
            if jax.local_device_count() != num_cpu_devices:
                raise ValueError(
                    f"num_cpu_devices={num_cpu_devices} must be set before JAX starts; this process "
                    f"already runs on {jax.local_device_count()} devices"
                ) from err
    env = {"coordinator_address": os.environ.get("JAX_COORDINATOR_ADDRESS"),
           "num_processes": os.environ.get("JAX_NUM_PROCESSES"),
           "process_id": os.environ.get("JAX_PROCESS_ID")}
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    setup = {k: v if v is not None else env[k] for k, v in given.items()}
    if auto_detect:
        jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
        return
    if all(v is None for v in setup.values()):
        return
    missing = [k for k, v in setup.items() if v is None]
    if missing:
        raise ValueError(f"a multi-process run needs coordinator_address, num_processes and "
                         f"process_id (flags or JAX_* variables); missing {missing}")
    try:
        count, index = int(setup["num_processes"]), int(setup["process_id"])
    except ValueError as err:
        raise ValueError(f"num_processes and process_id must be integers, got "
                         f"{setup['num_processes']!r} and {setup['process_id']!r}") from err
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process_id must lie in [0, num_processes), got process_id={index}, "
                         f"num_processes={count}")
    if count > 1:
        jax.distributed.initialize(setup["coordinator_address"], count, index)


# ----------------------------------------------------------------------------- decoding


def _is_cache(x) -> bool:
    return isinstance(x, (kv_cache.KVCache, kv_cache.CrossKV))


def constrain_caches(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """Inside jit: pins every KVCache / CrossKV found in `tree` (a decode loop's state) to the
    rules (batch over data x fsdp, KV heads over tensor, slots whole); other leaves untouched.
    Applied to the loop's carry on the way in and out of each step, it keeps the cache where it
    is for the whole loop."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: constrain(x, mesh, cache_axes) if _is_cache(x) else x, tree,
                        is_leaf=_is_cache)


def sharded_step(step_fn, mesh: Mesh | None):
    """A step function (..) -> (logits, cache) whose returned cache is pinned to the rules."""
    if mesh is None:
        return step_fn

    def step(*args):
        logits, cache = step_fn(*args)
        return logits, constrain_caches(cache, mesh)

    return step


def constrain_decode_inputs(mesh: Mesh | None, params: PyTree, batch_arrays: tuple) -> tuple:
    """Inside jit: params by the rules, and every [B, ...] input (None allowed) over data x fsdp."""
    if mesh is None:
        return params, batch_arrays
    return constrain(params, mesh), constrain(batch_arrays, mesh, batch_axes)
