"""Cost follows the work: the same decode in caches of growing capacity, decode cost vs prompt
length (and prefill's working memory), early exit, and compile time vs depth; `bench_scaling`
runs every sweep and draws the figure (`plots.plot_scaling`)."""

from __future__ import annotations

import dataclasses
import json
import statistics

import jax
import jax.numpy as jnp

import jaxdec
import jaxdec.model
from jaxdec.tools.bench.common import BENCH_CONFIG, xla_flags
from jaxdec.tools.bench.plots import plot_scaling
from jaxdec.tools.timing import measure


def _generate_seconds(params, config, prompts, repeats: int, **kwargs) -> tuple[float, float]:
    """(compile seconds, median run seconds) of one generate configuration."""
    run = lambda: jaxdec.generate(params, config, prompts, **kwargs).tokens  # noqa: E731
    timing = measure(run, repeats)
    return timing.compile_seconds, timing.seconds


def _fresh_and_reused_seconds(params, config, prompts, capacity: int, new_tokens: int,
                              repeats: int) -> tuple[float, float]:
    """Median seconds of a generate call that allocates its cache, and of one that writes it into
    the previous call's storage (`generate(..., buffer=)`), timed in turns so that the machine's
    drift hits both."""
    held = [jaxdec.kv_buffer(config, prompts.shape[0], capacity)]

    def fresh():
        return jaxdec.generate(params, config, prompts, max_new_tokens=new_tokens, capacity=capacity).tokens

    def reused():
        result = jaxdec.generate(params, config, prompts, max_new_tokens=new_tokens, buffer=held.pop())
        held.append(result.buffer)
        return result.tokens

    times = {fresh: [], reused: []}
    for fn in times:
        measure(fn, 1)  # compile
    for _ in range(repeats):
        for fn, seen in times.items():
            seen.append(measure(fn, 1).seconds)
    return statistics.median(times[fresh]), statistics.median(times[reused])


