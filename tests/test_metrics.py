"""Tests for jaxdec.tools.metrics (JSONL metrics log, truncation on resume) and
jaxdec.tools.loss_curve (the loss-curve PNG drawn from it)."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdec.tools import metrics
from jaxdec.tools.loss_curve import plot_loss_curve


def test_round_trip_converts_numpy_and_jax_scalars(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with metrics.MetricsLog(path) as log:
        log.log(1, loss=np.float32(2.5), lr=jnp.float32(1e-3), tokens=np.int64(512))
        log.log(np.int32(2), eval_loss=jnp.asarray(3.25), kind="eval", ok=np.bool_(True))
    records = metrics.read(path)
    assert records == [
        {"step": 1, "loss": 2.5, "lr": pytest.approx(1e-3), "tokens": 512},
        {"step": 2, "eval_loss": 3.25, "kind": "eval", "ok": True},
    ]
    assert type(records[0]["loss"]) is float and type(records[0]["tokens"]) is int
    # Exactly one JSON object per line.
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(isinstance(json.loads(line), dict) for line in lines)


def test_each_line_is_flushed_immediately(tmp_path):
    path = tmp_path / "m.jsonl"
    log = metrics.MetricsLog(path)
    log.log(0, loss=1.0)
    assert metrics.read(path) == [{"step": 0, "loss": 1.0}]  # visible before close
    log.close()


def test_nan_survives_round_trip(tmp_path):
    path = tmp_path / "m.jsonl"
    with metrics.MetricsLog(path) as log:
        log.log(3, loss=float("nan"))
    assert math.isnan(metrics.read(path)[0]["loss"])


def test_append_across_two_writers(tmp_path):
    path = tmp_path / "sub" / "m.jsonl"  # parent directory is created
    with metrics.MetricsLog(path) as log:
        log.log(1, loss=3.0)
        log.log(2, loss=2.0)
    with metrics.MetricsLog(path) as log:  # a resumed run continues the same file
        log.log(3, loss=1.0)
    assert [r["step"] for r in metrics.read(path)] == [1, 2, 3]


def test_truncate_after_then_resume(tmp_path):
    path = tmp_path / "m.jsonl"
    with metrics.MetricsLog(path) as log:
        for step in range(1, 6):
            log.log(step, loss=1.0 / step)
            if step % 2 == 0:
                log.log(step, eval_loss=2.0 / step)
    assert metrics.truncate_after(path, 3) == 3  # steps 4, 4 (eval), 5
    assert [r["step"] for r in metrics.read(path)] == [1, 2, 2, 3]
    with metrics.MetricsLog(path) as log:
        log.log(4, loss=0.2)
    assert [r["step"] for r in metrics.read(path)] == [1, 2, 2, 3, 4]
    assert metrics.truncate_after(tmp_path / "missing.jsonl", 3) == 0


def test_partial_last_line_from_a_crash(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert metrics.read(path) == [{"step": 1, "loss": 2.0}]
    with pytest.warns(UserWarning, match="incomplete last line"):
        log = metrics.MetricsLog(path)
    log.log(2, loss=1.5)
    log.close()
    assert metrics.read(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


def test_bad_input(tmp_path):
    path = tmp_path / "m.jsonl"
    with metrics.MetricsLog(path) as log:
        with pytest.raises(ValueError, match=r"'loss'.*shape \(2,\)"):
            log.log(1, loss=np.zeros(2))
        with pytest.raises(ValueError, match="step"):
            log.log(-1, loss=1.0)
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        metrics.read(path)


@pytest.mark.parametrize("log_y", [False, True])
def test_plot_loss_curve_writes_png(tmp_path, log_y):
    jsonl = tmp_path / "m.jsonl"
    with metrics.MetricsLog(jsonl) as log:
        for step in range(0, 50, 5):
            log.log(step, loss=3.0 * 0.9**step)
            if step % 10 == 0:
                log.log(step, eval_loss=3.2 * 0.9**step)
    png = plot_loss_curve(jsonl, tmp_path / "out" / "loss.png", title="test", log_y=log_y)
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_plot_needs_loss_records(tmp_path):
    jsonl = tmp_path / "m.jsonl"
    with metrics.MetricsLog(jsonl) as log:
        log.log(1, lr=0.1)
    with pytest.raises(ValueError, match="no records with 'loss' or 'eval_loss'"):
        plot_loss_curve(jsonl, tmp_path / "x.png")
