"""Checkpoints of a training-state pytree: save, find the latest, restore with fallback.

Layout: one directory per step, ``directory/<step>/``, written by orbax-checkpoint's
synchronous ``Checkpointer(StandardCheckpointHandler())``. Orbax writes each step into
``<step>.orbax-checkpoint-tmp`` and renames it when complete, so a directory whose name is
all digits is a finished write; the tmp directory of a crashed save is never listed.

Why not ``ocp.CheckpointManager``: it silently skips (returns False for) a save whose step is
not above the newest one on disk, which is exactly what happens after resuming from an
older checkpoint because the newest one was corrupt. Listing and pruning steps ourselves is
a few lines and keeps that path explicit.

Integrity: orbax/tensorstore detects missing or truncated files and damaged index nodes, but a
flipped bit inside array data restored silently with a wrong value in our tests (orbax
0.12.8). So ``save`` also records, per leaf, its path, dtype, shape and a SHA-256 of its
bytes in the checkpoint's own metadata (written inside the same atomic rename), and
``restore`` checks them. A checkpoint that fails to load or to verify is "corrupt".

PRNG keys: typed keys (``jax.random.key``) are stored as their raw ``uint32`` key data and
re-wrapped with the template's key implementation on restore; raw ``jax.random.PRNGKey``
arrays are plain ``uint32`` arrays already.

Meshes: arrays are saved shard by shard from wherever they live, and ``restore`` reads them
into the template's shardings, so a state saved on one mesh restores onto any other (one device
-> 8, (2,2,2) -> (8,1,1), 8 -> 1) bit-identically. With several processes every process calls
``save`` and ``restore``; only process 0 creates and deletes directories, with barriers around
it, and a leaf spread over processes is gathered to be hashed (the checksum is of the whole
array, whatever the mesh).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxdec import checks
from jaxdec.checks import as_step

PyTree = Any

# Key under which save() stores the per-leaf records in orbax's custom step metadata.
_LEAVES_KEY = "jaxdec_leaves"
# Suffix orbax gives a step directory while it is being written (renamed away on success).
_TMP_SUFFIX = ".orbax-checkpoint-tmp"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint directory exists but cannot be restored or fails its checksums."""


# ----------------------------------------------------------------------------- steps


def all_steps(directory: str | os.PathLike) -> list[int]:
    """Steps with a finished checkpoint under `directory`, ascending ([] if none).

    Only directories named by a bare integer count; orbax's in-progress
    ``<step>.orbax-checkpoint-tmp`` directories (and any other files) are ignored.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest step with a finished checkpoint under `directory`, or None.

    Finished means fully written and renamed; it is not checked for later damage (`restore`
    does that and falls back).
    """
    steps = all_steps(directory)
    return steps[-1] if steps else None




# ------------------------------------------------------------------------ leaf handling


def _is_typed_key(x: Any) -> bool:
    """True for a typed PRNG key array (dtype key<impl>); False for raw uint32 keys."""
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_storable(state: PyTree) -> PyTree:
    """`state` with typed PRNG keys replaced by their uint32 key data [..., key_shape]."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, state)


def _from_storable(template: PyTree, restored: PyTree) -> PyTree:
    """Re-wraps key data in `restored` wherever `template` holds a typed key."""

    def unwrap(t, r):
        return jax.random.wrap_key_data(r, impl=jax.random.key_impl(t)) if _is_typed_key(t) else r

    return jax.tree.map(unwrap, template, restored)


def _spec(x: Any) -> tuple[str, list[int]]:
    """(dtype name, shape) of an array, ShapeDtypeStruct or Python/NumPy scalar."""
    if not (hasattr(x, "dtype") and hasattr(x, "shape")):
        x = np.asarray(x)
    return str(np.dtype(x.dtype)), list(x.shape)


def _leaf_records(tree: PyTree, *, with_digest: bool) -> list[dict]:
    """One record per leaf, in flattening order: path, dtype, shape (and sha256 of the bytes)."""
    records = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype, shape = _spec(leaf)
        record = {"path": jax.tree_util.keystr(path), "dtype": dtype, "shape": shape}
        if with_digest:
            # The whole array on the host (gathered from other processes if it is spread over
            # them), C-order bytes: the digest does not depend on the mesh.
            record["sha256"] = hashlib.sha256(_host_array(leaf).tobytes()).hexdigest()
        records.append(record)
    return records


def _host_array(leaf: Any) -> np.ndarray:
    """The whole value of a leaf as a NumPy array on this host."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)


