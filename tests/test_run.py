"""The training run behind train.py (jaxdec.tools.run, jaxdec.tools.run_folder): resume, corrupt
checkpoints, refused input, run folders that are never written over by accident, the CLI."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from jaxdec import checkpoint
from jaxdec.config import DecoderConfig, TrainConfig
from jaxdec.tools import metrics
from jaxdec.tools.run import DATES_PRESETS, PRESETS, RunConfig, Seq2SeqRunConfig, run, validate
from jaxdec.tools.run_folder import check_run_folder, run_name

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = "def f(x):\n    return x + 1  # 한국어 주석\n" * 200


def _cfg(tmp_path, **overrides) -> RunConfig:
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT, encoding="utf-8")
    cfg = RunConfig(
        model=DecoderConfig(vocab_size=259, num_layers=1, d_model=32, num_heads=2, max_len=32),
        train=TrainConfig(learning_rate=3e-3, warmup_steps=2, decay_steps=20, dropout=0.1),
        data=str(data), name="t", runs_dir=str(tmp_path / "runs"), steps=6, batch_size=4,
        seq_len=16, eval_every=3, eval_batches=2, log_every=1, checkpoint_every=3, num_samples=1,
        sample_tokens=4,
    )
    return dataclasses.replace(cfg, **overrides)


def _train_records(cfg: RunConfig) -> list[dict]:
    path = pathlib.Path(cfg.runs_dir) / cfg.name / "metrics.jsonl"
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics.read(path) if "loss" in r]


@pytest.mark.slow  # two training runs end to end
def test_resume_reproduces_the_uninterrupted_curve(tmp_path, capsys):
    straight = _cfg(tmp_path, name="straight")
    final = run(straight)
    assert "held-out bits/byte:" in capsys.readouterr().out
    assert final["eval_bits_per_byte"] > 0

    interrupted = _cfg(tmp_path, name="resumed", steps=3, num_samples=0)  # no sampling: faster
    run(interrupted)
    resumed = dataclasses.replace(interrupted, steps=6, resume=True)
    run(resumed)
    assert "resumed from step 3" in capsys.readouterr().out
    assert _train_records(resumed) == _train_records(straight)
    assert (pathlib.Path(resumed.runs_dir) / "resumed" / "loss.png").stat().st_size > 0


@pytest.mark.slow(reason="time budget: two training runs")
def test_corrupt_latest_checkpoint_falls_back(tmp_path, capsys):
    cfg = _cfg(tmp_path, num_samples=0)
    run(cfg)
    ckpt = pathlib.Path(cfg.runs_dir) / cfg.name / "checkpoints"
    latest = ckpt / "6"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.warns(UserWarning, match="step 6"):
        run(dataclasses.replace(cfg, resume=True))
    assert "resumed from step 3" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(seq_len=64), "max_len"),
        (dict(batch_size=10_000), "batch too large"),
        (dict(data="/nonexistent/path"), "/nonexistent/path"),
        (dict(steps=0), "steps"),
        (dict(model=DecoderConfig(vocab_size=100, num_layers=1, d_model=32, num_heads=2, max_len=32)),
         "vocab_size"),
    ],
)
def test_bad_runs_are_refused(tmp_path, overrides, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        cfg = _cfg(tmp_path, **overrides)
        validate(cfg)
        run(cfg)


def test_empty_data_file_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        run(_cfg(tmp_path, data=str(empty)))


def test_cli_refuses_unknown_flags_and_bad_data():
    unknown = subprocess.run([sys.executable, "train.py", "--no-such-flag", "1"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert unknown.returncode != 0
    assert "no-such-flag" in unknown.stdout + unknown.stderr
    missing = subprocess.run([sys.executable, "train.py", "--preset", "tiny", "--data", "/no/such/dir"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0
    assert "/no/such/dir" in missing.stderr


def test_out_of_range_ids_in_the_data_path_are_refused(tmp_path, monkeypatch):
    """A batch id >= vocab_size would give a NaN loss and a silently skipped update: the run's
    data path refuses it before the step."""
    import numpy as np

    from jaxdec.tools import run as run_loop

    def bad_batch(self, step):
        tokens = np.full((4, 17), 7, np.int32)
        tokens[2, 5] = 300
        return {"tokens": tokens}

    monkeypatch.setattr(run_loop.LMTask, "train_batch", bad_batch)
    monkeypatch.setattr(run_loop, "train_step", lambda *a: pytest.fail("the step ran on bad data"))
    with pytest.raises(ValueError, match=r"batch\['tokens'\] holds token id 300, outside \[0, vocab_size=259\)"):
        run(_cfg(tmp_path, checkpoint_every=0))


def test_samples_from_non_finite_params_raise(monkeypatch):
    """NaN parameters make every logit NaN; the run's samples must say so, not print the
    tokens argmax picks from NaN."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdec.tools import run as run_loop
    from jaxdec.training import create_train_state

    cfg = DecoderConfig(vocab_size=259, num_layers=1, d_model=32, num_heads=2, max_len=32)
    state = create_train_state(cfg, TrainConfig(warmup_steps=2, decay_steps=20), jax.random.key(0))
    prompts = [np.array([1, 70, 71], np.int32), np.array([1, 72], np.int32)]
    assert len(run_loop.sample_texts(state, prompts, 4, jax.random.key(1))) == 2
    nan_params = dict(state.params, embed=state.params["embed"].at[70].set(jnp.nan))
    # Tied head: the NaN embedding row is also a NaN logit column, so both rows are flagged.
    with pytest.raises(FloatingPointError, match=r"NaN or inf for row\(s\) \[0, 1\] of 2"):
        run_loop.sample_texts(state.replace(params=nan_params), prompts, 4, jax.random.key(1))


