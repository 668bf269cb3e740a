"""Train-step benchmark: tokens/s and the fraction of the machine's matmul peak, on one device or
sharded over a mesh (with the parameter and optimizer bytes each device holds)."""

from __future__ import annotations

import json

import jax

import jaxdec
from jaxdec import sharding
from jaxdec.tools.bench.common import BENCH_CONFIG, xla_flags
from jaxdec.tools.bench.machine import measure_matmul_peak
from jaxdec.tools.costs import train_step_flops
from jaxdec.tools.timing import measure


def bench_train(batch: int = 16, seq: int = 256, steps: int = 10, dtype: str = "float32",
                mesh: str | None = None) -> dict:
    """Train-step tokens/s; with `mesh` ("data=2,fsdp=2,tensor=2") sharded over it, plus the
    parameter and optimizer bytes each device holds (simulated CPU devices share the same cores:
    their tokens/s shows the partitioning's overhead, never a speedup)."""
    config = BENCH_CONFIG
    tc = jaxdec.TrainConfig(dtype=dtype)
    device_mesh = None if mesh is None else jaxdec.make_mesh(**sharding.parse_mesh(mesh))
    state = jaxdec.create_train_state(config, tc, jax.random.key(0), mesh=device_mesh)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, config.vocab_size)
    data = {"tokens": tokens} if device_mesh is None else jaxdec.shard_batch({"tokens": tokens}, device_mesh)

    def step():
        nonlocal state
        state, metrics = jaxdec.train_step(state, data)
        return metrics

    timing = measure(step, steps)
    median, times, compile_s = timing.seconds, timing.times, timing.warmup_seconds
    peak = measure_matmul_peak()
    flops = train_step_flops(config, batch, seq) / median
    row = {
        "bench": "train", "batch": batch, "seq": seq, "dtype": dtype,
        "tokens_per_s": round(batch * seq / median, 1),
        "step_s_median": round(median, 4), "step_s_range": [round(min(times), 4), round(max(times), 4)],
        "model_gflop_per_s": round(flops / 1e9, 1), "matmul_peak_gflop_per_s": round(peak / 1e9, 1),
        "fraction_of_peak": round(flops / peak, 3), "compile_s": round(compile_s, 2),
        "xla_flags": xla_flags(),
    }
    if device_mesh is not None:
        params, opt = (sharding.bytes_per_device(t) for t in (state.params, state.opt_state))
        row |= {"mesh": dict(device_mesh.shape), "devices": jax.device_count(),
                "param_bytes_total": params["total"],
                "param_bytes_per_device": max(params["per_device"].values()),
                "optimizer_bytes_total": opt["total"],
                "optimizer_bytes_per_device": max(opt["per_device"].values())}
    print(json.dumps(row), flush=True)
    return row
