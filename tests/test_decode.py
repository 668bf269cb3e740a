"""Tests for jaxdec.decode: cached logits == full forward at every step, cached == uncached,
a padded row == the example alone, eos stopping, sampler keys, no recompilation, and host
validation of every bad input before any compute."""

from __future__ import annotations

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec
from jaxdec import api, decode, family, tuning
from jaxdec.config import DecoderConfig
from jaxdec.sampling import Greedy, Temperature, TopK, TopP

# A padded batch of mixed prompt lengths (right-padded with a junk id, not 0, to prove padding
# is ignored). Full sequences are P + MAX_NEW - 1 = 10 long: the forward shape of test_model.py.
PROMPTS = np.array(
    [
        [3, 14, 15, 9, 26],
        [5, 35, 30, 30, 30],
        [8, 9, 7, 30, 30],
    ],
    np.int32,
)
PROMPT_LENGTHS = np.array([5, 2, 3], np.int32)
B, P = PROMPTS.shape
MAX_NEW = 6


def gen(params, config, prompts=PROMPTS, lengths=PROMPT_LENGTHS, **kwargs):
    """generate() with this file's defaults (one compiled program shared by most tests)."""
    kwargs.setdefault("max_new_tokens", MAX_NEW)
    kwargs.setdefault("return_logits", True)
    return jaxdec.generate(params, config, prompts, lengths, **kwargs)


def full_sequences(tokens):
    """Each prompt's real tokens followed by its generated tokens (all but the last, which is never
    fed back), right-padded: int32 [B, P + MAX_NEW - 1] and the lengths [B]."""
    seqs = np.zeros((B, P + MAX_NEW - 1), np.int32)
    for b, n in enumerate(PROMPT_LENGTHS):
        seqs[b, : n + MAX_NEW - 1] = np.concatenate([PROMPTS[b, :n], np.asarray(tokens)[b, :-1]])
    return seqs, PROMPT_LENGTHS + MAX_NEW - 1


def assert_result_shapes(result, batch, max_new, vocab_size):
    chex.assert_shape(result.tokens, (batch, max_new))
    chex.assert_shape(result.lengths, (batch,))
    chex.assert_type([result.tokens, result.lengths], jnp.int32)
    if result.logits is not None:
        chex.assert_shape(result.logits, (batch, max_new, vocab_size))
        chex.assert_type(result.logits, jnp.float32)


# --- cached decoding == full forward pass == uncached -----------------------------------------


def test_cached_logits_equal_full_forward_at_every_step(decoder_config, params_for):
    c = decoder_config
    params = params_for(c)
    result = gen(params, c)
    assert_result_shapes(result, B, MAX_NEW, c.vocab_size)
    np.testing.assert_array_equal(result.lengths, MAX_NEW)  # no eos_id: every example runs to the end
    # Greedy: each token is the argmax of the logits it was sampled from.
    np.testing.assert_array_equal(result.tokens, np.argmax(result.logits, -1))

    # One teacher-forcing pass over prompt + generated tokens; logits at position n - 1 + t
    # predict generated token t, and the causal mask makes them depend on that prefix only.
    # float32: the two programs may run different matmul kernels on CPU (tuning.CPU),
    # so roundings differ by a few ulps of the logits (|logit| < 4 here).
    seqs, lengths = full_sequences(result.tokens)
    full = jaxdec.forward(params, c, seqs, lengths)
    for b, n in enumerate(PROMPT_LENGTHS):
        chex.assert_trees_all_close(result.logits[b], full[b, n - 1 : n - 1 + MAX_NEW], atol=1e-5, rtol=1e-5)


def test_cached_equals_uncached(decoder_config, params_for):
    c = decoder_config
    params = params_for(c)
    cached = gen(params, c)
    uncached = gen(params, c, use_cache=False)
    assert_result_shapes(uncached, B, MAX_NEW, c.vocab_size)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    np.testing.assert_array_equal(cached.lengths, uncached.lengths)
    chex.assert_trees_all_close(cached.logits, uncached.logits, atol=1e-5, rtol=0)
    # Not a trivially constant output: every step's logits differ from the previous step's.
    assert np.abs(np.diff(np.asarray(cached.logits), axis=1)).max(-1).min() > 1e-2


