"""Two processes x 2 CPU devices on localhost (gloo) train exactly like 1 process x 4 devices.

Marked slow (over a minute on a 2-core machine: three processes each compile the step); CI runs
it in its own step (.ci/run).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multiprocess_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _result(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    base = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        base.pop(name, None)
    address = f"localhost:{_free_port()}"
    workers = [
        subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "two")], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**base, "JAX_NUM_CPU_DEVICES": "2", "JAX_COORDINATOR_ADDRESS": address,
                              "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
        for i in range(2)
    ]
    single = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "one")], cwd=ROOT, text=True,
                            capture_output=True, env={**base, "JAX_NUM_CPU_DEVICES": "4"}, timeout=600)
    outputs = []
    for w in workers:
        out, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-4000:]
        outputs.append(_result(out))
    assert single.returncode == 0, single.stderr[-4000:]
    one = _result(single.stdout)

    assert one["processes"] == 1 and one["devices"] == 4 and one["rows"] == [0, 8]
    assert [o["processes"] for o in outputs] == [2, 2] and [o["devices"] for o in outputs] == [4, 4]
    # Each process fed only its own half of every batch.
    assert sorted(o["rows"] for o in outputs) == [[0, 4], [4, 8]]
    for o in outputs:  # 3 steps, then one after a checkpoint round trip written by both processes
        np.testing.assert_allclose(o["losses"], one["losses"], atol=1e-5)
