"""Train-step memory from XLA's buffer assignment, per remat policy: nothing is run or allocated.

    python -m jaxdec.tools.bench memory [--batch 8] [--seq 1024] [--widths 256 512 1024]
        [--remat none full dots] [--dtype float32] [--optimizer adamw] [--memory-gib 24]

For each model size and `TrainConfig.remat` policy the train step is lowered on abstract shapes
(`jax.eval_shape` of the state) and compiled for the default backend; `compiled.memory_analysis()`
gives the bytes of its arguments (params, optimizer state, batch), outputs and temporaries.
The step donates its state, so outputs alias the arguments they replace; the peak is
argument + output - alias + temp bytes. With --memory-gib, a binary search over the size ladder
(`ladder_config`: depth and width grow together) finds, per policy, the largest model whose
peak stays under that budget. The figures are those of the backend's compiler (CPU on a
machine without accelerators): another backend assigns buffers differently.
"""

from __future__ import annotations

import functools
import json
import math
import time

import jax
import jax.numpy as jnp

import jaxdec
from jaxdec import training
from jaxdec.config import OPTIMIZERS, REMATS

GIB = 2**30


def ladder_config(width: int, vocab_size: int = 32000, max_len: int = 1024) -> jaxdec.DecoderConfig:
    """The size ladder: Llama's block (RoPE, RMSNorm, SwiGLU, no biases, untied head) with head dim
    64, d_ff = 8/3 D rounded up to 64, and depth = width / 64 (GPT-2 small's 768 / 12 aspect)."""
    heads = max(1, width // 64)
    return jaxdec.DecoderConfig(vocab_size=vocab_size, num_layers=max(2, width // 64), d_model=width,
                                num_heads=heads, max_len=max_len, position="rope", norm="rms", mlp="gated",
                                activation="silu", use_bias=False, tie_embeddings=False,
                                d_ff=64 * math.ceil(8 * width / 3 / 64))


def param_count(config) -> int:
    shapes = jax.eval_shape(functools.partial(jaxdec.init_params, config), jax.random.key(0))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def step_memory(config, train_config: jaxdec.TrainConfig, batch: int, seq: int) -> dict:
    """XLA's memory analysis of one compiled train step (state donated, as `train_step` does)."""
    state = jax.eval_shape(functools.partial(training._init_state, config, train_config, None, None),
                           jax.random.key(0))
    data = {"tokens": jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)}
    start = time.perf_counter()
    compiled = jax.jit(training._train_step, donate_argnums=0).lower(state, data).compile()
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    sizes = {name: int(getattr(stats, f"{name}_size_in_bytes"))
             for name in ("argument", "output", "alias", "temp")}
    peak = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
    return {**{f"{k}_bytes": v for k, v in sizes.items()}, "peak_bytes": peak,
            "peak_gib": round(peak / GIB, 3), "compile_s": round(compile_s, 1)}


def _row(config, train_config, batch, seq) -> dict:
    device = jax.devices()[0]
    return {"bench": "memory", "d_model": config.d_model, "layers": config.num_layers,
            "heads": config.num_heads, "vocab": config.vocab_size, "params": param_count(config),
            "batch": batch, "seq": seq, "remat": train_config.remat, "dtype": train_config.dtype,
            "optimizer": train_config.optimizer, "platform": device.platform,
            "device_kind": device.device_kind, **step_memory(config, train_config, batch, seq)}


def largest_fit(budget_gib: float, widths: list[int], train_config, batch: int, seq: int,
                vocab_size: int) -> dict:
    """The widest ladder model whose train step's peak stays under budget_gib (binary search;
    memory grows with the ladder), with the first one that does not."""
    lo, hi, best, over = 0, len(widths) - 1, None, None
    while lo <= hi:
        mid = (lo + hi) // 2
        row = _row(ladder_config(widths[mid], vocab_size, seq), train_config, batch, seq)
        print(json.dumps({**row, "probe_for_gib": budget_gib}), flush=True)
        if row["peak_bytes"] <= budget_gib * GIB:
            best, lo = row, mid + 1
        else:
            over, hi = row, mid - 1
    pick = lambda r: None if r is None else {k: r[k] for k in ("d_model", "layers", "params", "peak_gib")}  # noqa: E731
    return {"bench": "memory_fit", "memory_gib": budget_gib, "remat": train_config.remat,
            "dtype": train_config.dtype, "optimizer": train_config.optimizer, "batch": batch, "seq": seq,
            "largest": pick(best), "first_over": pick(over)}


LADDER = [128 * k for k in range(2, 9)] + [256 * k for k in range(5, 17)] + [512 * k for k in range(9, 17)]


def bench_memory(args) -> list[dict]:
    rows = []
    for width in args.widths:
        config = ladder_config(width, args.vocab, args.seq)
        for remat in args.remat:
            tc = jaxdec.TrainConfig(remat=remat, dtype=args.dtype, optimizer=args.optimizer)
            rows.append(_row(config, tc, args.batch, args.seq))
            print(json.dumps(rows[-1]), flush=True)
    if args.memory_gib is not None:
        for remat in args.remat:
            tc = jaxdec.TrainConfig(remat=remat, dtype=args.dtype, optimizer=args.optimizer)
            rows.append(largest_fit(args.memory_gib, LADDER, tc, args.batch, args.seq, args.vocab))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def add_parser(sub) -> None:
    """Registers the `memory` subcommand on the bench's subparsers."""
    p = sub.add_parser("memory", help="train-step memory per remat policy (XLA memory analysis), and "
                                      "the largest model under a memory budget")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--widths", type=int, nargs="*", default=[256, 512, 1024],
                   help="model widths of the size ladder to report (depth = width / 64)")
    p.add_argument("--remat", nargs="+", choices=REMATS, default=list(REMATS))
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="also search the largest ladder model whose peak train-step memory fits this")
    p.set_defaults(run=bench_memory)