@pytest.mark.parametrize("name", ["learned", pytest.param("untied_relu_nobias", marks=pytest.mark.slow(
    reason="time budget: the tied-head case runs by default"))])
def test_decode_params_give_the_same_tokens_logits_and_beams(name, decoder_configs, params_for):
    """`decode_params` (the loop layout, made once) decodes as the model's params do: the same
    greedy tokens and logits (1e-6: the same kernels on the same weights) at batch 3 and at
    batch 1 (which ignores the tied head's copy), and the same beams and scores."""
    c = decoder_configs[name]
    params = params_for(c)
    laid_out = jaxdec.decode_params(params, c)
    assert isinstance(laid_out.params["layers"], list)
    assert ("embed_t" in laid_out.params) == c.tie_embeddings
    for rows in (slice(None), slice(1, 2)):
        plain = gen(params, c, PROMPTS[rows], PROMPT_LENGTHS[rows])
        once = gen(laid_out, c, PROMPTS[rows], PROMPT_LENGTHS[rows])
        np.testing.assert_array_equal(once.tokens, plain.tokens)
        chex.assert_trees_all_close(once.logits, plain.logits, atol=1e-6, rtol=0)
    beams, scores = jaxdec.beam_search(params, c, PROMPTS, PROMPT_LENGTHS, beam_size=2, max_new_tokens=4)
    beams_once, scores_once = jaxdec.beam_search(laid_out, c, PROMPTS, PROMPT_LENGTHS, beam_size=2, max_new_tokens=4)
    np.testing.assert_array_equal(beams_once.tokens, beams.tokens)
    chex.assert_trees_all_close(scores_once, scores, atol=1e-6, rtol=0)


def test_decode_params_refuse_what_they_do_not_serve(params_for, base_config):
    """ValueError before any compute: another config, the uncached baseline, a mesh, params
    that do not match the config."""
    params = params_for(base_config)
    laid_out = jaxdec.decode_params(params, base_config)
    other = dataclasses.replace(base_config, max_len=base_config.max_len + 1)
    with pytest.raises(ValueError, match="laid out for"):
        gen(laid_out, other)
    with pytest.raises(ValueError, match="use_cache=False"):
        gen(laid_out, base_config, use_cache=False)
    with pytest.raises(ValueError, match="mesh"):
        gen(laid_out, base_config, mesh=jaxdec.make_mesh())
    with pytest.raises(ValueError, match="mesh"):
        jaxdec.beam_search(laid_out, base_config, PROMPTS, beam_size=2, max_new_tokens=2, mesh=jaxdec.make_mesh())
    with pytest.raises(ValueError, match="shape"):
        jaxdec.decode_params(params, dataclasses.replace(base_config, d_model=base_config.d_model * 2))


@pytest.mark.parametrize(
    "name, rows, own_capacity",
    [
        # Every row alone in a batch of one, at the batch's capacity: one compiled program; the
        # shorter prompts are then right-aligned inside it just as in the batch.
        ("learned", [0, 1, 2], False),
        # The shortest row with its own width and capacity: no padding anywhere, so its cache
        # slots and RoPE rotations start at 0 instead of at slot 3 as in the batch.
        ("rope_gqa", [1], True),
    ],
)
def test_padded_row_equals_example_decoded_alone(name, rows, own_capacity, decoder_configs, params_for):
    c = decoder_configs[name]
    params = params_for(c)
    batched = gen(params, c)
    for b in rows:
        n = PROMPT_LENGTHS[b]
        capacity = None if own_capacity else P + MAX_NEW
        alone = gen(params, c, prompts=PROMPTS[b : b + 1, :n], lengths=None, capacity=capacity)
        assert_result_shapes(alone, 1, MAX_NEW, c.vocab_size)
        np.testing.assert_array_equal(batched.tokens[b], alone.tokens[0])
        chex.assert_trees_all_close(batched.logits[b], alone.logits[0], atol=1e-5, rtol=0)


def test_padding_contents_do_not_matter(params_for, base_config):
    params = params_for(base_config)
    other_pad = np.where(np.arange(P)[None, :] < PROMPT_LENGTHS[:, None], PROMPTS, 0)
    a, b = gen(params, base_config), gen(params, base_config, prompts=other_pad)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    chex.assert_trees_all_close(a.logits, b.logits, atol=1e-6, rtol=0)


class GenerateVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_generate_jit_and_eager_agree(self):
        c = DecoderConfig(37, 2, 32, 4, 32, init_std=0.4)  # conftest's "learned" config
        params = jaxdec.init_params(c, jax.random.key(0))
        expected = gen(params, c)
        fn = self.variant(lambda params, prompts, lengths: gen(params, c, prompts, lengths))
        result = fn(params, jnp.asarray(PROMPTS), jnp.asarray(PROMPT_LENGTHS))
        assert_result_shapes(result, B, MAX_NEW, c.vocab_size)
        np.testing.assert_array_equal(result.tokens, expected.tokens)
        np.testing.assert_array_equal(result.lengths, expected.lengths)
        chex.assert_trees_all_close(result.logits, expected.logits, atol=1e-5, rtol=0)


# --- eos --------------------------------------------------------------------------------------


def test_eos_stops_each_example_and_pads(params_for, base_config):
    params = params_for(base_config)
    free = gen(params, base_config)  # greedy, no eos
    eos = int(free.tokens[0, 2])  # row 0 emits it at step 2 (or earlier)
    pad = 36 if eos != 36 else 35
    hits = [np.flatnonzero(np.asarray(free.tokens[b]) == eos) for b in range(B)]
    first = [int(h[0]) if h.size else None for h in hits]
    assert first[0] is not None and first[0] <= 2
    assert None in first, "want at least one row that never emits eos; pick another step"

    result = gen(params, base_config, eos_id=eos, pad_id=pad)
    assert_result_shapes(result, B, MAX_NEW, base_config.vocab_size)
    for b in range(B):
        if first[b] is None:  # never stops: identical to the free run, full length
            np.testing.assert_array_equal(result.tokens[b], free.tokens[b])
            assert int(result.lengths[b]) == MAX_NEW
        else:
            stop = first[b] + 1  # tokens up to and including the eos
            np.testing.assert_array_equal(result.tokens[b, :stop], free.tokens[b, :stop])
            assert int(result.tokens[b, stop - 1]) == eos
            np.testing.assert_array_equal(result.tokens[b, stop:], pad)
            assert int(result.lengths[b]) == stop
            chex.assert_trees_all_close(result.logits[b, :stop], free.logits[b, :stop], atol=1e-6, rtol=0)


V_FAKE = 11


def _fake_step(params, cache, tokens, positions):
    """A deterministic stand-in model: the next token is (token + position) % V; the 'cache'
    counts the calls."""
    del params
    return jax.nn.one_hot((tokens + positions) % V_FAKE, V_FAKE) * 5.0, cache + 1


def _simulate(first, positions, max_new, eos, pad):
    """Plain-Python statement of the decode loop's contract for _fake_step."""
    tokens, lengths = [], []
    for t, pos in zip(first, positions):
        seq, done = [t], t == eos
        for _ in range(max_new - 1):
            nxt = (t + pos) % V_FAKE
            pos += 1
            t = pad if done else nxt
            seq.append(t)
            done = done or t == eos
        tokens.append(seq)
        lengths.append(seq.index(eos) + 1 if eos in seq else max_new)
    return np.array(tokens), np.array(lengths)


@pytest.mark.parametrize(
    "max_new, eos",
    [(6, None), (6, 9), (6, 7), (1, None), (1, 7)],
    ids=["no_eos", "eos_midway", "eos_first_token", "one_token", "one_token_eos"],
)
def test_decode_loop_with_fake_step(max_new, eos):
    first = [2, 7, 4]
    positions = [3, 1, 5]
    pad = 10
    first_logits = jax.nn.one_hot(jnp.array(first), V_FAKE) * 5.0
    result = decode.decode_loop(
        _fake_step, None, jnp.int32(0), first_logits, jnp.array(positions, jnp.int32),
        sampler=Greedy(), key=jax.random.key(0), max_new_tokens=max_new,
        eos_id=jnp.int32(-1 if eos is None else eos), pad_id=jnp.int32(pad), return_logits=True,
    )
    tokens, lengths = _simulate(first, positions, max_new, -1 if eos is None else eos, pad)
    assert_result_shapes(result, 3, max_new, V_FAKE)
    np.testing.assert_array_equal(result.tokens, tokens)
    np.testing.assert_array_equal(result.lengths, lengths)
    chex.assert_trees_all_close(result.logits[:, 0], first_logits, atol=0, rtol=0)
    if eos == 9:  # the case with different stopping steps per row, spelled out
        np.testing.assert_array_equal(
            result.tokens, [[2, 5, 9, pad, pad, pad], [7, 8, 10, 2, 6, 0], [4, 9, pad, pad, pad, pad]]
        )
        np.testing.assert_array_equal(result.lengths, [3, 6, 2])


