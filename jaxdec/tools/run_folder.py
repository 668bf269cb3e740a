"""The run folder of a training run: its name, and what a run may do with it.

`check_run_folder` decides before anything is written: a folder that holds a run is continued
only with `resume` and a matching config.json, replaced only with `overwrite`, and otherwise
refused, naming its files and the fields that differ.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import TYPE_CHECKING

from jaxdec import checkpoint, family

if TYPE_CHECKING:
    from jaxdec.tools.run import RunConfig


def run_name(cfg: RunConfig) -> str:
    """The run's folder name: `cfg.name`, or when it is None one that follows the data, so runs
    on different data never share a folder by default: "dates" for the dates task, "stdlib"
    without --data, else the --data file's stem or folder's name ("notes" for notes.txt) with
    characters other than letters, digits, ".", "_" and "-" replaced by "-"."""
    if cfg.name is not None:
        return cfg.name
    if family.of(cfg.model).takes_source:
        return "dates"
    if cfg.data is None:
        return "stdlib"
    path = pathlib.Path(cfg.data).expanduser()
    base = path.resolve().name if path.is_dir() else path.stem  # a folder "." has no name of its own
    return re.sub(r"[^\w.-]+", "-", base).strip(".-") or "data"


def run_dir(cfg: RunConfig) -> pathlib.Path:
    """The run's folder: `runs_dir / run_name(cfg)`."""
    return pathlib.Path(cfg.runs_dir) / run_name(cfg)


# Config fields that may differ when a run is continued: where the run lives, how long it trains
# (the schedule is set by train.decay_steps, so more steps extend the same curve), how often it
# evaluates, logs and checkpoints, what it prints at the end, and how it is spread over devices
# (a checkpoint restores onto any mesh). Every other field shapes the model, the optimiser or the
# data stream: continuing under another value would splice two different runs into one curve.
RESUMABLE_FIELDS = frozenset({
    "name", "runs_dir", "steps", "eval_every", "eval_batches", "log_every", "checkpoint_every",
    "keep_checkpoints", "resume", "overwrite", "num_samples", "sample_tokens", "eval_examples",
    "mesh", "num_cpu_devices", "coordinator_address", "num_processes", "process_id", "distributed", "export",
})

_ABSENT = "(absent)"


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """What a run will do with its folder, decided by `check_run_folder` before any write.

    Attributes:
      path: the run's folder.
      resume: continue the run in it (its config matched).
      remove: the earlier run's files and folders that `overwrite` deletes before starting;
        empty unless overwriting.
    """

    path: pathlib.Path
    resume: bool
    remove: tuple[pathlib.Path, ...] = ()


def _run_files(out: pathlib.Path) -> list[pathlib.Path]:
    """The files and folders of `out` that a run writes and that show a run is there."""
    if not out.is_dir():
        return []
    found = [out / f for f in ("config.json", "loss.png") if (out / f).is_file()]
    found += sorted(out.glob("metrics*.jsonl"))  # metrics.jsonl and other processes' files
    ckpt = out / "checkpoints"
    if ckpt.is_dir() and any(ckpt.iterdir()):
        found.append(ckpt)
    return found


def describe_files(files: list[pathlib.Path]) -> str:
    parts = []
    for f in files:
        if f.name == "checkpoints":
            parts.append(f"checkpoints/ (steps {checkpoint.all_steps(f)})")
        else:
            parts.append(f.name)
    return ", ".join(parts)


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"model": {"d_model": 32}} -> {"model.d_model": 32}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _field_default(cfg: RunConfig, key: str):
    """The declared default of a dotted config field, as JSON would hold it; _ABSENT if none."""
    *parents, last = key.split(".")
    obj = cfg
    for p in parents:
        obj = getattr(obj, p, None)
    if not dataclasses.is_dataclass(obj):
        return _ABSENT
    field = {f.name: f for f in dataclasses.fields(obj)}.get(last)
    if field is None or field.default is dataclasses.MISSING:
        return _ABSENT
    return json.loads(json.dumps(field.default))


def _data_key(data):
    """--data or --init as a comparable path: "notes.txt" and "./notes.txt" are the same data."""
    return None if data is None else str(pathlib.Path(data).expanduser().resolve())


def config_differences(saved: dict, cfg: RunConfig) -> list[str]:
    """The fields outside RESUMABLE_FIELDS where `cfg` differs from a run's saved config.json,
    as "field: saved -> now" lines. A field the saved file lacks (written before the field
    existed) counts as its declared default."""
    old, new = _flat(saved), _flat(json.loads(json.dumps(dataclasses.asdict(cfg))))
    lines = []
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE_FIELDS:
            continue
        o = old.get(key, _field_default(cfg, key))
        n = new.get(key, _ABSENT)
        same = _data_key(o) == _data_key(n) if key in ("data", "init") else o == n
        if not same:
            lines.append(f"{key}: {o!r} -> {n!r}")
    return lines


def check_run_folder(cfg: RunConfig) -> RunFolder:
    """Decides what the run does with its folder, reading it and writing nothing.

    An empty or missing folder starts a fresh run (with or without `resume`). A folder that
    holds a run (config.json, metrics or checkpoints) is continued only with `resume`, and only
    if its config.json matches `cfg` outside RESUMABLE_FIELDS (and `steps` does not fall below
    its newest checkpoint); with `overwrite` its run files are to be removed. Every process of
    a multi-process run reads the same shared folder (checkpoints need one already), so all
    reach the same answer.

    Raises:
      ValueError: the folder holds a run and neither flag allows using it, or `resume` meets a
        config that differs (naming each field, saved -> now value).
    """
    out = run_dir(cfg)
    if out.exists() and not out.is_dir():
        raise ValueError(f"run folder {out} is a file, not a folder; choose another --name or --runs-dir")
    files = _run_files(out)
    if not files:
        return RunFolder(out, resume=False)
    if cfg.overwrite:
        return RunFolder(out, resume=False, remove=tuple(files))
    choices = (f"choose --resume to continue it, another --name (e.g. --name {out.name}-2) for a "
               "new run beside it, or --overwrite to delete it and start again")
    if not cfg.resume:
        raise ValueError(f"run folder {out} already holds a run ({describe_files(files)}); nothing "
                         f"was written. To keep it safe: {choices}")
    config_path = out / "config.json"
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise ValueError(f"--resume: run folder {out} holds a run ({describe_files(files)}) but its "
                         f"config.json cannot be read to check it matches ({type(err).__name__}: "
                         f"{err}); nothing was written. Choose another --name, or --overwrite") from err
    diffs = config_differences(saved, cfg)
    if diffs:
        raise ValueError(
            f"--resume: the run in {out} was made with a different config; nothing was written. "
            f"Differing fields (saved -> now): {'; '.join(diffs)}. Only "
            f"{', '.join(sorted(RESUMABLE_FIELDS - {'resume', 'overwrite'}))} may change on resume. "
            "Run with the saved values, another --name for a new run, or --overwrite")
    newest = checkpoint.latest_step(out / "checkpoints")
    if newest is not None and cfg.steps < newest:
        raise ValueError(f"--resume: steps {cfg.steps} is below the newest checkpoint in {out} "
                         f"(step {newest}); nothing was written. Raise --steps to at least {newest}")
    return RunFolder(out, resume=True)
