"""Samplers: logits [B, V] + PRNG key -> token ids int32 [B].

A sampler is any hashable callable (a static argument to `jit`; a frozen dataclass is the
natural form) with `__call__(logits float32 [B, V], key) -> int32 [B]` and a bool attribute
`stochastic` (False: the key is ignored, so `generate` needs none). A stochastic sampler may
also define `warp(logits [..., V]) -> [..., V]`: logits whose softmax is exactly the
distribution it draws from (-inf where it never draws); speculative decoding with a draft model
then accepts drafts by the probability ratio (`jaxdec.speculative`). `Sampler` is an optional
base class that adds `draw`, n distinct ids per row, which beam search uses to pick its 2W
candidates. Samplers are pure, reproducible for a given key, and know nothing of the model.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxdec import checks


def draw(sampler, logits: jax.Array, key: jax.Array, n: int) -> jax.Array:
    """n distinct ids per row, in the order drawn: int32 [B, n].

    Uses `sampler.draw` if it has one; otherwise calls the sampler n times, each time with the
    ids already drawn set to -inf (sampling without replacement).
    """
    if hasattr(sampler, "draw"):
        return sampler.draw(logits, key, n)
    return draw_in_turn(sampler, logits, key, n)


def draw_in_turn(sampler, logits: jax.Array, key: jax.Array, n: int) -> jax.Array:
    """`draw` by n calls of `sampler`, removing each drawn id from the next calls."""
    rows = jnp.arange(logits.shape[0], dtype=jnp.int32)

    def one(logits, key):
        ids = sampler(logits, key).astype(jnp.int32)  # [B]
        return logits.at[rows, ids].set(-jnp.inf), ids

    _, ids = jax.lax.scan(one, logits, jax.random.split(key, n))  # [n, B]
    return ids.T


def argmax(logits: jax.Array, form: str = "jnp") -> jax.Array:
    """`jnp.argmax` over the last axis, int32: the first index of the row's max, or of its first
    NaN if it has one (the max is then NaN). form "two_reductions" computes it as the max, then
    the lowest index holding it: the same ids, in two plain reductions, which XLA's CPU backend
    runs faster than argmax's (value, index) reduction (`tuning.Tuning.argmax`)."""
    if form == "jnp":
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    V = logits.shape[-1]
    best = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == best) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, jnp.arange(V, dtype=jnp.int32), V), axis=-1).astype(jnp.int32)


def tuned(sampler, tuning):
    """The sampler a program on `tuning`'s platform runs: `sampler.tuned(tuning)` where the sampler
    has that method (the same distribution, in the platform's form), else the sampler itself."""
    return sampler.tuned(tuning) if hasattr(sampler, "tuned") else sampler


class Sampler:
    """Optional base class of samplers: subclass it as a frozen dataclass, set `stochastic`, and
    write `__call__(logits float32 [B, V], key) -> int32 [B]`."""

    stochastic: ClassVar[bool] = True

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        raise NotImplementedError

    def draw(self, logits: jax.Array, key: jax.Array, n: int) -> jax.Array:
        """n distinct ids per row: int32 [B, n] (see `draw_in_turn`)."""
        return draw_in_turn(self, logits, key, n)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use Greedy() for argmax), got {temperature!r}")


@dataclasses.dataclass(frozen=True)
class Greedy(Sampler):
    """Argmax; ignores the key (the lowest id wins a tie). argmax_form: how the argmax is
    computed (`argmax`), set by the decode programs from the platform's tuning."""

    argmax_form: str = "jnp"
    stochastic: ClassVar[bool] = False

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        del key
        return argmax(logits, self.argmax_form)

    def __post_init__(self):
        if self.argmax_form not in ("jnp", "two_reductions"):
            raise ValueError(f"argmax_form must be 'jnp' or 'two_reductions', got {self.argmax_form!r}")

    def tuned(self, tuning) -> "Greedy":
        return dataclasses.replace(self, argmax_form=tuning.argmax)

    def draw(self, logits: jax.Array, key: jax.Array, n: int) -> jax.Array:
        """The n highest logits, best first (what n argmaxes in turn would give), in one top_k."""
        del key
        return jax.lax.top_k(logits, n)[1].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Temperature(Sampler):
    """Samples from softmax(logits / temperature)."""

    temperature: float = 1.0
    stochastic: ClassVar[bool] = True

    def __post_init__(self):
        _check_temperature(self.temperature)

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        return jax.random.categorical(key, logits / self.temperature, axis=-1).astype(jnp.int32)

    def warp(self, logits: jax.Array) -> jax.Array:
        """logits [..., V] -> the tempered logits this sampler draws from."""
        return logits / self.temperature


@dataclasses.dataclass(frozen=True)
class TopK(Sampler):
    """Samples among the k highest logits (exactly k, ties broken by lower id), tempered."""

    k: int
    temperature: float = 1.0
    stochastic: ClassVar[bool] = True

    def __post_init__(self):
        checks.positive_int("k", self.k)
        _check_temperature(self.temperature)

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        k = min(self.k, logits.shape[-1])
        top_logits, top_ids = jax.lax.top_k(logits, k)  # [B, k]
        choice = jax.random.categorical(key, top_logits / self.temperature, axis=-1)  # [B]
        return jnp.take_along_axis(top_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    def warp(self, logits: jax.Array) -> jax.Array:
        """logits [..., V] -> tempered logits, -inf outside the k ids `__call__` chooses among."""
        k = min(self.k, logits.shape[-1])
        _, top_ids = jax.lax.top_k(logits, k)  # [..., k]
        keep = jnp.put_along_axis(jnp.zeros(logits.shape, bool), top_ids, True, axis=-1, inplace=False)
        return jnp.where(keep, logits / self.temperature, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class TopP(Sampler):
    """Nucleus sampling: the smallest set of highest-probability tokens whose mass reaches p.

    Probabilities are those of the tempered distribution; the most likely token is always kept.
    """

    p: float
    temperature: float = 1.0
    stochastic: ClassVar[bool] = True

    def __post_init__(self):
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"p must lie in (0, 1], got {self.p!r}")
        _check_temperature(self.temperature)

    def warp(self, logits: jax.Array) -> jax.Array:
        """logits [..., V] -> tempered logits, -inf outside the nucleus `__call__` chooses in."""
        logits = logits / self.temperature
        order = jnp.argsort(-logits, axis=-1)  # [..., V], most likely first
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep_sorted = jnp.cumsum(probs, axis=-1) - probs < self.p
        keep = jnp.put_along_axis(jnp.zeros_like(keep_sorted), order, keep_sorted, axis=-1, inplace=False)
        return jnp.where(keep, logits, -jnp.inf)

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        logits = logits / self.temperature
        order = jnp.argsort(-logits, axis=-1)  # [B, V], most likely first
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep = mass_before < self.p  # the first token always has mass_before 0
        choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