# --- samplers inside generate -----------------------------------------------------------------

SAMPLERS = [Temperature(1.5), TopK(4), TopP(0.9)]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: type(s).__name__)
def test_generate_same_key_same_samples_different_keys_differ(sampler, params_for, base_config):
    params = params_for(base_config)
    runs = [gen(params, base_config, sampler=sampler, key=jax.random.key(seed)) for seed in (1, 1, 2, 3)]
    np.testing.assert_array_equal(runs[0].tokens, runs[1].tokens)
    chex.assert_trees_all_close(runs[0].logits, runs[1].logits, atol=0, rtol=0)
    # 18 draws per run from a spread-out distribution: equal runs for distinct keys would mean
    # the key is ignored (their chance is astronomically small for a working sampler).
    distinct = {np.asarray(r.tokens).tobytes() for r in runs[1:]}
    assert len(distinct) == 3
    # Every drawn token is admissible under its own logits.
    for r in runs:
        logits, tokens = np.asarray(r.logits), np.asarray(r.tokens)
        if isinstance(sampler, TopK):
            kth = np.sort(logits, -1)[..., -sampler.k]
            assert (np.take_along_axis(logits, tokens[..., None], -1)[..., 0] >= kth).all()
        if isinstance(sampler, TopP):
            probs = jax.nn.softmax(logits / sampler.temperature, axis=-1)
            chosen = np.take_along_axis(np.asarray(probs), tokens[..., None], -1)
            mass_before = np.where(probs > chosen, probs, 0.0).sum(-1)  # strictly more likely tokens
            assert (mass_before < sampler.p + 1e-6).all()


def test_generate_greedy_ignores_key(params_for, base_config, key):
    params = params_for(base_config)
    runs = [gen(params, base_config, key=k) for k in (None, key, jax.random.fold_in(key, 1))]
    for r in runs[1:]:
        np.testing.assert_array_equal(r.tokens, runs[0].tokens)
        chex.assert_trees_all_close(r.logits, runs[0].logits, atol=0, rtol=0)


# --- compilation ------------------------------------------------------------------------------


def _recorded_generate(params, config, monkeypatch, **kwargs):
    """gen()'s result and the arguments `generate` passed to its program (`decode._generate`)."""
    calls = []
    program = decode._generate

    def recording(*args, **kw):
        calls.append((args, kw))
        return program(*args, **kw)

    with monkeypatch.context() as m:
        m.setattr(decode, "_generate", recording)
        result = gen(params, config, **kwargs)
    (args, kw), = calls
    return result, args, kw


def _jaxlib_accepts(options) -> bool:
    """Whether this jaxlib compiles a program with these compiler options (the test's own check)."""
    try:
        jax.jit(lambda x: x * 2, compiler_options=dict(options)).lower(np.float32(1)).compile()
    except Exception:  # noqa: BLE001 - an unknown option fails compilation
        return False
    return True


