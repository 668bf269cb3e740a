"""Speculative decoding (`generate(..., draft=...)`): exact against plain decoding.

- Greedy: the same tokens as plain greedy `generate` (float32) on batches of mixed prompt
  lengths, for a draft that is always right (an oracle, and the target itself as a draft
  model), one that is never right (the target with its head negated: its first draft is the
  target's argmin), and prompt lookup; eos inside an accepted run; a run that ends at the cache's
  capacity; the encoder-decoder.
- The cache: after the rounds, each row's keys and values in its valid slots equal a fresh
  prefill of the tokens it holds (1e-5), though rows accepted different numbers of drafts.
- Sampling: over a vocabulary of 8, the frequencies of 3-token continuations from speculative
  sampling fit the exact distribution (computed by enumerating all 512 continuations through
  the model): a chi-square test at a false-alarm rate of 1e-4 per case; the same test rejects a
  planted wrong acceptance rule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

import jaxdec
from jaxdec import DecoderConfig, Seq2SeqConfig, family, model, speculative, tuning
from jaxdec.speculative import DraftModel, History, PromptLookup
# A draft that knows the answer (the plain run's own tokens), defined outside the library as a
# user's draft would be.
from jaxdec.tools.bench.speculative import OracleDraft as Oracle

CONFIG = DecoderConfig(vocab_size=37, num_layers=2, d_model=32, num_heads=4, max_len=64, init_std=0.4,
                       position="rope", num_kv_heads=2, norm="rms", mlp="gated", tie_embeddings=False)
PROMPTS = np.array([[5, 9, 2, 7, 5, 9, 2, 7, 5], [3, 1, 4, 1, 0, 0, 0, 0, 0], [8, 8, 6, 2, 6, 2, 0, 0, 0]], np.int32)
LENGTHS = np.array([9, 4, 6], np.int32)
NEW = 24


@functools.cache
def _params(seed: int = 0, config=CONFIG):
    return jaxdec.init_params(config, jax.random.key(seed))


def _negated_head(params):
    """The target with its head negated: the same hidden states, so its greedy draft is always
    the target's least likely token."""
    return {**params, "head": -params["head"]}


def _plain(params, config=CONFIG, prompts=PROMPTS, lengths=LENGTHS, **kw):
    return jaxdec.generate(params, config, prompts, lengths, max_new_tokens=kw.pop("max_new_tokens", NEW), **kw)


@pytest.mark.parametrize("kind", ["oracle", "self", "adversarial", "lookup"])
def test_greedy_speculative_equals_plain_greedy(kind):
    params = _params()
    plain = _plain(params)
    draft = {
        "oracle": lambda: Oracle(plain.tokens, jnp.asarray(LENGTHS), num_tokens=3),
        "self": lambda: DraftModel(params, CONFIG, num_tokens=3),
        "adversarial": lambda: DraftModel(_negated_head(params), CONFIG, num_tokens=3),
        "lookup": lambda: PromptLookup(num_tokens=3, max_ngram=2),
    }[kind]()
    got = _plain(params, draft=draft)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(plain.tokens))
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(plain.lengths))
    s = got.speculation
    rounds, accepted = np.asarray(s.rounds), np.asarray(s.accepted)
    assert rounds.min() >= 1
    if kind in ("oracle", "self"):  # every draft accepted: γ + 1 tokens per round
        np.testing.assert_array_equal(accepted, 3 * rounds)
        assert rounds.max() == -(-(NEW - 1) // 4)
    if kind == "adversarial":  # never accepted; the rows fall back to plain steps
        np.testing.assert_array_equal(accepted, 0)
        assert np.asarray(s.steps).min() > 0
    if isinstance(draft, DraftModel):  # it drafts for every row, so it proposes exactly when a round verifies
        np.testing.assert_array_equal(np.asarray(s.drafted), rounds)
    else:  # no skip: it proposes every round
        np.testing.assert_array_equal(np.asarray(s.drafted), rounds + np.asarray(s.steps))
    np.testing.assert_array_equal(np.asarray(s.accepted_at).sum(), accepted.sum())


def test_a_draft_model_that_skipped_rounds_proposes_as_one_that_never_did():
    """DraftModel.skip keeps its cache up to date: after three rounds it skipped (each adding one
    token to the history), its proposal equals that of a draft that proposed in every round
    (tokens, and logits to 1e-5); a draft that neither proposed nor skipped does not."""
    params = _params()
    draft = DraftModel(_params(7), CONFIG, num_tokens=3)
    inputs, capacity = jaxdec.decode.prepare_inputs(params, CONFIG, PROMPTS, LENGTHS, max_new_tokens=NEW,
                                                    spare_slots=3, capacity=PROMPTS.shape[1] + NEW + 3)
    start = speculative.DraftStart(inputs=inputs, capacity=capacity, tuning=tuning.PLAIN, mesh=None)
    width = int(LENGTHS.max())
    starts = jnp.asarray(width - LENGTHS)
    tokens = jax.random.randint(jax.random.key(3), (3, capacity + 5), 0, CONFIG.vocab_size, jnp.int32)
    placed = jaxdec.cache.place_rows(inputs.prompts, inputs.lengths, starts, capacity + 5)
    tokens = jnp.where(jnp.arange(capacity + 5)[None, :] < width, placed, tokens)  # prompts, then a continuation

    def history(r):  # the newest token at slot width + r
        return History(tokens=tokens, starts=starts, end=jnp.full((3,), width + r, jnp.int32))

    key = jax.random.key(0)
    propose = jax.jit(lambda st, r: draft.propose(st, history(r), jaxdec.Greedy(), key, tuning.PLAIN))
    skip = jax.jit(lambda st, r: draft.skip(st, history(r), tuning.PLAIN))
    every, skipping, idle = (draft.start(start),) * 3
    for r in range(4):
        _, every = propose(every, r)
        if r == 0:
            _, skipping = propose(skipping, r)
            _, idle = propose(idle, r)
        else:
            skipping = skip(skipping, r)
    want, got, stale = propose(every, 4)[0], propose(skipping, 4)[0], propose(idle, 4)[0]
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), atol=1e-5, rtol=0)
    assert np.abs(np.asarray(stale.logits) - np.asarray(want.logits)).max() > 1e-2


@pytest.mark.slow(reason="compiles plain and speculative programs with return_logits (~7 s)")
def test_returned_logits_are_those_each_token_was_chosen_from():
    params = _params()
    plain = _plain(params, return_logits=True)
    got = _plain(params, return_logits=True, draft=DraftModel(_params(7), CONFIG, num_tokens=3))
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(plain.tokens))
    # The verification computes γ + 1 rows at once: float rounding differs from one row's step.
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(plain.logits), rtol=1e-4, atol=1e-4)


def test_eos_inside_an_accepted_run_stops_the_row_there():
    params = _params()
    free = np.asarray(_plain(params).tokens)
    eos = int(free[0, 6])  # row 0's 7th token: inside its second round of 4 accepted tokens
    plain = _plain(params, eos_id=eos, pad_id=1)
    first_eos = np.argmax(np.asarray(plain.tokens) == eos, axis=1)
    assert first_eos[0] <= 6 and int(plain.lengths[0]) == first_eos[0] + 1 < NEW
    got = _plain(params, eos_id=eos, pad_id=1, draft=Oracle(jnp.asarray(free), jnp.asarray(LENGTHS), num_tokens=3))
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(plain.tokens))
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(plain.lengths))


@pytest.mark.slow(reason="compiles plain and speculative programs for a longer run (~6 s)")
def test_a_run_to_the_cache_capacity_and_the_capacity_check():
    params = _params()
    P = PROMPTS.shape[1]
    plain = _plain(params, max_new_tokens=30)
    draft = DraftModel(params, CONFIG, num_tokens=3)
    got = _plain(params, max_new_tokens=30, draft=draft, capacity=P + 30 + 3)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(plain.tokens))
    with pytest.raises(ValueError, match="draft slots"):
        _plain(params, max_new_tokens=30, draft=draft, capacity=P + 30 + 2)


def _spec_state(params, draft, sampler=jaxdec.Greedy(), max_new_tokens=NEW, tuned=tuning.PLAIN, accept=None):
    """Prefill and the speculative loop in a fresh jit (so a patched `accept` is traced)."""
    fam = family.of(CONFIG)
    P = PROMPTS.shape[1]
    capacity = P + max_new_tokens + draft.num_tokens

    @jax.jit
    def run(params, draft, key):
        logits, cache = fam.prefill(params, CONFIG, jnp.asarray(PROMPTS), jnp.asarray(LENGTHS), capacity,
                                    tuning=tuned)
        inputs = jaxdec.decode.DecodeInputs(prompts=jnp.asarray(PROMPTS), lengths=jnp.asarray(LENGTHS), source=None,
                                            source_lengths=None, key=key, eos_id=jnp.asarray(-1, jnp.int32),
                                            pad_id=jnp.asarray(0, jnp.int32))
        state = draft.start(speculative.DraftStart(inputs=inputs, capacity=capacity, tuning=tuned, mesh=None))
        extend = lambda p, c, t: fam.extend(p, CONFIG, c, t, tuning=tuned)  # noqa: E731
        return speculative.speculative_loop(extend, params, cache, logits, jnp.asarray(PROMPTS),
                                            jnp.asarray(LENGTHS), draft=draft, draft_state=state, sampler=sampler,
                                            key=key, max_new_tokens=max_new_tokens, eos_id=jnp.asarray(-1),
                                            pad_id=jnp.asarray(0), fam=fam, tuning=tuned)

    return run(params, draft, jax.random.key(3))


def test_cached_keys_and_values_equal_a_fresh_prefill_of_each_rows_tokens():
    params = _params()
    other = _params(7)  # a different model as the draft: rows accept different numbers of drafts
    state = _spec_state(params, DraftModel(other, CONFIG, num_tokens=3))
    accepted = np.asarray(state.stats.accepted)
    assert accepted.max() > 0 and len(set(accepted.tolist())) > 1, accepted
    cache, history = state.cache, state.history
    starts, end = np.asarray(cache.starts), np.asarray(cache.end)
    tokens = np.asarray(history.tokens)
    np.testing.assert_array_equal(end, np.asarray(history.end))  # the newest token is not cached yet
    for b in range(len(PROMPTS)):
        row = tokens[b, starts[b]:end[b]]  # every token the row's cache holds
        assert len(row) == LENGTHS[b] + NEW - 1
        _, fresh = model.prefill(params, CONFIG, jnp.asarray(row[None]), jnp.asarray([len(row)]), len(row))
        for got, want in ((cache.k, fresh.k), (cache.v, fresh.v)):
            np.testing.assert_allclose(np.asarray(got[:, b, :, starts[b]:end[b]]), np.asarray(want[:, 0]),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.slow(reason="compiles the encoder-decoder's plain and two speculative programs (~35 s)")
def test_encoder_decoder_greedy_speculative_equals_plain():
    config = Seq2SeqConfig(vocab_size=37, num_encoder_layers=2, num_decoder_layers=2, d_model=32, num_heads=4,
                           max_len=64, init_std=0.4)
    params = jaxdec.init_params(config, jax.random.key(1))
    source = np.array([[4, 5, 6, 7, 8], [9, 9, 3, 0, 0]], np.int32)
    source_lengths = np.array([5, 3], np.int32)
    prompts = np.array([[1, 4], [1, 0]], np.int32)
    lengths = np.array([2, 1], np.int32)
    run = functools.partial(jaxdec.generate, params, config, prompts, lengths, source=source,
                            source_lengths=source_lengths, max_new_tokens=16)
    plain = run()
    for draft in (PromptLookup(num_tokens=3), DraftModel(params, config, num_tokens=2)):
        got = run(draft=draft)
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(plain.tokens))
        assert int(np.asarray(got.speculation.rounds).min()) >= 1


def _lookup_by_hand(row: list[int], num_tokens: int, max_ngram: int, min_ngram: int):
    """Prompt lookup written as plain Python over one row's tokens (newest last)."""
    for n in range(min(max_ngram, len(row) - 1), min_ngram - 1, -1):
        suffix = row[-n:]
        for j in range(len(row) - 2, n - 2, -1):  # the most recent earlier occurrence ends at j
            if row[j - n + 1:j + 1] == suffix:
                follow = [row[min(j + i, len(row) - 1)] for i in range(1, num_tokens + 1)]
                return follow, True
    return None, False


def test_prompt_lookup_equals_a_hand_written_search():
    rng = np.random.default_rng(0)
    W = 24
    rows = [rng.integers(0, 4, n).tolist() for n in (1, 2, 5, 11, 17, 20)]
    rows += [[1, 2, 3, 9, 1, 2, 3], [7, 7, 7, 7], [1, 2, 3, 4]]
    starts = np.array([W - 3 - len(r) for r in rows], np.int32)
    tokens = np.full((len(rows), W), 99, np.int32)  # padding that must never match
    for b, r in enumerate(rows):
        tokens[b, starts[b]:starts[b] + len(r)] = r
    history = History(tokens=jnp.asarray(tokens), starts=jnp.asarray(starts),
                      end=jnp.asarray(starts + np.array([len(r) for r in rows]) - 1, jnp.int32))
    for max_ngram, min_ngram in ((1, 1), (3, 1), (3, 2)):
        got = speculative.lookup(history, 3, max_ngram, min_ngram)
        for b, r in enumerate(rows):
            want, found = _lookup_by_hand(r, 3, max_ngram, min_ngram)
            assert bool(got.found[b]) == found, (b, r, max_ngram, min_ngram)
            if found:
                assert np.asarray(got.tokens[b]).tolist() == want, (b, r, max_ngram, min_ngram)


def test_bad_drafts_are_refused_before_compute():
    params = _params()
    with pytest.raises(ValueError, match="num_tokens"):
        PromptLookup(num_tokens=0)
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup(max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match="use_cache"):
        _plain(params, draft=PromptLookup(), use_cache=False)
    small = DecoderConfig(vocab_size=40, num_layers=1, d_model=16, num_heads=2, max_len=64)
    with pytest.raises(ValueError, match="vocab_size=40"):
        _plain(params, draft=DraftModel(jaxdec.init_params(small, jax.random.key(0)), small))
    with pytest.raises(ValueError, match="draft must be"):
        _plain(params, draft=object())


# --- sampling: the distribution of plain sampling ------------------------------------------------

V8 = DecoderConfig(vocab_size=8, num_layers=2, d_model=16, num_heads=2, max_len=32, init_std=0.5,
                   position="rope", tie_embeddings=False)
SAMPLE_PROMPT = np.array([1, 2, 3, 1, 2, 3, 1, 2], np.int32)
ROWS = 2000


@functools.cache
def _exact_continuations(sampler, seed: int = 0) -> np.ndarray:
    """float64 [8, 8, 8]: the probability of each 3-token continuation under plain sampling,
    enumerated through the model's forward pass and the sampler's warp."""
    params = _params(seed, V8)
    grid = np.stack(np.meshgrid(*[np.arange(8)] * 3, indexing="ij"), -1).reshape(-1, 3)  # [512, 3]
    seqs = np.concatenate([np.tile(SAMPLE_PROMPT, (512, 1)), grid], axis=1).astype(np.int32)
    logits = jaxdec.forward(params, V8, jnp.asarray(seqs))  # [512, P + 3, V]
    P = len(SAMPLE_PROMPT)
    probs = np.asarray(jax.nn.softmax(sampler.warp(logits[:, P - 1:P + 2]), axis=-1), np.float64)  # [512, 3, V]
    joint = np.prod(np.take_along_axis(probs, grid[:, :, None], axis=-1)[..., 0], axis=1)
    return joint.reshape(8, 8, 8)


def _chi_square_p(tokens: np.ndarray, exact: np.ndarray) -> float:
    """p-value of the counts of 3-token rows in `tokens` [N, 3] against `exact` [8, 8, 8]; cells
    expecting fewer than 5 are pooled into one."""
    counts = np.bincount(tokens[:, 0] * 64 + tokens[:, 1] * 8 + tokens[:, 2], minlength=512).astype(np.float64)
    expected = exact.reshape(-1) * len(tokens)
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(scipy_stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue)


SAMPLERS = {"temperature": jaxdec.Temperature(1.3), "top_k": jaxdec.TopK(3), "top_p": jaxdec.TopP(0.8)}


def _draft(kind: str):
    if kind == "lookup":
        return PromptLookup(num_tokens=2, max_ngram=2)
    return DraftModel(_params(5, V8), V8, num_tokens=2)  # another model: p and q differ


def _sample(sampler, draft, seed: int = 11) -> np.ndarray:
    prompts = np.tile(SAMPLE_PROMPT, (ROWS, 1))
    # Whichever rounds the tuning verifies, the distribution is the same (the first always does).
    out = jaxdec.generate(_params(0, V8), V8, prompts, max_new_tokens=3, sampler=sampler,
                          key=jax.random.key(seed), draft=draft)
    return np.asarray(out.tokens)


# One case runs by default; the rest (about 20 s each here: 4,000 rows per sampling run) are slow.
_SLOW = pytest.mark.slow(reason="a sampling run of 2,000 rows per case; one case runs by default")
DISTRIBUTION_CASES = [pytest.param(s, k, marks=() if (s, k) == ("top_k", "model") else _SLOW, id=f"{k}-{s}")
                      for k in ("lookup", "model") for s in SAMPLERS]


@pytest.mark.parametrize("sampler_name, kind", DISTRIBUTION_CASES)
def test_speculative_sampling_has_the_distribution_of_plain_sampling(sampler_name, kind):
    sampler = SAMPLERS[sampler_name]
    exact = _exact_continuations(sampler)
    assert exact.max() < 0.5  # far from deterministic, so a wrong rule has room to show
    tokens = _sample(sampler, _draft(kind))
    assert _chi_square_p(tokens, exact) > 1e-4
    plain = _sample(sampler, None)  # the test itself: plain sampling fits the enumeration
    assert _chi_square_p(plain, exact) > 1e-4


@pytest.mark.slow(reason="time budget: 2,000 rows of speculative sampling under a planted rule")
def test_a_wrong_acceptance_rule_fails_the_distribution_test(monkeypatch):
    """Accepting a draft with probability min(1, p / q) is what makes the output exact: accept
    every draft instead and the same test rejects the output."""
    sampler = SAMPLERS["temperature"]
    exact = _exact_continuations(sampler)
    draft = _draft("model")

    def state_tokens():
        state = _spec_state_v8(draft, sampler)
        return np.asarray(state.out_tokens[:, :3])

    assert _chi_square_p(state_tokens(), exact) > 1e-4
    right = speculative.accept

    def accept_everything(logits, proposal, sampler, key):
        tokens, n = right(logits, proposal, sampler, key)
        C = logits.shape[1]
        drafts = jnp.pad(proposal.tokens[:, :C - 1], ((0, 0), (0, 1)))
        return jnp.where(jnp.arange(C)[None, :] < C - 1, drafts, tokens), jnp.full_like(n, C - 1)

    monkeypatch.setattr(speculative, "accept", accept_everything)
    assert _chi_square_p(state_tokens(), exact) < 1e-6


