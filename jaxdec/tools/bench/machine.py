"""What this machine can do, measured: the matmul peak a train step is compared with, and the
rates at which memory is read (a plain sum, and XLA's matrix-vector products) that bound a
memory-bound decode step."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdec.tools.timing import measure


def measure_matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    """fp32 FLOP/s of one jitted n x n x n matmul (median), the reference for efficiency."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    return 2 * n**3 / measure(lambda: mm(a, b), repeats).seconds


def measure_read_bandwidth(megabytes: int = 512, repeats: int = 7) -> float:
    """Bytes/s of one jitted sum over a float32 array of `megabytes` (best of `repeats`): the
    rate a memory-bound decode step can at most stream weights at on this machine."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return x.nbytes / measure(lambda: total(x), repeats, statistic="fastest").seconds


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
    return sum(w.nbytes for w in weights) / measure(lambda: chain(weights, x), repeats, statistic="fastest").seconds