def bench_capacity(capacities=(264, 1024, 4096, 16384), batches=(1, 8), prompt_len=8, new_tokens=256,
                   repeats=3) -> list[dict]:
    """The same work (prompt_len + new_tokens tokens) in caches of growing capacity: whole
    generate calls, with a new cache per call and with one buffer reused across calls
    (`jaxdec.kv_buffer`), and apart from them the prefill (which allocates and zeroes the cache,
    the one cost that must grow with capacity) and the decode steps."""
    config = dataclasses.replace(BENCH_CONFIG, max_len=max(capacities))
    params = jaxdec.init_params(config, jax.random.key(0))
    prefill = jax.jit(jaxdec.model.prefill, static_argnames=("config", "capacity"))
    rows = []
    for batch in batches:
        prompts = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, config.vocab_size)
        lengths = jnp.full((batch,), prompt_len, jnp.int32)
        base = None
        for capacity in capacities:
            median, reused = _fresh_and_reused_seconds(params, config, prompts, capacity, new_tokens, repeats)
            padded = jnp.pad(prompts, ((0, 0), (0, capacity - new_tokens - prompt_len)))  # as generate pads
            run_prefill = lambda: prefill(params, config, padded, lengths, capacity)[1].k  # noqa: E731
            prefill_s = measure(run_prefill, repeats).seconds
            tok_s = batch * new_tokens / median
            step_s = max(median - prefill_s, 1e-9) / new_tokens
            reused_tok_s = batch * new_tokens / reused
            base = base or (tok_s, step_s, reused_tok_s)
            rows.append({"bench": "scaling", "sweep": "capacity", "batch": batch, "capacity": capacity,
                         "prompt": prompt_len, "new_tokens": new_tokens, "tokens_per_s": round(tok_s, 1),
                         "slowdown_vs_first": round(base[0] / tok_s, 2),
                         "reused_buffer_tokens_per_s": round(reused_tok_s, 1),
                         "reused_buffer_slowdown_vs_first": round(base[2] / reused_tok_s, 2),
                         "prefill_and_allocation_ms": round(1e3 * prefill_s, 1),
                         "decode_step_us": round(1e6 * step_s, 1),
                         "step_slowdown_vs_first": round(step_s / base[1], 2), "xla_flags": xla_flags()})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _prefill_temp_bytes(params, config, batch: int, prompt_len: int, capacity: int) -> int:
    """XLA's temporary buffer bytes of the prefill program (its peak working memory beyond the
    inputs and the returned cache), from the compiled program's memory analysis."""
    tokens = jnp.zeros((batch, prompt_len), jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    fn = jax.jit(jaxdec.model.prefill, static_argnames=("config", "capacity"))
    compiled = fn.lower(params, config, tokens, lengths, capacity).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def bench_prompt_length(prompt_lens=(8, 64, 512, 2048, 4096), batch=1, new_tokens=256, repeats=3) -> list[dict]:
    """Decode with capacity fitted to prompt + new tokens: per-token cost grows with the filled
    length; prefill runs in chunks, so its working memory grows linearly with the prompt."""
    config = dataclasses.replace(BENCH_CONFIG, max_len=max(prompt_lens) + new_tokens)
    params = jaxdec.init_params(config, jax.random.key(0))
    rows = []
    for prompt_len in prompt_lens:
        prompts = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, config.vocab_size)
        lengths = jnp.full((batch,), prompt_len, jnp.int32)
        prefill = jax.jit(jaxdec.model.prefill, static_argnames=("config", "capacity"))
        run_prefill = lambda: prefill(params, config, prompts, lengths, prompt_len + new_tokens)[0]  # noqa: E731
        prefill_s = measure(run_prefill, repeats).seconds
        _, total_s = _generate_seconds(params, config, prompts, repeats, max_new_tokens=new_tokens)
        step_s = max(total_s - prefill_s, 1e-9) / new_tokens
        rows.append({"bench": "scaling", "sweep": "prompt", "batch": batch, "prompt": prompt_len,
                     "new_tokens": new_tokens, "prefill_s": round(prefill_s, 4),
                     "prefill_temp_mib": round(_prefill_temp_bytes(params, config, batch, prompt_len,
                                                                   prompt_len + new_tokens) / 2**20, 2),
                     "decode_step_us": round(1e6 * step_s, 1),
                     "decode_tokens_per_s": round(batch / step_s, 1), "xla_flags": xla_flags()})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_early_exit(batch=8, prompt_len=8, max_new=(16, 256), repeats=5) -> list[dict]:
    """Every row emits eos_id at its first step: max_new_tokens=256 should cost what 16 costs."""
    config = BENCH_CONFIG
    params = jaxdec.init_params(config, jax.random.key(0))
    prompt = jax.random.randint(jax.random.key(1), (1, prompt_len), 0, config.vocab_size)
    prompts = jnp.repeat(prompt, batch, axis=0)  # equal rows: they all stop together
    eos = int(jaxdec.generate(params, config, prompts, max_new_tokens=1).tokens[0, 0])
    rows = []
    for n in max_new:
        _, median = _generate_seconds(params, config, prompts, repeats, max_new_tokens=n, eos_id=eos)
        rows.append({"bench": "scaling", "sweep": "early_exit", "batch": batch, "max_new_tokens": n,
                     "ms": round(1e3 * median, 2), "xla_flags": xla_flags()})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_depth(layer_counts=(4, 12, 24, 48), d_model=64) -> list[dict]:
    """Compile seconds of train_step and generate as the model deepens (layers run under scan)."""
    rows = []
    for L in layer_counts:
        config = jaxdec.DecoderConfig(vocab_size=512, num_layers=L, d_model=d_model, num_heads=4, max_len=512)
        state = jaxdec.create_train_state(config, jaxdec.TrainConfig(), jax.random.key(0))
        data = {"tokens": jax.random.randint(jax.random.key(1), (8, 129), 0, config.vocab_size)}

        def step():
            nonlocal state
            state, metrics = jaxdec.train_step(state, data)
            return metrics

        train_compile = measure(step, 1).compile_seconds  # the first step less the second
        gen_compile, _ = _generate_seconds(state.params, config, data["tokens"][:1, :8], 1, max_new_tokens=32)
        rows.append({"bench": "scaling", "sweep": "depth", "num_layers": L, "d_model": d_model,
                     "train_step_compile_s": round(train_compile, 2),
                     "generate_compile_s": round(gen_compile, 2), "xla_flags": xla_flags()})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_scaling(quick: bool = False, out: str = "scaling.png") -> list[dict]:
    """Every scaling sweep, then the figure. quick: smaller sweeps (a smoke run)."""
    if quick:
        rows = (bench_capacity((264, 1024), (1,), new_tokens=32, repeats=1)
                + bench_prompt_length((8, 128), new_tokens=16, repeats=1)
                + bench_early_exit(max_new=(4, 32), repeats=1)
                + bench_depth((2, 4)))
    else:
        rows = bench_capacity() + bench_prompt_length() + bench_early_exit() + bench_depth()
    plot_scaling(rows, out)
    print(json.dumps({"bench": "scaling", "figure": out}), flush=True)
    return rows