def test_cpu_decode_options_change_kernels_not_results(params_for, base_config, monkeypatch):
    """The program `generate` runs is compiled with its tuning's decode_compiler_options. On CPU
    (tuning.CPU, where this jaxlib accepts them) XLA's optimized program then has only XLA's own
    dots and no YNNPACK fusion, while the same program compiled with XLA's defaults hands its
    matmuls to YNNPACK (`__ynn_fusion` custom fusions). Without options (other platforms) the
    two are one program. Both give the same greedy tokens and the same logits to float32
    rounding (1e-5 absolute plus relative, |logit| < 4)."""
    params = params_for(base_config)
    tuned_result, args, kw = _recorded_generate(params, base_config, monkeypatch)
    tuned = tuning.for_arrays(params)
    defaults = dataclasses.replace(tuned, decode_compiler_options=())
    tuned_hlo = decode._generate.for_inputs(args[0], args[2].mesh).lower(*args, **kw).compile().as_text()
    default_hlo = decode._generate.for_tuning(defaults).lower(*args, **kw).compile().as_text()
    default_result = decode._generate.for_tuning(defaults)(*args, **kw)
    options = tuned.decode_compiler_options
    if options and _jaxlib_accepts(options):
        assert jax.default_backend() == "cpu" and tuned == tuning.CPU
        assert tuned_hlo.count("__ynn_fusion") == 0, "YNNPACK fusions in the tuned program"
        assert re.search(r"= \S+ dot\(", tuned_hlo)  # e.g. "%dot.3 = f32[3,96]{1,0} dot("
        assert "__ynn_fusion" in default_hlo, "XLA's defaults no longer use YNNPACK: drop the option"
    else:
        assert tuned_hlo == default_hlo
    np.testing.assert_array_equal(tuned_result.tokens, default_result.tokens)
    chex.assert_trees_all_close(tuned_result.logits, default_result.logits, atol=1e-5, rtol=1e-5)


