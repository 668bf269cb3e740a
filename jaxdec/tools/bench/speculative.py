"""Speculative decoding on the real SmolLM2-135M-Instruct: what drafts buy over plain greedy
decoding, and what bounds it.

For each task (grounded: the answer quotes the prompt; chat: free-form answers) and batch size,
one JSON line per draft: an oracle (the target's own greedy continuation: the upper bound), a
random draft (the lower bound) and prompt lookup, with acceptance per draft position, tokens per
verification, the wall-clock speedup over plain greedy `generate` measured in the same run
(interleaved repeats), and whether the tokens equal plain greedy's. One line per batch size
gives the measured cost of verifying γ + 1 tokens relative to one step. At batch 1, transformers'
own `generate(prompt_lookup_num_tokens=γ)` on the same weights and prompts, beside its plain
greedy (it supports batch 1 only).
"""

from __future__ import annotations

import json
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

import jaxdec
from jaxdec import family, tuning
from jaxdec.speculative import Draft, Proposal
from jaxdec.tools.bench.common import xla_flags
from jaxdec.tools.timing import measure


@flax.struct.dataclass
class OracleDraft(Draft):
    """Proposes the target's own greedy continuation (continuation int32 [B, M], from a plain run
    on prompts of prompt_lengths int32 [B]): every draft is accepted, the upper bound."""

    continuation: jax.Array
    prompt_lengths: jax.Array
    num_tokens: int = flax.struct.field(pytree_node=False, default=4)

    def propose(self, state, history, sampler, key, tuning):
        newest = history.end - history.starts - self.prompt_lengths  # the newest token's index in the output
        cols = newest[:, None] + jnp.arange(1, self.num_tokens + 1, dtype=jnp.int32)[None, :]
        tokens = jnp.take_along_axis(self.continuation, jnp.clip(cols, 0, self.continuation.shape[1] - 1), axis=1)
        return Proposal(tokens=tokens, logits=None, found=jnp.ones(newest.shape, bool)), state


@flax.struct.dataclass
class RandomDraft(Draft):
    """Proposes uniformly random tokens: nearly nothing is accepted, the lower bound."""

    vocab_size: int = flax.struct.field(pytree_node=False)
    num_tokens: int = flax.struct.field(pytree_node=False, default=4)

    def propose(self, state, history, sampler, key, tuning):
        B = history.end.shape[0]
        tokens = jax.random.randint(key, (B, self.num_tokens), 0, self.vocab_size, jnp.int32)
        return Proposal(tokens=tokens, logits=None, found=jnp.ones((B,), bool)), state


# Passages the answer should quote (English prose, so the tokenizer's merges are typical).
PASSAGES = (
    "The quick brown fox jumps over the lazy dog. The dog did not move. The fox then jumped over the dog "
    "again, and again, until it was tired and went home to sleep in its den by the river.",
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex. "
    "Complex is better than complicated. Flat is better than nested. Sparse is better than dense.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity.",
    "To be, or not to be, that is the question: whether it is nobler in the mind to suffer the slings and "
    "arrows of outrageous fortune, or to take arms against a sea of troubles.",
)
CHAT = (
    "Write a short story about a cat who learns to fly.",
    "What are three good habits for staying healthy?",
    "Explain how a bicycle works to a ten-year-old.",
    "Describe your ideal weekend in a few sentences.",
)


def _prompts(task: str, batch: int) -> list[str]:
    if task == "grounded":
        return [f"Copy this paragraph word for word:\n\n{PASSAGES[b % len(PASSAGES)]}" for b in range(batch)]
    return [CHAT[b % len(CHAT)] for b in range(batch)]


def _verify_cost(params, config, batch: int, num_tokens: int, width: int, repeats: int) -> float:
    """Time of one extend of num_tokens + 1 tokens per row over that of one extend of one token,
    both with the logits computed, on a cache filled to `width` (16 extends per timed program)."""
    fam, tuned = family.of(config), tuning.for_arrays(params)
    prompts = jnp.ones((batch, width), jnp.int32)
    capacity = width + 16 * (num_tokens + 1) + 1
    laid_out = fam.decode_params(params, config, batch * (num_tokens + 1), tuning=tuned)
    _, cache = jax.jit(lambda p: fam.prefill(p, config, prompts, jnp.full((batch,), width, jnp.int32), capacity,
                                             tuning=tuned))(laid_out)
    cache = cache.per_row()

    def program(C):
        @jax.jit
        def run(params, cache):
            def body(i, carry):
                cache, acc = carry
                logits, cache = fam.extend(params, config, cache, jnp.ones((batch, C), jnp.int32), tuning=tuned)
                # Every logit is used, so that none of the work is dropped as dead code.
                return cache.replace(end=cache.end - C + 1), acc + jnp.sum(logits, axis=(1, 2))
            return jax.lax.fori_loop(0, 16, body, (cache, jnp.zeros((batch,), jnp.float32)))[1]
        return lambda: run(laid_out, cache)

    one, many = program(1), program(num_tokens + 1)
    times = {"one": [], "many": []}
    for _ in range(repeats):  # interleaved, so that the machine's drift hits both
        times["one"].append(measure(one, 1).seconds)
        times["many"].append(measure(many, 1).seconds)
    return float(np.median(times["many"]) / np.median(times["one"]))


def bench_speculative(batches=(1, 8), num_tokens: int = 4, new_tokens: int = 96, repeats: int = 3,
                      tasks=("grounded", "chat"), hf: bool = True) -> list[dict]:
    from jaxdec.hf import cli, fetch

    path = fetch.cached_path("smollm2") or fetch.fetch("smollm2")
    ckpt, tok, template = cli.load(gguf=path)
    config, special = ckpt.config, ckpt.special
    params = jax.tree.map(jnp.asarray, ckpt.params)
    laid_out = jaxdec.decode_params(params, config)
    eos = int(special.eos_id)
    hf_model = None
    if hf:
        import torch
        import transformers

        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    rows = []
    for batch in batches:
        cost = _verify_cost(params, config, batch, num_tokens, 128, repeats)
        row = {"bench": "speculative_verify_cost", "batch": batch, "num_tokens": num_tokens,
               "verify_over_step": round(cost, 3), "xla_flags": xla_flags()}
        rows.append(row)
        print(json.dumps(row), flush=True)
        for task in tasks:
            encoded = [tok.encode(cli.chat_prompt(template, t, tok, special)) for t in _prompts(task, batch)]
            prompts, lengths = cli._pad_rows(encoded, special.pad_id)
            capacity = prompts.shape[1] + new_tokens + num_tokens

            def run(draft=None):
                return jaxdec.generate(laid_out, config, prompts, lengths, max_new_tokens=new_tokens, eos_id=eos,
                                       pad_id=special.pad_id, capacity=capacity, draft=draft)

            plain = run()
            drafts = {
                "plain": None,
                "oracle": OracleDraft(plain.tokens, jnp.asarray(lengths), num_tokens=num_tokens),
                "random": RandomDraft(config.vocab_size, num_tokens=num_tokens),
                "prompt_lookup": jaxdec.PromptLookup(num_tokens=num_tokens, max_ngram=3),
            }
            times = {name: [] for name in drafts}
            results = {name: run(d) for name, d in drafts.items()}  # compile
            for _ in range(repeats):
                for name, d in drafts.items():
                    times[name].append(measure(lambda d=d: run(d).tokens, 1).seconds)
            generated = int(np.sum(plain.lengths))
            plain_s = float(np.median(times["plain"]))
            for name in drafts:
                r, seconds = results[name], float(np.median(times[name]))
                row = {"bench": "speculative", "task": task, "batch": batch, "draft": name,
                       "num_tokens": num_tokens, "generated_tokens": generated,
                       "tokens_per_s": round(generated / seconds, 1),
                       "speedup_over_plain": round(plain_s / seconds, 2)}
                if r.speculation is not None:
                    s = r.speculation
                    rounds, steps = int(np.sum(s.rounds)), int(np.sum(s.steps))
                    accepted = int(np.sum(s.accepted))
                    row |= {"acceptance_by_position": [round(float(a), 3) for a in np.asarray(s.acceptance_rate())],
                            "verifications": rounds, "plain_steps": steps,
                            "draft_proposals": int(np.sum(s.drafted)),
                            "tokens_per_verification": round((accepted + rounds) / max(rounds, 1), 2),
                            "tokens_equal_plain": bool(np.array_equal(np.asarray(r.tokens), np.asarray(plain.tokens)))}
                rows.append(row)
                print(json.dumps(row), flush=True)
            if hf_model is not None and batch == 1:
                jaxdec_tok_s = {name: generated / float(np.median(times[name])) for name in drafts}
                rows += _hf_prompt_lookup(hf_model, prompts, lengths, new_tokens, num_tokens, eos, special.pad_id,
                                          np.asarray(plain.tokens), jaxdec_tok_s, task, repeats)
    return rows


def _hf_prompt_lookup(hf_model, prompts, lengths, new_tokens, num_tokens, eos, pad, jaxdec_tokens, jaxdec_tok_s,
                      task, repeats) -> list[dict]:
    """transformers' greedy generate, plain and with prompt_lookup_num_tokens, on row 0, and
    jaxdec's tokens/s (plain, prompt lookup) over each."""
    import torch

    n = int(lengths[0])
    ids = torch.from_numpy(np.asarray(prompts[:1, :n])).long()

    def go(**kw):
        with torch.no_grad():
            return hf_model.generate(ids, do_sample=False, max_new_tokens=new_tokens, eos_token_id=eos,
                                     pad_token_id=pad, **kw)

    variants = {"hf_plain": {}, "hf_prompt_lookup": {"prompt_lookup_num_tokens": num_tokens}}
    outs = {name: go(**kw) for name, kw in variants.items()}
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, kw in variants.items():
            times[name].append(measure(lambda kw=kw: go(**kw), 1).seconds)
    rows = []
    for name in variants:
        out = outs[name][0, n:].numpy()
        seconds = float(np.median(times[name]))
        want = jaxdec_tokens[0, :len(out)]
        row = {"bench": "speculative_hf", "task": task, "batch": 1, "draft": name, "num_tokens": num_tokens,
               "generated_tokens": int(len(out)), "tokens_per_s": round(len(out) / seconds, 1),
               "jaxdec_plain_over_this": round(jaxdec_tok_s["plain"] * seconds / len(out), 2),
               "jaxdec_prompt_lookup_over_this": round(jaxdec_tok_s["prompt_lookup"] * seconds / len(out), 2),
               "torch_threads": torch.get_num_threads(),
               "tokens_equal_jaxdec": bool(np.array_equal(out, want))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows
