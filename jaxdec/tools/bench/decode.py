"""Decode benchmarks on the benchmark models: generate's tokens/s cached and uncached (decoder
and encoder-decoder), and where one cached decode step's time goes."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp

import jaxdec
import jaxdec.cache
from jaxdec.attention import attend
from jaxdec.tools.bench.baselines import generate_cross_recomputed
from jaxdec.tools.bench.common import BENCH_CONFIG, SEQ2SEQ_CONFIG, xla_flags
from jaxdec.tools.timing import measure


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
            timing = measure(run, repeats if use_cache else max(1, repeats // 2))
            median, times = timing.seconds, timing.times
            compile_s = timing.compile_seconds  # the first call = compilation + one run
            tok_s = batch * new_tokens / median
            per_mode[use_cache] = tok_s
            rows.append({
                "bench": "decode", "model": "decoder", "batch": batch, "prompt": prompt_len,
                "new_tokens": new_tokens, "capacity": prompt_len + new_tokens,
                "cache": use_cache, "tokens_per_s": round(tok_s, 1),
                "tokens_per_s_range": [round(batch * new_tokens / t, 1) for t in (max(times), min(times))],
                "compile_s": round(compile_s, 3), "xla_flags": xla_flags(),
            })
            print(json.dumps(rows[-1]), flush=True)
        if uncached:
            print(json.dumps({"bench": "decode", "batch": batch,
                              "cached_over_uncached": round(per_mode[True] / per_mode[False], 2)}), flush=True)
    return rows


def bench_decode_seq2seq(batches=(1, 8), source_len=64, new_tokens=128, repeats=5, uncached=True) -> list[dict]:
    """Encoder-decoder decode: cached (cross K/V projected once), cross K/V re-projected every
    step, and the fully uncached baseline (encoder and whole prefix rerun every step)."""
    config = SEQ2SEQ_CONFIG
    params = jaxdec.init_params(config, jax.random.key(0))
    rows = []
    modes = {"cached": dict(use_cache=True), "cross_recomputed": None}
    if uncached:
        modes["uncached"] = dict(use_cache=False)
    for batch in batches:
        source = jax.random.randint(jax.random.key(1), (batch, source_len), 0, config.vocab_size)
        source_lengths = jnp.full((batch,), source_len, jnp.int32)
        prompts = jnp.ones((batch, 1), jnp.int32)
        speed = {}
        for mode, kwargs in modes.items():
            if kwargs is None:
                run = lambda: generate_cross_recomputed(  # noqa: E731 - a closure timed repeatedly
                    params, config, prompts, source, source_lengths, max_new_tokens=new_tokens).tokens
            else:
                run = lambda: jaxdec.generate(  # noqa: E731 - a closure timed repeatedly
                    params, config, prompts, source=source, max_new_tokens=new_tokens, **kwargs).tokens
            timing = measure(run, repeats if mode != "uncached" else max(1, repeats // 2))
            median, times = timing.seconds, timing.times
            compile_s = timing.compile_seconds  # the first call = compilation + one run
            speed[mode] = batch * new_tokens / median
            rows.append({
                "bench": "decode", "model": "seq2seq", "batch": batch, "source": source_len,
                "new_tokens": new_tokens, "mode": mode, "tokens_per_s": round(speed[mode], 1),
                "tokens_per_s_range": [round(batch * new_tokens / t, 1) for t in (max(times), min(times))],
                "compile_s": round(compile_s, 3), "xla_flags": xla_flags(),
            })
            print(json.dumps(rows[-1]), flush=True)
        summary = {"bench": "decode", "model": "seq2seq", "batch": batch,
                   "cross_cache_speedup": round(speed["cached"] / speed["cross_recomputed"], 2)}
        if uncached:
            summary["cached_over_uncached"] = round(speed["cached"] / speed["uncached"], 2)
        print(json.dumps(summary), flush=True)
    return rows


def _scan_seconds(body, carry, steps: int, repeats: int) -> float:
    """Median seconds per step of `steps` iterations of body(carry) -> carry in one lax.scan."""
    run = jax.jit(lambda c: jax.lax.scan(lambda c, _: (body(c), None), c, length=steps)[0])
    return measure(lambda: run(carry), repeats).seconds / steps


def bench_decode_breakdown(batches=(1, 8), prompt_len=8, new_tokens=256, repeats=5) -> list[dict]:
    """Where a cached decode step's time goes. The whole step (generate's time / new_tokens) next
    to scans of its parts alone, each new_tokens steps long: attention of one query row over
    every layer's full-capacity cache, the weight matmuls (every weight read once, as a step
    does) and the cache writes; "other" is the rest (norms, embeddings, sampling, the loop)."""
    config = BENCH_CONFIG
    params = jaxdec.init_params(config, jax.random.key(0))
    L, K, H = config.num_layers, config.kv_heads, config.head_dim
    cap = prompt_len + new_tokens
    rows = []
    for batch in batches:
        prompts = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, config.vocab_size)
        run = lambda: jaxdec.generate(params, config, prompts, max_new_tokens=new_tokens).tokens  # noqa: E731
        step_s = measure(run, repeats).seconds / new_tokens

        kv = 0.1 * jax.random.normal(jax.random.key(2), (L, batch, K, cap, H))
        mask = jnp.ones((batch, 1, cap), bool)

        def attention(q):  # q [B, 1, N, H]
            for i in range(L):
                q = attend(q, kv[i], kv[i], mask, heads_first=True)
            return q

        attention_s = _scan_seconds(attention, jnp.ones((batch, 1, config.num_heads, H)), new_tokens, repeats)
        stacked = params["layers"]
        weights = [w[i] for i in range(L) for w in (stacked["attn"]["qkv"], stacked["attn"]["out"],
                                                    stacked["mlp"]["w_in"], stacked["mlp"]["w_out"])]
        width = max(w.shape[0] for w in weights)

        def matmuls(h):  # h [B, width]
            for w in weights + [params["embed"].T]:
                y = h[:, : w.shape[0]] @ w
                h = jnp.zeros_like(h).at[:, : min(y.shape[1], width)].set(y[:, :width])
            return h

        matmul_s = _scan_seconds(matmuls, jnp.ones((batch, width)) / width, new_tokens, repeats)
        cache = jaxdec.cache.init_cache(L, batch, cap, K, H)
        new_kv = jnp.ones((batch, 1, K, H))

        def writes(c):
            for i in range(L):
                c = jaxdec.cache.write(c, i, new_kv, new_kv)
            return c.replace(end=(c.end + 1) % cap)

        write_s = _scan_seconds(writes, cache, new_tokens, repeats)
        row = {
            "bench": "decode_breakdown", "batch": batch, "capacity": cap, "step_us": round(1e6 * step_s, 1),
            "attention_us": round(1e6 * attention_s, 1), "weight_matmuls_us": round(1e6 * matmul_s, 1),
            "cache_writes_us": round(1e6 * write_s, 1),
            "other_us": round(1e6 * (step_s - attention_s - matmul_s - write_s), 1), "xla_flags": xla_flags(),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows
