"""Benchmarks that print JSON lines (never asserted in unit tests).

    python -m jaxdec.bench decode [--repeats 5] [--batches 1 8]
    python -m jaxdec.bench train

Each figure is the median of `repeats` timed runs after one warm-up (compile) run; the thread
setting is reported with every line, since on a small CPU it changes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdec

BENCH_CONFIG = jaxdec.DecoderConfig(vocab_size=512, num_layers=4, d_model=256, num_heads=4, max_len=1024)


def _threads() -> str:
    return os.environ.get("XLA_FLAGS", "default")


def _median_seconds(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def bench_decode(batches=(1, 8), prompt_len=8, new_tokens=256, repeats=5, uncached=True) -> list[dict]:
    config = BENCH_CONFIG
    params = jaxdec.init_params(config, jax.random.key(0))
    rows = []
    for batch in batches:
        prompts = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, config.vocab_size)
        per_mode = {}
        for use_cache in (True, False) if uncached else (True,):
            run = lambda: jaxdec.generate(  # noqa: E731 - a closure timed repeatedly
                params, config, prompts, max_new_tokens=new_tokens, use_cache=use_cache
            ).tokens
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            compile_s = time.perf_counter() - t0
            median, times = _median_seconds(run, repeats)
            tok_s = batch * new_tokens / median
            per_mode[use_cache] = tok_s
            rows.append({
                "bench": "decode", "model": "decoder", "batch": batch, "prompt": prompt_len,
                "new_tokens": new_tokens, "capacity": prompt_len + new_tokens,
                "cache": use_cache, "tokens_per_s": round(tok_s, 1),
                "tokens_per_s_range": [round(batch * new_tokens / t, 1) for t in (max(times), min(times))],
                "compile_plus_first_run_s": round(compile_s, 3), "xla_flags": _threads(),
            })
            print(json.dumps(rows[-1]), flush=True)
        if uncached:
            print(json.dumps({"bench": "decode", "batch": batch,
                              "cached_over_uncached": round(per_mode[True] / per_mode[False], 2)}), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    dec = sub.add_parser("decode", help="cached vs uncached generate tokens/s")
    dec.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    dec.add_argument("--repeats", type=int, default=5)
    dec.add_argument("--new-tokens", type=int, default=256)
    dec.add_argument("--no-uncached", action="store_true")
    args = parser.parse_args(argv)
    if args.what == "decode":
        bench_decode(tuple(args.batches), new_tokens=args.new_tokens, repeats=args.repeats,
                     uncached=not args.no_uncached)


if __name__ == "__main__":
    main()
