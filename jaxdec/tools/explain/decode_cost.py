"""What the KV cache saves, counted and measured: greedy decoding of n tokens both ways, the
uncached path (a full forward over the growing prefix per token) and the cached one (the prompt
once, then one query row per token). FLOPs come from `jaxdec.tools.costs`; times from
`jaxdec.tools.timing`, the fastest of `repeats` calls each."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec import api
from jaxdec.tools.costs import decoder_flops, encoder_flops
from jaxdec.tools.explain.stepping import greedy_cached
from jaxdec.tools.timing import measure


@dataclasses.dataclass
class DecodeCost:
    """Greedy decoding of n tokens after a P-token prompt, per generated step j = 1..n.

    Attributes:
      steps: int [n], 1..n.
      uncached_rows, cached_rows: int [n], query rows computed at each step. Uncached: the whole
        prefix, P + j - 1 rows. Cached: the prompt at step 1 (prefill), then one row.
      uncached_flops, cached_flops: float [n], matmul FLOPs counted from the config.
      sampled_steps: int [k], the steps whose uncached forward was timed;
        uncached_seconds_sampled: float [k], their fastest seconds; uncached_seconds: float [n],
        linear between them (equal to the timings when every step was timed).
      cached_seconds: float [n], measured: step 1 the prefill, step j > 1 one cached step.
      generated: int [n], the greedy tokens.
      prompt_len: P.
      repeats: timed runs per figure (the fastest is kept).
    """

    steps: np.ndarray
    uncached_rows: np.ndarray
    cached_rows: np.ndarray
    uncached_flops: np.ndarray
    cached_flops: np.ndarray
    sampled_steps: np.ndarray
    uncached_seconds_sampled: np.ndarray
    uncached_seconds: np.ndarray
    cached_seconds: np.ndarray
    generated: np.ndarray
    prompt_len: int
    repeats: int

    @property
    def uncached_exact(self) -> bool:
        """Every uncached step was timed (no interpolation)."""
        return len(self.sampled_steps) == len(self.steps)


_apply = jax.jit(api.apply, static_argnames=("config",))


def measure_decode_cost(params, config, prompt: np.ndarray, new_tokens: int, *, samples: int,
                        repeats: int, source: np.ndarray | None = None) -> DecodeCost:
    """Counts and times greedy decoding of `new_tokens` tokens after `prompt`, both ways.

    Cached: `greedy_cached` (prefill, then one `decode_step` per token). Uncached: step j runs a
    full forward (`jaxdec.api.apply`, jitted) over the prefix of P + j - 1 tokens, as a model
    without a cache must, timed at `samples` evenly spaced steps (one compilation per length).

    Args:
      prompt: int32 [P], the decoder prompt. source: int32 [S] (encoder-decoder only).
      new_tokens: n >= 2. samples: >= 2 timed uncached steps. repeats: >= 1 timings per figure.
    """
    P, n = len(prompt), new_tokens
    generated, cached_seconds = greedy_cached(params, config, prompt, n, repeats, source)
    enc = {} if source is None else {"source": jnp.asarray(source, jnp.int32)[None],
                                     "source_lengths": jnp.asarray([len(source)], jnp.int32)}
    sequence = np.concatenate([prompt, generated]).astype(np.int32)
    sampled = np.unique(np.linspace(1, n, min(samples, n)).round().astype(int))
    sampled_seconds = []
    for j in sampled:
        t = P + j - 1
        tokens, lengths = jnp.asarray(sequence[:t])[None], jnp.asarray([t], jnp.int32)  # [1, t], [1]
        sampled_seconds.append(measure(lambda: _apply(params, config, tokens, lengths, **enc), repeats,
                                       statistic="fastest").seconds)

    S_src = 0 if source is None else len(source)
    steps = np.arange(1, n + 1)
    prefix = P + steps - 1  # tokens the uncached forward reruns; keys the cached step attends to
    encoder = encoder_flops(config, S_src) if source is not None else 0
    uncached_flops = np.array([decoder_flops(config, t, t, t, S_src) + encoder for t in prefix], float)
    # The cached path encodes once, prefills the prompt (logits of its last row only), then runs
    # one query row per step over the filled cache slots.
    cached_flops = np.array([decoder_flops(config, P, P, 1, S_src) + encoder]
                            + [decoder_flops(config, 1, t + 1, 1, S_src) for t in prefix[1:]], float)
    return DecodeCost(steps=steps, uncached_rows=prefix, cached_rows=np.array([P] + [1] * (n - 1)),
                      uncached_flops=uncached_flops, cached_flops=cached_flops, sampled_steps=sampled,
                      uncached_seconds_sampled=np.asarray(sampled_seconds),
                      uncached_seconds=np.interp(steps, sampled, sampled_seconds),
                      cached_seconds=cached_seconds, generated=generated, prompt_len=P,
                      repeats=repeats)


def cost_summary(cost: DecodeCost) -> list[tuple[str, str, str, str]]:
    """(what, uncached, cached, uncached / cached) rows: totals counted and measured."""
    def ratio(a, b):
        return f"{a / b:.1f}x" if b > 0 else "-"

    rows_u, rows_c = int(cost.uncached_rows.sum()), int(cost.cached_rows.sum())
    flops_u, flops_c = cost.uncached_flops.sum(), cost.cached_flops.sum()
    time_u, time_c = cost.uncached_seconds.sum(), cost.cached_seconds.sum()
    return [
        ("query rows", f"{rows_u:,}", f"{rows_c:,}", ratio(rows_u, rows_c)),
        ("FLOPs, counted", f"{flops_u / 1e9:.4f} G", f"{flops_c / 1e9:.4f} G", ratio(flops_u, flops_c)),
        ("time, measured" + ("" if cost.uncached_exact else " *"),
         f"{time_u * 1e3:.1f} ms", f"{time_c * 1e3:.1f} ms", ratio(time_u, time_c)),
    ]
