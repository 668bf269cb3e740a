"""Tests for jaxdec.sampling: shapes, jit == eager, key determinism, the support of TopK / TopP,
limits that reduce to greedy, and empirical frequencies against the softmax probabilities."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdec.sampling import Greedy, Temperature, TopK, TopP

# Upper 1e-6 quantiles of the chi-square distribution by degrees of freedom: a correct sampler
# exceeds them with probability 1e-6 (and the keys are fixed, so a pass is reproducible).
CHI2_CRIT_1E6 = {1: 23.93, 2: 27.63, 3: 30.66, 4: 33.38, 5: 35.89}

# A hand-made logits vector over 6 ids; by probability the order is 2, 4, 0, 5, 1, 3.
LOGITS = np.array([1.0, -0.5, 2.0, -2.0, 1.5, 0.2], np.float32)
PROBS = np.exp(LOGITS - LOGITS.max()) / np.exp(LOGITS - LOGITS.max()).sum()
N_DRAWS = 20_000

ALL_SAMPLERS = [Greedy(), Temperature(0.7), TopK(2, temperature=2.0), TopP(0.5, temperature=1.5)]

# Batched logits [64, 37] for the batch-level tests (one shape: eager ops compile once).
RANDOM_LOGITS = jnp.asarray(np.random.default_rng(0).standard_normal((64, 37), np.float32))


def draws(sampler, logits=LOGITS, n=N_DRAWS, seed=0) -> np.ndarray:
    """n draws of one token from a [V] logits vector, one PRNG key per draw."""
    keys = jax.random.split(jax.random.key(seed), n)
    one = lambda k: sampler(jnp.asarray(logits)[None, :], k)[0]  # noqa: E731
    return np.asarray(jax.jit(jax.vmap(one))(keys))


def chi_square(samples: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic of the sample counts against probs (zero-probability ids must not occur)."""
    counts = np.bincount(samples, minlength=len(probs))
    support = probs > 0
    assert counts[~support].sum() == 0, f"drew ids outside the support: {np.flatnonzero(counts * ~support)}"
    expected = probs[support] * len(samples)
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


# --- shapes, jit, keys ------------------------------------------------------------------------


class SamplerVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shapes_and_jit_agree(self):
        logits, key = RANDOM_LOGITS, jax.random.key(3)
        sample_all = self.variant(lambda logits, key: [sampler(logits, key) for sampler in ALL_SAMPLERS])
        for sampler, tokens in zip(ALL_SAMPLERS, sample_all(logits, key)):
            chex.assert_shape(tokens, (64,))
            chex.assert_type(tokens, jnp.int32)
            np.testing.assert_array_equal(tokens, sampler(logits, key))  # same key, same draws
            assert ((tokens >= 0) & (tokens < 37)).all()


@pytest.mark.parametrize("sampler", [Temperature(1.0), TopK(5), TopP(0.5)], ids=lambda s: type(s).__name__)
def test_same_key_same_samples_different_keys_differ(sampler, key):
    # Flat logits: 64 rows each with >= 5 equally likely ids, so two keys giving identical rows
    # has probability <= 5^-64 for a sampler that uses its key.
    logits = jnp.zeros((64, 37))
    a = sampler(logits, key)
    np.testing.assert_array_equal(a, sampler(logits, jax.random.clone(key)))
    for other in jax.random.split(key, 2):
        assert (np.asarray(a) != np.asarray(sampler(logits, other))).any()
    assert len(np.unique(np.asarray(a))) >= 5  # the rows do vary