def count_traces(monkeypatch, config, name: str) -> list:
    """Counts calls of `config`'s family function `name` by the programs traced from now on
    (equinox's test_num_traces): the decode program calls the family's prefill, forward()
    calls its forward, once per trace, and a trace happens once per compilation key. A
    program already compiled for a key runs without tracing and counts nothing. Returns a
    list whose length is the count."""
    fam = family.of(config)
    calls = []
    original = getattr(fam, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setitem(family._FAMILIES, type(config), dataclasses.replace(fam, **{name: counted}))
    return calls


def test_no_recompilation_across_prompts(params_for, base_config, monkeypatch):
    params = params_for(base_config)
    rng = np.random.default_rng(0)
    gen(params, base_config)  # compiled before counting starts (here or by an earlier test)
    traces = count_traces(monkeypatch, base_config, "prefill")

    # Same padded width, different lengths, contents, eos/pad ids, keys and array types.
    gen(params, base_config)
    gen(params, base_config, lengths=np.array([1, 5, 4], np.int32))
    gen(params, base_config, prompts=rng.integers(0, 37, (B, P)), lengths=np.array([2, 2, 2], np.int64))
    gen(params, base_config, prompts=jnp.asarray(PROMPTS), lengths=jnp.asarray([5, 5, 1]), eos_id=4, pad_id=7)
    gen(params, base_config, key=jax.random.key(9), eos_id=np.int32(3))
    assert len(traces) == 0

    # A fixed capacity (used by no other test): one trace for prompts of any width.
    capacity = 13
    for width in (1, 3, 5, 9):
        prompts = rng.integers(0, 37, (B, width)).astype(np.int32)
        lengths = rng.integers(1, width + 1, B).astype(np.int32)
        result = jaxdec.generate(params, base_config, prompts, lengths, max_new_tokens=4, capacity=capacity)
        assert_result_shapes(result, B, 4, base_config.vocab_size)
        assert len(traces) == 1  # the first width traces (the counter works), no other
    # Equal sampler objects share the program too.
    for _ in range(2):
        gen(params, base_config, sampler=Temperature(1.5), key=jax.random.key(0))
    n = len(traces)
    gen(params, base_config, sampler=Temperature(1.5), key=jax.random.key(5))
    assert len(traces) == n


def test_forward_does_not_recompile_for_new_lengths(params_for, base_config, monkeypatch):
    params = params_for(base_config)
    seqs = np.tile(np.arange(10, dtype=np.int32), (B, 1))
    jaxdec.forward(params, base_config, seqs, np.array([10, 7, 8], np.int32))
    traces = count_traces(monkeypatch, base_config, "forward")
    jaxdec.forward(params, base_config, seqs + 1, np.array([1, 0, 10], np.int32))
    jaxdec.forward(params, base_config, seqs, jnp.array([3, 3, 3]))
    jaxdec.forward(params, base_config, seqs, None)
    assert len(traces) == 0
    # A new compilation key (dropout_rate is static; this rate is used by no other test): one trace.
    jaxdec.forward(params, base_config, seqs, None, dropout_rate=0.125, rng=jax.random.key(0))
    assert len(traces) == 1


# --- validation -------------------------------------------------------------------------------

# name: (overrides of gen()'s arguments, a word the ValueError must contain)
_BAD = {
    "id_negative": (dict(prompts=np.where(PROMPTS == 15, -1, PROMPTS)), "token id -1"),
    "id_equals_vocab": (dict(prompts=np.where(PROMPTS == 26, 37, PROMPTS)), "token id 37"),
    "id_too_large": (dict(prompts=PROMPTS * 100), "token id"),
    "empty_width": (dict(prompts=np.zeros((B, 0), np.int32), lengths=None), "non-empty"),
    "empty_batch": (dict(prompts=np.zeros((0, P), np.int32), lengths=np.zeros((0,), np.int32)), "non-empty"),
    "length_zero": (dict(lengths=np.array([5, 0, 3], np.int32)), "prompt_lengths"),
    "length_negative": (dict(lengths=np.array([5, -1, 3], np.int32)), "prompt_lengths"),
    "length_beyond_width": (dict(lengths=np.array([5, 6, 3], np.int32)), "prompt_lengths"),
    "lengths_wrong_batch": (dict(lengths=np.array([5, 2], np.int32)), "prompt_lengths"),
    "lengths_rank_2": (dict(lengths=PROMPT_LENGTHS[:, None]), "prompt_lengths"),
    "lengths_float": (dict(lengths=PROMPT_LENGTHS.astype(np.float32)), "prompt_lengths"),
    "capacity_overflow": (dict(capacity=P + MAX_NEW - 1), "capacity"),
    "capacity_not_int": (dict(capacity=float(P + MAX_NEW)), "capacity"),
    "rank_1_tokens": (dict(prompts=PROMPTS[0], lengths=None), "prompts"),
    "rank_3_tokens": (dict(prompts=PROMPTS[..., None], lengths=None), "prompts"),
    "float_tokens": (dict(prompts=PROMPTS.astype(np.float32)), "prompts"),
    "bool_tokens": (dict(prompts=PROMPTS > 5), "prompts"),
    "max_new_tokens_zero": (dict(max_new_tokens=0), "max_new_tokens"),
    "beyond_max_len": (dict(max_new_tokens=29), "max_len"),  # 5 + 29 new needs position 32
    "temperature_without_key": (dict(sampler=Temperature(1.0)), "key"),
    "topk_without_key": (dict(sampler=TopK(3)), "key"),
    "topp_without_key": (dict(sampler=TopP(0.9)), "key"),
    "not_a_sampler": (dict(sampler=lambda logits, key: jnp.argmax(logits, -1)), "sampler"),
}


@pytest.mark.parametrize("overrides, match", _BAD.values(), ids=_BAD.keys())
def test_generate_rejects_bad_input_before_compute(overrides, match, params_for, base_config, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("reached the compiled decode program")

    monkeypatch.setattr(decode, "_generate", no_compute)
    overrides = dict(overrides)
    prompts = overrides.pop("prompts", PROMPTS)
    lengths = overrides.pop("lengths", PROMPT_LENGTHS)
    with pytest.raises(ValueError, match=match):
        gen(params_for(base_config), base_config, prompts, lengths, **overrides)


def test_generate_accepts_python_lists(params_for, base_config):
    """Nested lists are arrays to the API (as in numpy): the same tokens as int32 arrays."""
    params = params_for(base_config)
    result = gen(params, base_config, PROMPTS.tolist(), PROMPT_LENGTHS.tolist())
    np.testing.assert_array_equal(result.tokens, gen(params, base_config).tokens)
    with pytest.raises(ValueError, match="integer"):
        gen(params, base_config, (PROMPTS + 0.5).tolist(), PROMPT_LENGTHS.tolist())


def test_longest_allowed_generation_passes_validation(params_for, base_config, monkeypatch):
    # The boundary of "beyond_max_len": 5 + 28 tokens feed positions 0..31 = max_len - 1 (the
    # last new token is never fed). Stub the compiled program: only the host checks are tested.
    monkeypatch.setattr(decode, "_generate", lambda *args, **kwargs: "compiled program reached")
    assert jaxdec.generate(params_for(base_config), base_config, PROMPTS, max_new_tokens=28) == (
        "compiled program reached"
    )
    with pytest.raises(ValueError, match="max_len"):
        jaxdec.generate(params_for(base_config), base_config, PROMPTS, max_new_tokens=29)


# --- cost follows the work: blocked attention, early exit, scanned layers ----------------------

# Its own config (max_len 41, used nowhere else), so the tiny block size below is traced into
# fresh programs and never reaches a program another test compiled with the default block.
BLOCKED = DecoderConfig(vocab_size=37, num_layers=2, d_model=32, num_heads=4, max_len=41, init_std=0.4,
                        position="rope", num_kv_heads=2)
BLOCK = 4
# Rows of lengths 1, block - 1, block, block + 1 and the full prompt width 9.
BLOCK_PROMPTS = np.random.default_rng(7).integers(0, 37, (5, 9)).astype(np.int32)
BLOCK_LENGTHS = np.array([1, BLOCK - 1, BLOCK, BLOCK + 1, 9], np.int32)


@pytest.fixture
def tiny_blocks(monkeypatch):
    """This platform's tuning with attention blocks of 4 slots and prefill chunks of 3 rows:
    every loop runs many times. (The tuning is a static argument: no compiled program is reused.)"""
    platform = jax.default_backend()
    tiny = dataclasses.replace(tuning.for_platform(platform), cache_block=BLOCK, prefill_chunk=3)
    monkeypatch.setitem(tuning.BY_PLATFORM, platform, tiny)
    return platform


@pytest.mark.parametrize("capacity", [19, 27])  # 19: not a multiple of the block size
def test_blocked_decode_equals_full_forward(capacity, tiny_blocks):
    """Greedy decoding through 4-slot attention blocks and 3-row prefill chunks, in caches
    larger than the work: tokens are the argmax of logits that equal one teacher-forced pass
    over prompt + output (1e-5), for rows of lengths 1, block - 1, block, block + 1 and full."""
    params = jaxdec.init_params(BLOCKED, jax.random.key(1))
    new = 10
    result = jaxdec.generate(params, BLOCKED, BLOCK_PROMPTS, BLOCK_LENGTHS, max_new_tokens=new,
                             capacity=capacity, return_logits=True)
    np.testing.assert_array_equal(result.tokens, np.argmax(result.logits, -1))
    seqs = np.zeros((5, 9 + new - 1), np.int32)
    for b, n in enumerate(BLOCK_LENGTHS):
        seqs[b, : n + new - 1] = np.concatenate([BLOCK_PROMPTS[b, :n], np.asarray(result.tokens)[b, :-1]])
    full = api.forward(params, BLOCKED, seqs, BLOCK_LENGTHS + new - 1)
    for b, n in enumerate(BLOCK_LENGTHS):
        chex.assert_trees_all_close(result.logits[b], full[b, n - 1 : n - 1 + new], atol=1e-5, rtol=0)
    assert len({tuple(r) for r in np.asarray(result.tokens)}) > 1, "degenerate outputs"


@pytest.mark.slow  # two beam-search compilations, blocked and single-block
def test_blocked_beam_search_equals_single_block(tiny_blocks):
    """Beam search reorders only the filled cache blocks: the same beams and scores as the
    single-pass path (a cache no larger than one block)."""
    params = jaxdec.init_params(BLOCKED, jax.random.key(1))
    kw = dict(beam_size=3, max_new_tokens=6)
    blocked, s_blocked = jaxdec.beam_search(params, BLOCKED, BLOCK_PROMPTS, BLOCK_LENGTHS, capacity=23, **kw)
    one_block = dataclasses.replace(tuning.BY_PLATFORM[tiny_blocks], cache_block=10**6)
    tuning.BY_PLATFORM[tiny_blocks] = one_block  # restored by the fixture's monkeypatch
    single, s_single = jaxdec.beam_search(params, BLOCKED, BLOCK_PROMPTS, BLOCK_LENGTHS, capacity=24, **kw)
    np.testing.assert_array_equal(blocked.tokens, single.tokens)
    np.testing.assert_array_equal(blocked.lengths, single.lengths)
    chex.assert_trees_all_close(s_blocked, s_single, atol=1e-5, rtol=0)


def test_early_exit_changes_no_token_length_or_logit(params_for, base_config):
    """With every row stopped early, the loop ends; the result equals the free run's up to each
    row's eos, pads after it, and its logits are zeros only at steps after the last row stopped."""
    params = params_for(base_config)
    free = gen(params, base_config, max_new_tokens=12)
    eos = int(free.tokens[0, 1])
    stopped = gen(params, base_config, max_new_tokens=12, eos_id=eos)
    stops = []
    for b in range(B):
        row = np.asarray(free.tokens[b])
        stop = int(np.flatnonzero(row == eos)[0]) + 1 if (row == eos).any() else 12
        stops.append(stop)
        assert int(stopped.lengths[b]) == stop
        np.testing.assert_array_equal(stopped.tokens[b, :stop], free.tokens[b, :stop])
        np.testing.assert_array_equal(stopped.tokens[b, stop:], 0)
        chex.assert_trees_all_close(stopped.logits[b, :stop], free.logits[b, :stop], atol=1e-6, rtol=0)
    last = max(stops)
    np.testing.assert_array_equal(stopped.logits[:, last:], 0.0)


def test_early_exit_loop_stops_running_the_model():
    """The decode loop calls the step function only while a row is running (a host callback
    counts the calls), not max_new_tokens - 1 times."""
    calls = []

    def step(params, cache, tokens, positions):
        jax.debug.callback(lambda: calls.append(1))
        return jax.nn.one_hot(jnp.full_like(tokens, 3), 5) * 5.0, cache

    result = jax.jit(lambda: decode.decode_loop(
        step, None, jnp.int32(0), jax.nn.one_hot(jnp.array([1, 2]), 5) * 5.0, jnp.array([1, 1]),
        sampler=Greedy(), key=jax.random.key(0), max_new_tokens=50, eos_id=jnp.int32(3),
        pad_id=jnp.int32(0)))()
    jax.block_until_ready(result.tokens)
    np.testing.assert_array_equal(result.tokens[:, :3], [[1, 3, 0], [2, 3, 0]])
    np.testing.assert_array_equal(result.lengths, [2, 2])
    assert len(calls) == 1  # one step sampled eos for both rows; 48 more were skipped


@pytest.mark.slow  # compiles the train step and generate twice each (scanned and unrolled)
def test_scanned_layers_equal_unrolled_loss_gradients_and_tokens(params_for, decoder_configs):
    """The layer scan against the same blocks unrolled in Python (each layer's slice of the
    stacked params run alone, one after another): equal loss, gradients (1e-6) and tokens."""
    from jaxdec import model
    from jaxdec.attention import decoder_self_mask

    c = decoder_configs["rope_gqa"]
    params = params_for(c)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, c.vocab_size, (2, 9)), jnp.int32)
    lengths = jnp.array([9, 6], jnp.int32)

    def unrolled_logits(p):
        T = tokens.shape[1]
        positions = jnp.broadcast_to(jnp.arange(T), (2, T))
        x = model.embed_inputs(p, c, tokens, positions)
        for i in range(c.num_layers):
            one = {**p, "layers": jax.tree.map(lambda a: a[i : i + 1], p["layers"])}
            x, _ = model.run_layers(one, c, x, positions, decoder_self_mask(lengths, T))
        return model.output_logits(p, c, x)

    def loss(logits):
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

    scanned = lambda p: loss(model.decoder_logits(p, c, tokens, lengths))  # noqa: E731
    l_s, g_s = jax.jit(jax.value_and_grad(scanned))(params)
    l_u, g_u = jax.jit(jax.value_and_grad(lambda p: loss(unrolled_logits(p))))(params)
    chex.assert_trees_all_close(l_s, l_u, atol=1e-6, rtol=0)
    chex.assert_trees_all_close(g_s, g_u, atol=1e-6, rtol=0)
    assert float(jnp.abs(g_s["layers"]["attn"]["qkv"][1]).max()) > 0
    np.testing.assert_array_equal(jnp.argmax(model.decoder_logits(params, c, tokens, lengths), -1),
                                  jnp.argmax(unrolled_logits(params), -1))