def _on_primary(name: str, action) -> None:
    """Runs `action()` on process 0 only; every process waits until it is done."""
    if jax.process_index() == 0:
        action()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------- save


def save(directory: str | os.PathLike, state: PyTree, step: int, *, keep: int = 3) -> pathlib.Path:
    """Writes `state` as checkpoint `step` under `directory` and keeps the newest `keep` steps.

    Args:
      directory: checkpoint root; created if missing. The step goes to `directory/<step>/`.
      state: any pytree of JAX/NumPy arrays (typed or raw PRNG keys included).
      step: non-negative int; an existing checkpoint of the same step is replaced.
      keep: how many of the newest steps to keep (>= 1); older ones are deleted.

    Returns:
      The path of the written step directory.

    Synchronous: when this returns, the checkpoint is complete and renamed into place, so a
    process crash right after cannot leave it half-written (no fsync is done: damage from an
    OS crash or power loss is caught by `restore`'s checks). After the save, checkpoints with
    a step above `step` (left by a run that was then resumed from an earlier step) are deleted
    with a warning: otherwise "latest" would point back into the abandoned run.
    """
    step = as_step(step)
    keep = checks.positive_int("keep", keep)
    directory = pathlib.Path(directory).absolute()  # orbax rejects relative paths

    def prepare():
        directory.mkdir(parents=True, exist_ok=True)
        # Leftovers of saves that crashed mid-write; never restorable.
        for tmp in directory.glob(f"*{_TMP_SUFFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True)

    _on_primary(f"jaxdec checkpoint prepare {directory} {step}", prepare)

    storable = _to_storable(state)
    path = directory / str(step)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        # force=True: replacing a same-numbered checkpoint is the normal case after a fallback
        # (the corrupt step is re-reached). custom_metadata lands inside the atomic rename.
        checkpointer.save(
            path,
            args=ocp.args.StandardSave(storable),
            custom_metadata={_LEAVES_KEY: _leaf_records(storable, with_digest=True)},
            force=True,
        )

    newer = [s for s in all_steps(directory) if s > step]
    if newer:
        warnings.warn(
            f"saved step {step} in {directory}: deleting newer checkpoints {newer} "
            "left by the run that was resumed from an earlier step",
            stacklevel=2,
        )

    def prune():
        for s in newer:
            shutil.rmtree(directory / str(s))
        for s in all_steps(directory)[:-keep]:
            shutil.rmtree(directory / str(s))

    _on_primary(f"jaxdec checkpoint prune {directory} {step}", prune)
    return path


# ------------------------------------------------------------------------- restore


def _restore_step(path: pathlib.Path, template: PyTree) -> PyTree:
    """Restores one step directory into `template`'s structure, dtypes and shardings.

    Raises:
      CorruptCheckpointError: the checkpoint is unreadable, incomplete, or fails its checksums.
      ValueError: the checkpoint is intact but was saved from a differently shaped state.
    """
    storable_template = _to_storable(template)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        try:
            # Orbax logs (does not raise) on a missing/garbled metadata file and returns {}.
            saved = checkpointer.metadata(path).custom_metadata.get(_LEAVES_KEY)
        except Exception as err:  # any failure to read means unusable
            raise CorruptCheckpointError(f"unreadable metadata: {_describe(err)}") from err
        if not isinstance(saved, list) or not all(isinstance(r, dict) for r in saved):
            raise CorruptCheckpointError("_CHECKPOINT_METADATA is missing or unreadable")

        # A structural mismatch is the caller's error, not corruption: raise, don't fall back.
        saved_specs = [{k: r.get(k) for k in ("path", "dtype", "shape")} for r in saved]
        wanted_specs = _leaf_records(storable_template, with_digest=False)
        if saved_specs != wanted_specs:
            raise ValueError(
                f"template does not match the checkpoint at {path}: "
                + _first_difference(saved_specs, wanted_specs)
            )

        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, storable_template)
        try:
            restored = checkpointer.restore(path, args=ocp.args.StandardRestore(abstract))
        except Exception as err:  # tensorstore raises ValueError, KeyError, plain Exception...
            raise CorruptCheckpointError(f"cannot read arrays: {_describe(err)}") from err

    for got, expected in zip(_leaf_records(restored, with_digest=True), saved):
        if got != expected:
            raise CorruptCheckpointError(f"leaf {expected['path']} does not match its SHA-256")
    return _from_storable(template, restored)


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"


