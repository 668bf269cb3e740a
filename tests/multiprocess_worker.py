"""One process of the multi-process test (tests/test_multiprocess.py); also runs alone.

    JAX_NUM_CPU_DEVICES=2 JAX_COORDINATOR_ADDRESS=localhost:PORT JAX_NUM_PROCESSES=2 \
        JAX_PROCESS_ID=i python tests/multiprocess_worker.py CHECKPOINT_DIR

Trains 3 steps on a (data=2, fsdp=2, tensor=1) mesh over every device of every process, each
process feeding only its own rows of each batch; saves, restores into a fresh state, trains one
more step; prints one JSON line: process index and count, its rows, the 4 losses.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

import jaxdec
from jaxdec import checkpoint, sharding

MC = jaxdec.DecoderConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, max_len=32)
TC = jaxdec.TrainConfig(learning_rate=1e-3, warmup_steps=0, decay_steps=100, eps=1e-6)
BATCH = 8


def global_batch(step: int) -> dict:
    """The whole batch of a step, a pure function of (seed, step): int32 tokens [8, 17]."""
    rng = np.random.default_rng([3, step])
    return {"tokens": rng.integers(0, MC.vocab_size, (BATCH, 17)).astype(np.int32)}


def main(directory: str) -> None:
    sharding.init_devices()  # JAX_* variables: join the run before JAX starts
    mesh = jaxdec.make_mesh(data=2, fsdp=2)
    rows = sharding.process_rows(BATCH, mesh)

    def step_on(state, step):
        local = {k: v[rows] for k, v in global_batch(step).items()}
        state, metrics = jaxdec.train_step(state, jaxdec.shard_batch(local, mesh))
        return state, float(metrics["loss"])

    state = jaxdec.create_train_state(MC, TC, jax.random.key(0), mesh=mesh)
    losses = []
    for step in range(3):
        state, loss = step_on(state, step)
        losses.append(loss)
    checkpoint.save(directory, state, 3)
    restored, _ = checkpoint.restore(directory, jaxdec.create_train_state(MC, TC, jax.random.key(1), mesh=mesh))
    _, loss = step_on(restored, 3)
    losses.append(loss)
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "devices": jax.device_count(), "rows": [rows.start, rows.stop], "losses": losses}),
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