def _spec_state_v8(draft, sampler):
    fam = family.of(V8)
    prompts = jnp.asarray(np.tile(SAMPLE_PROMPT, (ROWS, 1)))
    lengths = jnp.full((ROWS,), len(SAMPLE_PROMPT), jnp.int32)
    capacity = len(SAMPLE_PROMPT) + 3 + draft.num_tokens

    @jax.jit
    def run(params, draft, key):
        logits, cache = fam.prefill(params, V8, prompts, lengths, capacity)
        inputs = jaxdec.decode.DecodeInputs(prompts=prompts, lengths=lengths, source=None, source_lengths=None,
                                            key=key, eos_id=jnp.asarray(-1, jnp.int32),
                                            pad_id=jnp.asarray(0, jnp.int32))
        state = draft.start(speculative.DraftStart(inputs=inputs, capacity=capacity, tuning=tuning.PLAIN,
                                                   mesh=None))
        extend = lambda p, c, t: fam.extend(p, V8, c, t)  # noqa: E731
        return speculative.speculative_loop(extend, params, cache, logits, prompts, lengths, draft=draft,
                                            draft_state=state, sampler=sampler, key=key, max_new_tokens=3,
                                            eos_id=jnp.asarray(-1), pad_id=jnp.asarray(0), fam=fam,
                                            tuning=tuning.PLAIN)

    return run(_params(0, V8), draft, jax.random.key(11))


@pytest.mark.parametrize("sampler_name", list(SAMPLERS))
def test_warp_is_the_distribution_the_sampler_draws_from(sampler_name):
    sampler = SAMPLERS[sampler_name]
    logits = jax.random.normal(jax.random.key(0), (1, 8)) * 2
    draws = np.asarray(sampler(jnp.tile(logits, (20000, 1)), jax.random.key(1)))
    probs = np.asarray(jax.nn.softmax(sampler.warp(logits), axis=-1), np.float64)[0]
    counts = np.bincount(draws, minlength=8)
    assert np.all(counts[probs == 0] == 0)
    keep = probs > 0
    assert scipy_stats.chisquare(counts[keep], probs[keep] * counts.sum() / probs[keep].sum()).pvalue > 1e-4


def _loop_copies_of(hlo: str, shape: str) -> list[str]:
    """The copy instructions of an array of `shape` (e.g. 'f32[2,3,2,40,8]') in every computation of
    the compiled program but its entry (where the cache is made once)."""
    found, computation = [], None
    for line in hlo.splitlines():
        if not line.startswith(" ") and line.endswith("{"):
            computation = line.split()[0]
        if computation != "ENTRY" and f"= {shape}" in line and " copy(" in line:
            found.append(f"{computation}: {line.strip()[:120]}")
    return found


def test_rounds_update_the_cache_in_place():
    """The compiled speculative program copies no cache-sized array inside its loop: choosing
    between verification and a plain step must not copy the cache (a `lax.cond` over it did, in
    and out of both branches, every round, on CPU). A structural check of the compiled program,
    not a timing; a planted cond makes it fail."""
    params = _params()
    capacity = 40
    inputs, _ = jaxdec.decode.prepare_inputs(params, CONFIG, PROMPTS, LENGTHS, max_new_tokens=NEW,
                                             capacity=capacity, spare_slots=3)
    options = jaxdec.decode.DecodeOptions(config=CONFIG, max_new_tokens=NEW, capacity=capacity)
    program = jaxdec.decode._speculative.for_inputs(params)
    hlo = program.lower(params, inputs, PromptLookup(num_tokens=3), options).compile().as_text()
    shape = f"f32[{CONFIG.num_layers},3,{CONFIG.kv_heads},{capacity},{CONFIG.head_dim}]"
    assert f"= {shape}" in hlo, "the cache's shape was not found: the check would be vacuous"
    assert _loop_copies_of(hlo, shape) == []
