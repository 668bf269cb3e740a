"""Samplers: logits [B, V] + PRNG key -> token ids int32 [B].

Each sampler is a small frozen dataclass (hashable: a static argument to `jit`), pure and
reproducible for a given key. They know nothing of the model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use Greedy() for argmax), got {temperature!r}")


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Argmax; ignores the key (the lowest id wins a tie)."""

    stochastic = False

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        del key
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Temperature:
    """Samples from softmax(logits / temperature)."""

    temperature: float = 1.0
    stochastic = True

    def __post_init__(self):
        _check_temperature(self.temperature)

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        return jax.random.categorical(key, logits / self.temperature, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopK:
    """Samples among the k highest logits (exactly k, ties broken by lower id), tempered."""

    k: int
    temperature: float = 1.0
    stochastic = True

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        _check_temperature(self.temperature)

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        k = min(self.k, logits.shape[-1])
        top_logits, top_ids = jax.lax.top_k(logits, k)  # [B, k]
        choice = jax.random.categorical(key, top_logits / self.temperature, axis=-1)  # [B]
        return jnp.take_along_axis(top_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopP:
    """Nucleus sampling: the smallest set of highest-probability tokens whose mass reaches p.

    Probabilities are those of the tempered distribution; the most likely token is always kept.
    """

    p: float
    temperature: float = 1.0
    stochastic = True

    def __post_init__(self):
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"p must lie in (0, 1], got {self.p!r}")
        _check_temperature(self.temperature)

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        logits = logits / self.temperature
        order = jnp.argsort(-logits, axis=-1)  # [B, V], most likely first
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep = mass_before < self.p  # the first token always has mass_before 0
        choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


Sampler = Greedy | Temperature | TopK | TopP