# --- run folders: a run is continued only with --resume and the same config, replaced only with
# --overwrite, and otherwise left byte-for-byte as it was.


def _snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    """Every file under `folder` (checkpoint step directories included), by relative path."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def _no_data_or_compute(monkeypatch):
    """A refused run must stop before loading data or building a model."""
    from jaxdec.tools import run as run_loop

    monkeypatch.setattr(run_loop, "load_corpus", lambda cfg: pytest.fail("data loaded"))
    monkeypatch.setattr(run_loop, "create_train_state", lambda *a, **k: pytest.fail("model built"))


def _small_run(tmp_path, **overrides) -> RunConfig:
    # name=None: the folder is named after the data, runs/corpus.
    settings = dict(name=None, steps=4, checkpoint_every=2, eval_every=2, num_samples=0)
    return _cfg(tmp_path, **{**settings, **overrides})


def test_a_second_run_into_a_used_folder_is_refused_and_writes_nothing(tmp_path, monkeypatch):
    first = _small_run(tmp_path)
    run(first)
    folder = tmp_path / "runs" / "corpus"
    assert checkpoint.all_steps(folder / "checkpoints") == [2, 4]
    before = _snapshot(folder)
    assert {"config.json", "metrics.jsonl", "loss.png", "checkpoints/4/_CHECKPOINT_METADATA"} <= set(before)

    _no_data_or_compute(monkeypatch)
    for second in (dataclasses.replace(first, seq_len=8, steps=2),  # another config
                   first):                                          # the same config, no --resume
        with pytest.raises(ValueError) as err:
            run(second)
        message = str(err.value)
        for word in (str(folder), "--resume", "--name", "--overwrite", "nothing was written"):
            assert word in message
    assert _snapshot(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoints", "config.json", "loss.png", "metrics.jsonl"]


def test_overwrite_replaces_the_earlier_run(tmp_path, capsys):
    run(_small_run(tmp_path))
    folder = tmp_path / "runs" / "corpus"
    (folder / "notes-of-mine.txt").write_text("not written by train.py")
    second = _small_run(tmp_path, steps=2, overwrite=True, train=TrainConfig(learning_rate=1e-3, warmup_steps=1,
                                                                             decay_steps=10))
    run(second)
    assert "--overwrite: removing the earlier run in" in capsys.readouterr().out
    saved = json.loads((folder / "config.json").read_text())
    assert saved["steps"] == 2 and saved["train"]["learning_rate"] == 1e-3
    assert checkpoint.all_steps(folder / "checkpoints") == [2]  # the first run's step 4 is gone
    assert max(r["step"] for r in metrics.read(folder / "metrics.jsonl")) == 2
    assert (folder / "notes-of-mine.txt").read_text() == "not written by train.py"


def test_resume_continues_a_matching_run_and_refuses_a_different_one(tmp_path, monkeypatch, capsys):
    first = _small_run(tmp_path, steps=2)
    run(first)
    folder = tmp_path / "runs" / "corpus"
    before = _snapshot(folder)

    # Fields that shape the model, optimiser or data stream must match; each is named with its
    # saved and new values, and nothing is written.
    with monkeypatch.context() as m:
        _no_data_or_compute(m)
        with pytest.raises(ValueError, match=r"seq_len: 16 -> 8.*train\.dropout: 0\.1 -> 0\.0") as err:
            run(dataclasses.replace(first, seq_len=8, resume=True,
                                    train=dataclasses.replace(first.train, dropout=0.0)))
        assert str(folder) in str(err.value) and "nothing was written" in str(err.value)
        other = tmp_path / "other.txt"
        other.write_text(TEXT)
        with pytest.raises(ValueError, match=r"data: '.*corpus\.txt' -> '.*other\.txt'"):
            run(dataclasses.replace(first, data=str(other), name="corpus", resume=True))
        with pytest.raises(ValueError, match="choose one"):
            run(dataclasses.replace(first, resume=True, overwrite=True))
    assert _snapshot(folder) == before

    # More steps, other reporting periods and another spelling of the same data path continue it.
    monkeypatch.chdir(tmp_path)
    run(dataclasses.replace(first, data="./corpus.txt", steps=4, eval_every=4, log_every=2, resume=True))
    assert "resumed from step 2" in capsys.readouterr().out
    assert checkpoint.all_steps(folder / "checkpoints") == [2, 4]
    assert json.loads((folder / "config.json").read_text())["steps"] == 4


def test_resume_of_an_empty_or_missing_folder_starts_fresh(tmp_path):
    cfg = _small_run(tmp_path, resume=True)
    assert check_run_folder(cfg).resume is False  # no folder
    (tmp_path / "runs" / "corpus").mkdir(parents=True)
    assert check_run_folder(cfg).resume is False  # an empty folder
    assert not any((tmp_path / "runs" / "corpus").iterdir())


def test_resume_checks_against_the_saved_config_json(tmp_path):
    """The check alone, on a folder written by hand: fields outside RESUMABLE_FIELDS must match;
    a field the saved file lacks counts as its default; steps may not fall below the newest
    checkpoint."""
    cfg = _small_run(tmp_path, name="r", resume=True)
    folder = tmp_path / "runs" / "r"
    (folder / "checkpoints" / "3").mkdir(parents=True)
    saved = dataclasses.asdict(cfg)
    del saved["model"]["rope_base"], saved["overwrite"]  # written before these fields existed
    saved.update(steps=99, eval_every=7, num_samples=5, mesh="data=1")
    (folder / "config.json").write_text(json.dumps(saved))
    assert check_run_folder(cfg).resume is True

    saved["model"]["num_heads"] = 4
    saved["batch_size"] = 8
    (folder / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"batch_size: 8 -> 4; model\.num_heads: 4 -> 2\. Only"):
        check_run_folder(cfg)
    with pytest.raises(ValueError, match="--resume: steps 2 is below the newest checkpoint .*step 3"):
        check_run_folder(dataclasses.replace(cfg, steps=2, batch_size=8, model=dataclasses.replace(cfg.model, num_heads=4)))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json cannot be read"):
        check_run_folder(cfg)


def test_the_default_run_name_follows_the_data(tmp_path):
    lm = PRESETS["tiny"]
    assert lm.name is None and run_name(lm) == "stdlib"
    notes = tmp_path / "notes.txt"
    notes.write_text(TEXT)
    assert run_name(dataclasses.replace(lm, data=str(notes))) == "notes"
    odd = tmp_path / "my notes (v2)!.md"
    odd.write_text(TEXT)
    assert run_name(dataclasses.replace(lm, data=str(odd))) == "my-notes-v2"
    folder = tmp_path / "project.src"
    folder.mkdir()
    assert run_name(dataclasses.replace(lm, data=str(folder))) == "project.src"  # a folder keeps its suffix
    assert run_name(dataclasses.replace(lm, data=str(folder) + "/")) == "project.src"
    assert run_name(dataclasses.replace(lm, data=str(notes), name="mine")) == "mine"
    assert run_name(Seq2SeqRunConfig(model=DATES_PRESETS["tiny"].model, train=TrainConfig())) == "dates"
    assert [run_name(c) for c in DATES_PRESETS.values()] == ["dates-tiny", "dates"]


def _train_py():
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_refuses_a_used_run_folder_before_any_write(tmp_path, monkeypatch):
    notes = tmp_path / "notes.txt"
    notes.write_text(TEXT)
    folder = tmp_path / "runs" / "notes"
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"step": 600, "loss": 1.0}\n')
    before = _snapshot(folder)
    _no_data_or_compute(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        _train_py().main(["--preset", "tiny", "--data", str(notes), "--runs-dir", str(tmp_path / "runs")])
    message = str(exit_info.value.code)
    assert message.startswith("error: run folder") and str(folder) in message and "--overwrite" in message
    assert _snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == ["metrics.jsonl"]
