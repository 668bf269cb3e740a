"""The cached decoder stepped from Python, one jitted call per token, each call timed: the
report's measured cost of decoding with the KV cache. `jaxdec.generate` runs the same two
functions (a family's prefill and step) in one compiled loop, which cannot time a step alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec import family
from jaxdec.tools.timing import timed


def _cached_functions(config):
    """The family's (prefill, step), jitted: the functions `jaxdec.generate` loops over."""
    fam = family.of(config)
    return (jax.jit(fam.prefill, static_argnames=("config", "capacity")),
            jax.jit(fam.step, static_argnames=("config",)))


def greedy_cached(params, config, prompt: np.ndarray, new_tokens: int, repeats: int,
                  source: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding with the KV cache, one call per step, each call timed.

    Step 1 is the prefill (its logits give token 1); step j > 1 feeds token j - 1 at position
    P + j - 2 to `decode_step`. The first pass decodes (and compiles); `repeats` more passes
    feed the same tokens and are timed, Python dispatch included.

    Args:
      prompt: int32 [P]. source: int32 [S] (encoder-decoder only).

    Returns:
      tokens int32 [n], and seconds float [n] per step (the fastest of the timed passes).
    """
    prefill, step = _cached_functions(config)
    P, n = len(prompt), new_tokens
    prompts, lengths = jnp.asarray(prompt, jnp.int32)[None], jnp.asarray([P], jnp.int32)  # [1, P], [1]
    src = (None, None) if source is None else (jnp.asarray(source, jnp.int32)[None],
                                               jnp.asarray([len(source)], jnp.int32))
    positions = [jnp.asarray([P + j], jnp.int32) for j in range(n - 1)]  # made before any timing
    tokens, fed = np.zeros(n, np.int32), []
    times = np.zeros((repeats + 1, n))
    for r in range(repeats + 1):
        (logits, cache), times[r, 0] = timed(lambda: prefill(params, config, prompts, lengths, P + n, *src))
        for j in range(1, n):
            if r == 0:
                tokens[j - 1] = int(np.argmax(logits[0]))
                fed.append(jnp.asarray(tokens[j - 1 : j]))
            (logits, cache), times[r, j] = timed(lambda: step(params, config, cache, fed[j - 1], positions[j - 1]))
        if r == 0:
            tokens[n - 1] = int(np.argmax(logits[0]))
    return tokens, times[1:].min(axis=0)