def test_greedy_is_argmax_ignores_key_and_breaks_ties_low():
    expected = np.argmax(np.asarray(RANDOM_LOGITS), -1)
    for seed in range(3):
        np.testing.assert_array_equal(Greedy()(RANDOM_LOGITS, jax.random.key(seed)), expected)
    tied = jnp.array([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    np.testing.assert_array_equal(Greedy()(tied, jax.random.key(0)), [1, 0])


def test_greedy_matches_numpy_argmax_on_nonfinite_rows_under_jit():
    """Greedy's two-reduction argmax against numpy's: the first NaN wins over everything, inf
    over finite values, a row of -inf gives id 0; under jit (the decode loop's setting)."""
    nan, inf = np.nan, np.inf
    rows = np.array([[1.0, nan, 3.0, nan, 2.0],
                     [-inf, -inf, -inf, -inf, -inf],
                     [inf, 0.0, inf, 1.0, -inf],
                     [-inf, -1.0, -inf, -2.0, -1.0],
                     [3.0, 2.0, 1.0, 0.0, nan],
                     [-0.0, 0.0, -1.0, -0.0, -5.0]], np.float32)
    got = jax.jit(Greedy())(jnp.asarray(rows), jax.random.key(0))
    np.testing.assert_array_equal(got, np.argmax(rows, axis=-1))
    np.testing.assert_array_equal(got, [1, 0, 0, 1, 4, 0])
    assert got.dtype == jnp.int32


# --- support ----------------------------------------------------------------------------------


@pytest.mark.parametrize("k, top", [(1, {2}), (2, {2, 4}), (3, {2, 4, 0}), (5, {2, 4, 0, 5, 1})])
def test_topk_never_leaves_the_top_k(k, top):
    samples = draws(TopK(k), n=2000)
    assert set(samples.tolist()) == top  # every top-k id shows up, and nothing else


def test_topk_breaks_ties_by_lower_id_and_handles_k_above_vocab():
    tied = np.array([0.0, 1.0, 1.0, 1.0, -1.0], np.float32)  # ids 1, 2, 3 tie for the top
    assert set(draws(TopK(2), tied, n=500).tolist()) == {1, 2}
    assert set(draws(TopK(50), LOGITS, n=2000).tolist()) == set(range(6))


# Probabilities of LOGITS, most likely first: ids 2, 4, 0, 5, 1, 3 with .446, .271, .164, .074,
# .037, .008 (cumulative .446, .717, .881, .955, .992, 1). The p values avoid those boundaries.
@pytest.mark.parametrize(
    "p, nucleus",
    [(0.3, {2}), (0.6, {2, 4}), (0.8, {2, 4, 0}), (0.93, {2, 4, 0, 5}), (1.0, set(range(6)))],
)
def test_topp_never_leaves_the_nucleus(p, nucleus):
    # The nucleus by hand: the fewest most-likely ids whose total probability reaches p.
    order = np.argsort(-PROBS)
    mass = np.cumsum(PROBS[order])
    assert set(order[: int(np.searchsorted(mass, p)) + 1].tolist()) == nucleus  # the table is right
    samples = draws(TopP(p), n=4000)
    assert set(samples.tolist()) == nucleus


def test_topp_tiny_p_and_topk_1_are_greedy():
    expected = np.argmax(np.asarray(RANDOM_LOGITS), -1)
    for seed in range(3):
        np.testing.assert_array_equal(TopP(1e-6)(RANDOM_LOGITS, jax.random.key(seed)), expected)
        np.testing.assert_array_equal(TopK(1)(RANDOM_LOGITS, jax.random.key(seed)), expected)


def test_tiny_temperature_is_greedy():
    # Distinct logits 0.05 apart: at temperature 1e-4 the runner-up is e^-500 times less likely.
    rng = np.random.default_rng(3)
    logits = jnp.asarray(np.stack([rng.permutation(37) * 0.05 for _ in range(64)]).astype(np.float32))
    expected = np.argmax(np.asarray(logits), -1)
    for seed in range(3):
        np.testing.assert_array_equal(Temperature(1e-4)(logits, jax.random.key(seed)), expected)


# --- frequencies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler, probs",
    [
        (Temperature(1.0), PROBS),
        (Temperature(2.0), softmax(LOGITS / 2.0)),
        (TopK(3), np.where(np.isin(np.arange(6), [2, 4, 0]), PROBS, 0.0) / PROBS[[2, 4, 0]].sum()),
        (TopK(3, temperature=0.5), np.where(np.isin(np.arange(6), [2, 4, 0]), softmax(LOGITS / 0.5), 0.0)
         / softmax(LOGITS / 0.5)[[2, 4, 0]].sum()),
        (TopP(0.93), np.where(np.isin(np.arange(6), [2, 4, 0, 5]), PROBS, 0.0) / PROBS[[2, 4, 0, 5]].sum()),
        # Tempered nucleus: softmax(LOGITS / 2) has cumulative .311, .553, .742, .869, ... so p=0.8
        # keeps four ids here (at temperature 1 it would keep three).
        (TopP(0.8, temperature=2.0), np.where(np.isin(np.arange(6), [2, 4, 0, 5]), softmax(LOGITS / 2.0), 0.0)
         / softmax(LOGITS / 2.0)[[2, 4, 0, 5]].sum()),
    ],
    ids=["temperature_1", "temperature_2", "topk_3", "topk_3_temperature_0.5", "topp_0.93",
         "topp_0.8_temperature_2"],
)
def test_empirical_frequencies_match_probabilities(sampler, probs):
    samples = draws(sampler)
    stat, dof = chi_square(samples, probs)
    assert stat < CHI2_CRIT_1E6[dof], (stat, np.bincount(samples, minlength=6) / N_DRAWS, probs)


def test_frequency_check_detects_a_wrong_temperature():
    # The test above has power: Temperature(2.0)'s draws are far from softmax(logits / 1).
    stat, dof = chi_square(draws(Temperature(2.0)), PROBS)
    assert stat > 10 * CHI2_CRIT_1E6[dof]


# --- parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: TopK(0),
        lambda: TopK(-1),
        lambda: TopK(2.5),
        lambda: TopK(3, temperature=0.0),
        lambda: TopP(0.0),
        lambda: TopP(-0.1),
        lambda: TopP(1.5),
        lambda: TopP(0.9, temperature=-1.0),
        lambda: Temperature(0.0),
        lambda: Temperature(-1.0),
    ],
    ids=["topk_0", "topk_negative", "topk_float", "topk_temp_0", "topp_0", "topp_negative", "topp_above_1",
         "topp_temp_negative", "temperature_0", "temperature_negative"],
)
def test_bad_sampler_parameters_raise(make):
    with pytest.raises(ValueError):
        make()


def test_samplers_are_hashable_values():
    # Static arguments to jit: equal parameters must hash equal (one compiled program).
    assert hash(TopK(3)) == hash(TopK(3)) and TopK(3) == TopK(3) and TopK(3) != TopK(4)
    assert hash(TopP(0.9)) == hash(TopP(0.9)) and Temperature(0.5) == Temperature(0.5)
    assert Greedy() == Greedy() and not Greedy.stochastic and TopP.stochastic
    TopP(1.0), TopK(1), Temperature(1e-6)  # the edges of the valid ranges are accepted
