"""Shared test setup: strict broadcasting and dtype promotion, a PRNG key fixture, and the tiny decoder configs.

The configs are deliberately tiny (vocab 37, d_model 32, 2 layers) and are shared by the model
and decode tests: equal frozen configs hash equal, so `jax.jit` reuses compiled programs across
test files. `init_std=0.4` (instead of GPT-2's 0.02) gives a random model whose greedy outputs
vary from step to step, so token-level comparisons are not trivially satisfied by a model that
repeats one token.
"""

from __future__ import annotations

import gc
import os

import jax
import pytest

from jaxdec import DecoderConfig, init_params

# Implicit rank promotion hides shape bugs (a [B] array silently broadcast against [B, T]).
jax.config.update("jax_numpy_rank_promotion", "raise")
# Implicit dtype promotion hides dtype bugs (a bool mask times float32 weights, an int64 index
# next to an int32 one under jax_enable_x64): every mix of dtypes must be an explicit cast.
jax.config.update("jax_numpy_dtype_promotion", "strict")

_TINY = dict(vocab_size=37, num_layers=2, d_model=32, num_heads=4, max_len=32, init_std=0.4)

# One config per feature axis the decode path must get right; not a cartesian product.
DECODER_CONFIGS = {
    # GPT-2 defaults: learned positions, pre-LN, tanh-GELU, biases, tied head.
    "learned": DecoderConfig(**_TINY),
    # Original-Transformer style: sinusoidal positions, sqrt(D) embedding scale, exact GELU.
    "sinusoidal_gelu": DecoderConfig(**_TINY, position="sinusoidal", embed_scale=True, activation="gelu"),
    # Llama-ish: RoPE with grouped-query attention (4 query heads share 2 K/V heads).
    "rope_gqa": DecoderConfig(**_TINY, position="rope", num_kv_heads=2),
    # Multi-query attention (one K/V head) with post-LN (no final norm).
    "mqa_postln": DecoderConfig(**_TINY, num_kv_heads=1, norm_position="post"),
    # Untied output head, ReLU MLP, no biases anywhere, RoPE.
    "untied_relu_nobias": DecoderConfig(
        **_TINY, position="rope", tie_embeddings=False, activation="relu", use_bias=False
    ),
}


@pytest.fixture
def key() -> jax.Array:
    return jax.random.key(0)


@pytest.fixture(params=list(DECODER_CONFIGS.values()), ids=list(DECODER_CONFIGS))
def decoder_config(request) -> DecoderConfig:
    """Each of the tiny decoder configs in turn."""
    return request.param


@pytest.fixture(params=["learned", "sinusoidal_gelu", "rope_gqa"])
def position_config(request) -> DecoderConfig:
    """One config per position type (learned, sinusoidal, RoPE)."""
    return DECODER_CONFIGS[request.param]


@pytest.fixture(scope="session")
def decoder_configs() -> dict[str, DecoderConfig]:
    """All tiny configs by name, for tests that parametrize over a subset by name."""
    return DECODER_CONFIGS


@pytest.fixture
def base_config() -> DecoderConfig:
    """The GPT-2-style tiny config used where one config suffices."""
    return DECODER_CONFIGS["learned"]


_PARAMS: dict = {}


@pytest.fixture(scope="session")
def params_for():
    """params_for(config, seed=0): random params, built once per (config, seed) per session."""

    def get(config: DecoderConfig, seed: int = 0):
        if (config, seed) not in _PARAMS:
            _PARAMS[config, seed] = init_params(config, jax.random.key(seed))
        return _PARAMS[config, seed]

    return get


def _memory_maps() -> tuple[int, int] | None:
    """(memory mappings of this process, the kernel's limit), on Linux; else None."""
    try:
        with open("/proc/self/maps") as maps, open("/proc/sys/vm/max_map_count") as limit:
            return sum(1 for _ in maps), int(limit.read())
    except OSError:
        return None


@pytest.fixture(scope="module", autouse=True)
def _bounded_compiled_programs():
    """Each compiled XLA CPU program maps its code into the process; one pytest process compiles
    thousands, and past the kernel's vm.max_map_count (65,530 by default) the compiler crashed
    mid-suite. After a test file, once the mappings pass half the limit, the compiled programs
    are dropped (later files recompile what they share)."""
    yield
    counts = _memory_maps()
    if counts is not None and counts[0] > counts[1] // 2:
        jax.clear_caches()
        gc.collect()
