"""The training run behind train.py: resume, corrupt checkpoints, refused input, the CLI."""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys

import pytest

from jaxdec import report
from jaxdec.config import DecoderConfig, TrainConfig
from jaxdec.trainer import RunConfig, run, validate

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
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in report.read(path) if "loss" in r]


@pytest.mark.slow  # two training runs end to end: ~45 s on 2 loaded cores
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

    from jaxdec import trainer

    def bad_batch(self, step):
        tokens = np.full((4, 17), 7, np.int32)
        tokens[2, 5] = 300
        return {"tokens": tokens}

    monkeypatch.setattr(trainer.LMTask, "train_batch", bad_batch)
    monkeypatch.setattr(trainer, "train_step", lambda *a: pytest.fail("the step ran on bad data"))
    with pytest.raises(ValueError, match=r"batch\['tokens'\] holds token id 300, outside \[0, vocab_size=259\)"):
        run(_cfg(tmp_path, checkpoint_every=0))


def test_samples_from_non_finite_params_raise(monkeypatch):
    """NaN parameters make every logit NaN; the trainer's samples must say so, not print the
    tokens argmax picks from NaN."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdec import trainer
    from jaxdec.training import create_train_state

    cfg = DecoderConfig(vocab_size=259, num_layers=1, d_model=32, num_heads=2, max_len=32)
    state = create_train_state(cfg, TrainConfig(warmup_steps=2, decay_steps=20), jax.random.key(0))
    prompts = [np.array([1, 70, 71], np.int32), np.array([1, 72], np.int32)]
    assert len(trainer.sample_texts(state, prompts, 4, jax.random.key(1))) == 2
    nan_params = dict(state.params, embed=state.params["embed"].at[70].set(jnp.nan))
    # Tied head: the NaN embedding row is also a NaN logit column, so both rows are flagged.
    with pytest.raises(FloatingPointError, match=r"NaN or inf for row\(s\) \[0, 1\] of 2"):
        trainer.sample_texts(state.replace(params=nan_params), prompts, 4, jax.random.key(1))