def _first_difference(saved: list[dict], wanted: list[dict]) -> str:
    """Human-readable first mismatch between saved and template leaf specs."""
    for s, w in zip(saved, wanted):
        if s != w:
            return (
                f"checkpoint has {s['path']} {s['dtype']}{s['shape']}, "
                f"template has {w['path']} {w['dtype']}{w['shape']}"
            )
    return f"checkpoint has {len(saved)} leaves, template has {len(wanted)}"


def _check_template_params(template: PyTree) -> None:
    """A training state's params must be the ones its model config describes: otherwise the
    checkpoint would be restored into (and later run as) a different model. ValueError naming
    the first mismatched leaf (`jaxdec.api.check_params`); other pytrees pass unchecked."""
    params, config = getattr(template, "params", None), getattr(template, "model_config", None)
    if params is not None and config is not None:
        from jaxdec.api import check_params  # the model API; the rest of this module is generic

        check_params(params, config)


def restore(
    directory: str | os.PathLike, template: PyTree, *, step: int | None = None
) -> tuple[PyTree, int]:
    """Restores a checkpoint into the structure, dtypes and shardings of `template`.

    Args:
      directory: checkpoint root written by `save`.
      template: a concrete state of the same structure (e.g. freshly initialised); its values
        are ignored, its leaves' dtypes/shapes/shardings and key implementations are used. Its
        shardings are the target: a template created on another mesh (`create_train_state(...,
        mesh=)`) restores the checkpoint onto that mesh, whatever mesh saved it.
      step: restore exactly this step; None means the newest usable one.

    Returns:
      (state, step): the restored state, bit-identical to what was saved, and its step.

    With step=None a corrupt or half-written newest checkpoint is skipped with a warning
    naming the step and the error, then the next older one is tried, and so on.

    Raises:
      FileNotFoundError: no checkpoint, no usable one, or no checkpoint for the given `step`.
      CorruptCheckpointError: the explicitly requested `step` is corrupt (no fallback).
      ValueError: the checkpoint was saved from a state of a different structure/dtype/shape, or
        the template is a training state whose params do not fit its model_config.
    """
    directory = pathlib.Path(directory).absolute()  # orbax rejects relative paths
    _check_template_params(template)
    steps = all_steps(directory)
    if step is not None:
        step = as_step(step)
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {directory}; available steps: {steps}"
            )
        try:
            return _restore_step(directory / str(step), template), step
        except CorruptCheckpointError as err:
            raise CorruptCheckpointError(
                f"checkpoint step {step} in {directory} is unusable: {err}"
            ) from err

    if not steps:
        raise FileNotFoundError(f"no checkpoint found in {directory}")
    for s in reversed(steps):
        try:
            return _restore_step(directory / str(s), template), s
        except CorruptCheckpointError as err:
            warnings.warn(
                f"checkpoint step {s} in {directory} is unusable, trying an older one: {err}",
                stacklevel=2,
            )
    raise FileNotFoundError(f"no usable checkpoint in {directory}: steps {steps} are all corrupt")
