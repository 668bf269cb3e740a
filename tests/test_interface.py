"""The family interface, open samplers, params-vs-config checks, non-finite flags and the one
positive-int check: each against an independent computation or a wrong input that must raise."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec
from jaxdec import checks, family, model, sampling
from jaxdec import inspect as jinspect

V = 37
CONFIG = jaxdec.DecoderConfig(vocab_size=V, num_layers=2, d_model=32, num_heads=4, max_len=32,
                              norm_position="pre")
PROMPTS = np.array([[3, 4, 5, 6], [7, 8, 0, 0]], np.int32)
LENGTHS = np.array([4, 2], np.int32)
NEW = 5


@pytest.fixture(scope="module")
def params():
    params = jaxdec.init_params(CONFIG, jax.random.key(0))
    # Larger weights than the init's, so that greedy outputs depend on the prompt.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


# --- one interface per family -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WrappedConfig:
    """A third family's config: a decoder-only LM whose logits are negated (a model unknown to
    the loops: it must decode through its registered Family alone)."""

    inner: jaxdec.DecoderConfig

    @property
    def vocab_size(self):
        return self.inner.vocab_size

    @property
    def max_len(self):
        return self.inner.max_len


def _negate(fn):
    def wrapped(params, config, *args, **kwargs):
        logits, rest = fn(params, config.inner, *args, **kwargs)
        return -logits, rest
    return wrapped


NEGATED = family.Family(
    name="negated",
    takes_source=False,
    init=lambda config, key: model.FAMILY.init(config.inner, key),
    forward=lambda params, config, *a, **k: -model.FAMILY.forward(params, config.inner, *a, **k),
    prefill=_negate(model.FAMILY.prefill),
    step=_negate(model.FAMILY.step),
    prefill_uncached=_negate(model.FAMILY.prefill_uncached),
    recompute_step=_negate(model.FAMILY.recompute_step),
    select_rows=model.FAMILY.select_rows,
    repeat_rows=model.FAMILY.repeat_rows,
)
family.register(WrappedConfig, NEGATED)


def test_family_of_known_configs_and_unknown_raises():
    assert family.of(CONFIG) is model.FAMILY
    seq = jaxdec.Seq2SeqConfig(V, 1, 1, 32, 4, 32)
    assert family.of(seq).takes_source and family.of(seq).name == "encoder-decoder"
    with pytest.raises(ValueError, match="config must be a model config .* got dict"):
        jaxdec.init_params({"vocab_size": V}, jax.random.key(0))


def test_new_family_decodes_through_its_interface_only(params):
    """Greedy decoding of the negated model picks argmin of the base model's logits: the loops
    (generate, both paths, and beam search) reach it only through the registered Family."""
    wrapped = WrappedConfig(CONFIG)
    base = jaxdec.generate(params, CONFIG, PROMPTS, LENGTHS, max_new_tokens=NEW,
                           sampler=ArgMin(), return_logits=True)
    for use_cache in (True, False):
        got = jaxdec.generate(params, wrapped, PROMPTS, LENGTHS, max_new_tokens=NEW, use_cache=use_cache,
                              return_logits=True)
        np.testing.assert_array_equal(got.tokens, base.tokens)
        np.testing.assert_allclose(got.logits, -base.logits, atol=1e-5, rtol=0)
    logits = jaxdec.forward(params, wrapped, PROMPTS, LENGTHS)
    np.testing.assert_allclose(logits, -jaxdec.forward(params, CONFIG, PROMPTS, LENGTHS), atol=1e-6, rtol=0)
    beams, scores = jaxdec.beam_search(params, wrapped, PROMPTS, LENGTHS, beam_size=2, max_new_tokens=3)
    assert beams.tokens.shape == (2, 3) and np.all(np.isfinite(scores))


# --- open samplers ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ArgMin:
    """A user-written deterministic sampler (no jaxdec base class): the least likely token."""

    stochastic = False

    def __call__(self, logits, key):
        return jnp.argmin(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class ArgMax:
    """A user-written copy of Greedy, without `draw`: beam search must draw with it in turn."""

    stochastic = False

    def __call__(self, logits, key):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Gumbel(jaxdec.Sampler):
    """A user-written stochastic sampler on the jaxdec base class: argmax of logits + Gumbel noise."""

    temperature: float = 1.0

    def __call__(self, logits, key):
        noise = jax.random.gumbel(key, logits.shape)
        return jnp.argmax(logits / self.temperature + noise, axis=-1).astype(jnp.int32)


def test_user_sampler_in_generate_follows_its_rule(params):
    out = jaxdec.generate(params, CONFIG, PROMPTS, LENGTHS, max_new_tokens=NEW, sampler=ArgMin(),
                          return_logits=True)
    np.testing.assert_array_equal(out.tokens, np.argmin(np.asarray(out.logits), axis=-1))
    assert not np.any(out.nonfinite)


def test_user_stochastic_sampler_needs_key_and_is_reproducible(params):
    with pytest.raises(ValueError, match="Gumbel samples at random: pass key"):
        jaxdec.generate(params, CONFIG, PROMPTS, LENGTHS, max_new_tokens=NEW, sampler=Gumbel())
    runs = [jaxdec.generate(params, CONFIG, PROMPTS, LENGTHS, max_new_tokens=NEW, sampler=Gumbel(3.0),
                            key=jax.random.key(k)).tokens for k in (5, 5, 6)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


@pytest.mark.slow(reason="time budget: compiles beam search for a user sampler")
def test_user_sampler_in_beam_search(params):
    """A user argmax without `draw` gives beam search exactly the default's (top_k) beams, and a
    stochastic sampler runs a reproducible sampled beam search."""
    kwargs = dict(beam_size=3, max_new_tokens=4, eos_id=9)
    want, want_scores = jaxdec.beam_search(params, CONFIG, PROMPTS, LENGTHS, **kwargs)
    got, got_scores = jaxdec.beam_search(params, CONFIG, PROMPTS, LENGTHS, sampler=ArgMax(), **kwargs)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-6, rtol=0)
    sampled = [jaxdec.beam_search(params, CONFIG, PROMPTS, LENGTHS, sampler=Gumbel(2.0),
                                  key=jax.random.key(3), **kwargs)[0].tokens for _ in range(2)]
    np.testing.assert_array_equal(sampled[0], sampled[1])


def test_draw_in_turn_equals_top_k_for_argmax():
    logits = jax.random.normal(jax.random.key(0), (4, 23))
    np.testing.assert_array_equal(sampling.draw(ArgMax(), logits, jax.random.key(1), 6),
                                  jax.lax.top_k(logits, 6)[1])
    drawn = np.asarray(sampling.draw(Gumbel(), logits, jax.random.key(1), 23))
    assert all(sorted(row) == list(range(23)) for row in drawn)  # without replacement


@dataclasses.dataclass
class Unhashable:
    stochastic = False

    def __call__(self, logits, key):
        return jnp.argmax(logits, axis=-1)


@dataclasses.dataclass(frozen=True)
class NoFlag:
    def __call__(self, logits, key):
        return jnp.argmax(logits, axis=-1)


@dataclasses.dataclass(frozen=True)
class FloatOut:
    stochastic = False

    def __call__(self, logits, key):
        return jnp.max(logits, axis=-1)


@pytest.mark.parametrize("sampler, message", [
    (Unhashable(), "must be hashable"),
    (NoFlag(), "bool attribute `stochastic`"),
    (FloatOut(), "must return one integer token per row"),
    ("greedy", "must be callable"),
])
def test_bad_samplers_raise_before_compute(params, sampler, message):
    with pytest.raises(ValueError, match=message):
        jaxdec.generate(params, CONFIG, PROMPTS, LENGTHS, max_new_tokens=NEW, sampler=sampler)


# --- params must match the config -------------------------------------------------------------


def test_params_of_another_model_raise_everywhere(params):
    """Params of a d_model=64 model under a d_model=32 config used to give logits."""
    other = jaxdec.init_params(dataclasses.replace(CONFIG, d_model=64), jax.random.key(0))
    message = r"params\['embed'\] has shape \(37, 64\), but the config needs \(37, 32\)"
    with pytest.raises(ValueError, match=message):
        jaxdec.forward(other, CONFIG, PROMPTS, LENGTHS)
    with pytest.raises(ValueError, match=message):
        jaxdec.generate(other, CONFIG, PROMPTS, LENGTHS, max_new_tokens=NEW)
    with pytest.raises(ValueError, match=message):
        jaxdec.beam_search(other, CONFIG, PROMPTS, LENGTHS, beam_size=2, max_new_tokens=NEW)
    with pytest.raises(ValueError, match=message):
        jinspect.attention(other, CONFIG, PROMPTS, LENGTHS)
    with pytest.raises(ValueError, match=message):
        jaxdec.forward_checked(other, CONFIG, PROMPTS, LENGTHS)


def test_params_missing_extra_or_integer_leaves_raise(params):
    missing = {k: v for k, v in params.items() if k != "final_norm"}
    with pytest.raises(ValueError, match=r"params\['final_norm'\]\['(bias|scale)'\] is missing"):
        jaxdec.check_params(missing, CONFIG)
    with pytest.raises(ValueError, match=r"params\['head'\] is not a parameter"):
        jaxdec.check_params({**params, "head": jnp.zeros((32, V))}, CONFIG)
    with pytest.raises(ValueError, match=r"params\['embed'\] has dtype int32"):
        jaxdec.check_params({**params, "embed": jnp.zeros((V, 32), jnp.int32)}, CONFIG)
    fewer_layers = jax.tree.map(lambda x: x, params)
    fewer_layers["layers"] = jax.tree.map(lambda x: x[:1], params["layers"])
    with pytest.raises(ValueError, match=r"params\['layers'\]\['attn'\]\['out'\] has shape \(1, 32, 32\)"):
        jaxdec.check_params(fewer_layers, CONFIG)
    jaxdec.check_params(params, CONFIG)  # the right params pass


# --- non-finite logits are reported -----------------------------------------------------------


def test_nonfinite_logits_flag_the_row():
    """An inf in the (untied) embedding of token 3, which only row 0's prompt holds, breaks row 0
    alone; row 1 decodes as with clean params."""
    config = dataclasses.replace(CONFIG, tie_embeddings=False)
    params = jaxdec.init_params(config, jax.random.key(0))
    broken = {**params, "embed": params["embed"].at[3].set(jnp.inf)}
    out = jaxdec.generate(broken, config, PROMPTS, LENGTHS, max_new_tokens=NEW, return_logits=True)
    np.testing.assert_array_equal(out.nonfinite, [True, False])
    assert not np.all(np.isfinite(out.logits[0])) and np.all(np.isfinite(out.logits[1]))
    clean = jaxdec.generate(params, config, PROMPTS, LENGTHS, max_new_tokens=NEW, return_logits=True)
    np.testing.assert_array_equal(clean.nonfinite, [False, False])
    np.testing.assert_array_equal(out.tokens[1], clean.tokens[1])
    beams, _ = jaxdec.beam_search(broken, config, PROMPTS, LENGTHS, beam_size=2, max_new_tokens=3)
    np.testing.assert_array_equal(beams.nonfinite, [True, False])


# --- one positive-int check -------------------------------------------------------------------


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3)])
def test_positive_int_accepts_python_and_numpy_ints(value):
    assert checks.positive_int("n", value) == 3 and type(checks.positive_int("n", value)) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), 0, -2, 2.0, "3", None])
def test_positive_int_rejects(value):
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        checks.positive_int("n", value)


def test_generate_takes_numpy_sizes_and_refuses_bools(params):
    a = jaxdec.generate(params, CONFIG, PROMPTS, LENGTHS, max_new_tokens=np.int64(3), capacity=np.int32(9))
    b = jaxdec.generate(params, CONFIG, PROMPTS, LENGTHS, max_new_tokens=3, capacity=9)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got True"):
        jaxdec.generate(params, CONFIG, PROMPTS, LENGTHS, max_new_tokens=True)
    with pytest.raises(ValueError, match="beam_size must be an int >= 1, got True"):
        jaxdec.beam_search(params, CONFIG, PROMPTS, LENGTHS, beam_size=True, max_new_tokens=3)
