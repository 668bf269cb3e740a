"""Speculative decoding inside the fixed KV cache: draft γ tokens cheaply, verify them all in one
`extend` of the target model (one read of its weights), keep the longest prefix it agrees with.

The output has exactly the distribution of plain decoding with the same sampler (the same tokens
for greedy). Rows accept different numbers of tokens per round, so the target's cache carries one
write slot per row (`KVCache.per_row`): after a round, row b's slot moves to just past its
accepted tokens, so the slots of its rejected drafts are never attended and are overwritten by
the next round; each row's positions stay those of its accepted tokens. A request needs γ spare
slots beyond prompt + max_new_tokens (checked on the host before compute).

Drafts (an open interface, like samplers: any hashable pytree with `num_tokens`, `start` and
`propose`, see `Draft`):
- `PromptLookup`: the tokens that followed the most recent earlier occurrence of the row's
  latest n-gram, in its own prompt and output; no second model.
- `DraftModel`: a smaller jaxdec model of the same family and vocabulary, with its own fixed
  cache.

Acceptance (`accept`): with a deterministic target sampler (greedy), or a draft that gives no
probabilities, every verified position draws its own token y_i from the target and drafts are
accepted while d_(i+1) == y_i ("sample and match": exact for any sampler, since every emitted
token is drawn from the target given the tokens before it). With a stochastic sampler that has a
`warp`, and a draft model's probabilities q, the speculative-sampling rule of Leviathan et al.
and Chen et al. (2023): accept d with probability min(1, p(d) / q(d)), and at the first
rejection draw from norm(max(0, p - q)); p and q both warped by the sampler.

Verifying costs more than a plain step (B x (γ + 1) rows instead of B). Each row keeps an
estimate of how many drafts it gets accepted (a running average over its verifications, drifting
back up while it does not verify, so it is tried again); a round verifies only when the rows
with a draft are expected to pay for the extra rows (`verify_ratio`, from the platform's
`Tuning.verify_row_cost`), and otherwise runs a plain one-token step: text that never repeats
itself costs about what plain decoding costs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxdec import cache as kv_cache
from jaxdec import checks, family


# --- what the loop shows a draft ----------------------------------------------------------------


@flax.struct.dataclass
class History:
    """Every row's tokens so far, laid out slot for slot like the target's KV cache.

    tokens: int32 [B, W], W >= capacity + γ + 1; row b's prompt and output occupy slots
      starts[b] .. end[b]. starts: int32 [B]. end: int32 [B], the slot of the newest token (emitted,
      not yet in the target's cache: the next round feeds it first).
    """

    tokens: jax.Array
    starts: jax.Array
    end: jax.Array

    def at(self, offset: int) -> jax.Array:
        """int32 [B]: each row's token at slot end + offset (offset <= 0)."""
        return jnp.take_along_axis(self.tokens, (self.end + offset)[:, None], axis=1)[:, 0]


@flax.struct.dataclass
class Proposal:
    """A draft's γ tokens per row.

    tokens: int32 [B, γ], guesses for the tokens after the row's newest one. logits: float32
    [B, γ, V] the draft sampled each token from (with the same sampler as the target), or None
    for a deterministic draft. found: bool [B], the row has a real guess (False: the round need
    not verify for this row's sake).
    """

    tokens: jax.Array
    logits: jax.Array | None
    found: jax.Array


@dataclasses.dataclass(frozen=True)
class DraftStart:
    """What a draft may read when it starts, inside the decode program: the validated
    `DecodeInputs` (prompts, lengths, source, ...), the cache capacity, the program's tuning,
    and the mesh (or None)."""

    inputs: Any
    capacity: int
    tuning: Any
    mesh: Any


class Draft:
    """Optional base class of drafts. A draft is a pytree (a flax struct dataclass; arrays such
    as a model's params are leaves, everything else static) with:

      num_tokens: int, γ, drafts per round (static).
      start(context: DraftStart) -> state: its loop state (any pytree), once per decode.
      propose(state, history: History, sampler, key, tuning) -> (Proposal, state); tuning: the
        program's `Tuning`, for a draft that runs a model.
      skip(state, history: History, tuning) -> state (optional): called instead of propose in a
        round that will not verify (even a draft for every row would not pay): a draft whose
        proposals cost something keeps its state up to date at less cost. Without it, the draft
        proposes every round.
    """

    num_tokens: int

    def start(self, context: DraftStart):
        return None

    def propose(self, state, history: History, sampler, key, tuning):
        raise NotImplementedError


def _check_num_tokens(num_tokens) -> None:
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
        raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")


# --- prompt lookup --------------------------------------------------------------------------------


@flax.struct.dataclass
class PromptLookup(Draft):
    """Drafts by n-gram lookup in the row's own tokens (prompt and output so far): the row's
    latest n tokens are searched for among its earlier tokens, longest n first (max_ngram down
    to min_ngram), and the num_tokens tokens that followed the most recent earlier occurrence
    are the draft. A row with no occurrence has no draft this round.
    """

    num_tokens: int = flax.struct.field(pytree_node=False, default=4)
    max_ngram: int = flax.struct.field(pytree_node=False, default=3)
    min_ngram: int = flax.struct.field(pytree_node=False, default=1)

    def __post_init__(self):
        _check_num_tokens(self.num_tokens)
        for name in ("max_ngram", "min_ngram"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram={self.min_ngram} must be <= max_ngram={self.max_ngram}")

    def propose(self, state, history: History, sampler, key, tuning):
        del sampler, key, tuning
        return lookup(history, self.num_tokens, self.max_ngram, self.min_ngram), state


def lookup(history: History, num_tokens: int, max_ngram: int, min_ngram: int = 1) -> Proposal:
    """`PromptLookup`'s draft: for each row, the match of its latest n-gram (longest n first) that
    ends nearest before its newest token, and the num_tokens tokens after it (slots past the
    newest token read as the newest token)."""
    tokens, starts, end = history.tokens, history.starts, history.end
    W = tokens.shape[1]
    slots = jnp.arange(W, dtype=jnp.int32)[None, :]  # [1, W]
    # match[b, j]: the n tokens ending at slot j equal the n tokens ending at end[b]; j < end[b].
    match = (slots < end[:, None]) & (tokens == history.at(0)[:, None])
    best_end = jnp.full(end.shape, -1, jnp.int32)  # [B], slot where the chosen match ends
    for n in range(1, max_ngram + 1):
        if n > 1:
            shifted = jnp.pad(tokens, ((0, 0), (n - 1, 0)))[:, :W]  # shifted[b, j] = tokens[b, j - n + 1]
            match = match & (shifted == history.at(1 - n)[:, None]) & (slots - n + 1 >= starts[:, None])
            match = match & (end[:, None] - n + 1 >= starts[:, None])  # the row has n tokens at all
        if n >= min_ngram:
            latest = jnp.max(jnp.where(match, slots, -1), axis=1)  # [B]
            best_end = jnp.where(latest >= 0, latest, best_end)  # a longer n-gram wins
    found = best_end >= 0
    follow = best_end[:, None] + jnp.arange(1, num_tokens + 1, dtype=jnp.int32)[None, :]  # [B, γ]
    follow = jnp.minimum(follow, end[:, None])
    draft = jnp.take_along_axis(tokens, jnp.clip(follow, 0, W - 1), axis=1)
    return Proposal(tokens=draft.astype(jnp.int32), logits=None, found=found)


# --- a draft model ----------------------------------------------------------------------------------


@flax.struct.dataclass
class DraftModel(Draft):
    """A jaxdec model of the target's family and vocabulary as the draft, with its own fixed
    cache laid out slot for slot like the target's. Each round it re-reads the row's two newest
    tokens (the slot before the newest is rewritten with the same key/value, so the state needs
    no account of what the last round accepted) and samples num_tokens tokens in turn with the
    target's sampler.

    params: the draft model's params (or `jaxdec.decode_params(...)`'s, laid out once); config:
    its config (static); num_tokens: γ.
    """

    params: Any
    config: Any = flax.struct.field(pytree_node=False)
    num_tokens: int = flax.struct.field(pytree_node=False, default=4)

    def __post_init__(self):
        _check_num_tokens(self.num_tokens)

    def _params(self):
        return getattr(self.params, "params", self.params)  # DecodeParams or plain params

    def start(self, context: DraftStart):
        fam = family.of(self.config)
        inputs = context.inputs
        params = self._params()
        if not hasattr(self.params, "params") and context.mesh is None:  # lay plain params out for the loop
            params = fam.decode_params(params, self.config, inputs.prompts.shape[0], tuning=context.tuning)
        _, cache = fam.prefill(params, self.config, inputs.prompts, inputs.lengths, context.capacity,
                               inputs.source, inputs.source_lengths, tuning=context.tuning)
        return params, fam.with_self_kv(cache, fam.self_kv(cache).per_row())

    def _read_newest(self, state, history: History, tuning):
        """The draft's logits float32 [B, 2, V] after the row's two newest tokens, written at
        their slots, and its state."""
        params, cache = state
        fam = family.of(self.config)
        kv = fam.self_kv(cache)
        cache = fam.with_self_kv(cache, kv.replace(end=history.end - 1))
        pair = jnp.stack([history.at(-1), history.at(0)], axis=1)  # [B, 2]
        logits, cache = fam.extend(params, self.config, cache, pair, tuning=tuning)
        return logits, (params, cache)

    def skip(self, state, history: History, tuning):
        # A round without a draft emits one token: reading the two newest tokens each round keeps
        # every slot up to the newest written, as a proposing round does.
        return self._read_newest(state, history, tuning)[1]

    def propose(self, state, history: History, sampler, key, tuning):
        logits, (params, cache) = self._read_newest(state, history, tuning)
        fam = family.of(self.config)
        keys = jax.random.split(key, self.num_tokens)
        first = sampler(logits[:, -1], keys[0])

        def step(carry, k):
            cache, token = carry
            logits, cache = fam.extend(params, self.config, cache, token[:, None], tuning=tuning)
            nxt = sampler(logits[:, 0], k)
            return (cache, nxt), (nxt, logits[:, 0])

        (cache, _), (rest, rest_logits) = jax.lax.scan(step, (cache, first), keys[1:])
        tokens = jnp.concatenate([first[:, None], rest.T], axis=1)  # [B, γ]
        all_logits = jnp.concatenate([logits[:, -1:], jnp.swapaxes(rest_logits, 0, 1)], axis=1)  # [B, γ, V]
        found = jnp.ones(tokens.shape[:1], bool)
        return Proposal(tokens=tokens.astype(jnp.int32), logits=all_logits, found=found), (params, cache)


# --- acceptance -----------------------------------------------------------------------------------


def leading_true(flags: jax.Array) -> jax.Array:
    """int32 [B]: how many of flags bool [B, γ] are True before the first False."""
    return jnp.sum(jnp.cumprod(flags.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)


def uses_ratio(sampler, proposal: Proposal) -> bool:
    """Whether acceptance uses the probability-ratio rule (a stochastic sampler with `warp`, and
    a draft with probabilities) rather than sample-and-match."""
    return bool(getattr(sampler, "stochastic", True)) and hasattr(sampler, "warp") and proposal.logits is not None


def accept(logits: jax.Array, proposal: Proposal, sampler, key: jax.Array):
    """Which drafts the target accepts, and the tokens it emits.

    Args:
      logits: float32 [B, C, V], the target's logits after the newest token and after each of
        the first C - 1 drafts (C = γ + 1, or 1 for a round without drafts).
      proposal: the drafts (tokens [B, γ], γ >= C - 1: only the first C - 1 are verified).

    Returns:
      tokens int32 [B, C]: the row emits tokens[:, :n + 1]; n int32 [B]: drafts accepted (<= C - 1).
    """
    B, C, V = logits.shape
    drafts = proposal.tokens[:, :C - 1]
    k_match, k_ratio, k_fix = jax.random.split(key, 3)
    if C > 1 and uses_ratio(sampler, proposal):
        p = jax.nn.softmax(sampler.warp(logits), axis=-1)  # [B, C, V]
        q = jax.nn.softmax(sampler.warp(proposal.logits[:, :C - 1]), axis=-1)  # [B, C - 1, V]
        p_d = jnp.take_along_axis(p[:, :C - 1], drafts[..., None], axis=-1)[..., 0]  # [B, C - 1]
        q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
        u = jax.random.uniform(k_ratio, p_d.shape, jnp.float32)
        n = leading_true(u * q_d < p_d)  # accept with probability min(1, p / q)
        q_full = jnp.concatenate([q, jnp.zeros((B, 1, V), q.dtype)], axis=1)  # the bonus position: q = 0
        residual = jnp.maximum(p - q_full, 0.0)  # [B, C, V]
        residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p)  # p == q: draw from p
        fixes = jax.random.categorical(k_fix, jnp.log(residual), axis=-1).astype(jnp.int32)  # [B, C]
        slots = jnp.arange(C, dtype=jnp.int32)[None, :]
        padded = jnp.pad(drafts, ((0, 0), (0, 1)))
        return jnp.where(slots < n[:, None], padded, fixes), n
    drawn = sampler(logits.reshape(B * C, V), k_match).reshape(B, C).astype(jnp.int32)  # y_i ~ p_i
    n = leading_true(drafts == drawn[:, :C - 1]) if C > 1 else jnp.zeros((B,), jnp.int32)
    return drawn, n


# --- when to verify -------------------------------------------------------------------------------

# Weight of the newest verification in a row's estimate of drafts accepted per verification.
ESTIMATE_WEIGHT = 0.75
# Share of the way back to γ that a row's estimate moves in each round it does not verify: a row
# whose drafts failed is tried again after a few dozen steps, in case its text began to repeat.
ESTIMATE_RECOVERY = 1 / 512


def verify_ratio(batch: int, num_tokens: int, row_cost: float) -> float:
    """Time of a step over batch x (num_tokens + 1) rows over that of a step over batch rows,
    when each row beyond the first adds row_cost of a one-row step."""
    cost = lambda rows: 1.0 + row_cost * (rows - 1)  # noqa: E731
    return cost(batch * (num_tokens + 1)) / cost(batch)


def should_verify(expected: jax.Array, found: jax.Array, running: jax.Array, ratio: float) -> jax.Array:
    """bool []: a verification is expected to emit more tokens per unit of time than a plain step.

    expected float32 [B]: drafts each row expects accepted; found bool [B]: the row has a draft;
    running bool [B]. A plain step emits one token per running row at cost 1; a verification
    emits 1 + expected per running row with a draft (1 without) at cost `ratio`.
    """
    rows = jnp.sum(running, dtype=jnp.float32)
    gain = jnp.sum(jnp.where(found & running, expected, 0.0))
    return jnp.any(found & running) & (rows + gain >= ratio * rows)


# --- the loop --------------------------------------------------------------------------------------


@flax.struct.dataclass
class SpeculationStats:
    """What speculation did, per row while it ran: rounds int32 [B] (verifications), steps
    int32 [B] (plain one-token rounds: no row had a draft), accepted int32 [B] (drafts accepted),
    accepted_at int32 [γ] (rows x rounds whose draft i was accepted, summed over rows), drafted
    int32 [B] (rounds in which the draft proposed; a draft with `skip` does not propose in rounds
    that could not verify)."""

    rounds: jax.Array
    steps: jax.Array
    accepted: jax.Array
    accepted_at: jax.Array
    drafted: jax.Array

    def acceptance_rate(self) -> jax.Array:
        """float32 [γ]: the share of verifications in which draft i was accepted."""
        return self.accepted_at / jnp.maximum(jnp.sum(self.rounds), 1)


@flax.struct.dataclass
class SpecState:
    """Loop carry of `speculative_loop`: the target's cache (per-row write slots), the draft's
    state, the history, the outputs so far (out_tokens [B, max_new_tokens + γ + 1], the tail
    beyond max_new_tokens a scratch area for the last round's writes), and expected float32
    [B], each row's estimate of drafts accepted per verification (`should_verify`)."""

    cache: Any
    draft_state: Any
    history: History
    done: jax.Array
    lengths: jax.Array
    key: jax.Array
    out_tokens: jax.Array
    nonfinite: jax.Array
    stats: SpeculationStats
    expected: jax.Array
    out_logits: jax.Array | None = None

    def outputs(self, max_new_tokens: int):
        """(tokens int32 [B, max_new_tokens], lengths int32 [B], logits float32 [B,
        max_new_tokens, V] or None, nonfinite bool [B], SpeculationStats)."""
        logits = None if self.out_logits is None else self.out_logits[:, :max_new_tokens]
        return self.out_tokens[:, :max_new_tokens], self.lengths, logits, self.nonfinite, self.stats


def _write_rows(buffer: jax.Array, rows: jax.Array, at: jax.Array) -> jax.Array:
    """buffer [B, W, ...] with rows [B, C, ...] written at each row's own offset at [B]."""
    start = lambda b: kv_cache.slice_start(b, at[b], *(0,) * (buffer.ndim - 2))  # noqa: E731
    return kv_cache.write_each_row((buffer,), (rows,), start)[0]


@flax.struct.dataclass
class _Verified:
    """What one round's forward pass gives: the target's cache, the emitted tokens int32
    [B, γ + 1] and accepted drafts n int32 [B] (`accept`), finite bool [B, γ + 1] (the logits at
    each position hold no NaN or inf), and the logits float32 [B, γ + 1, V] if they are kept."""

    cache: Any
    emitted: jax.Array
    n: jax.Array
    finite: jax.Array
    logits: jax.Array | None

    @staticmethod
    def of(cache, emitted, n, logits, keep_logits: bool) -> "_Verified":
        finite = jnp.all(jnp.isfinite(logits), axis=-1)
        return _Verified(cache=cache, emitted=emitted, n=n, finite=finite, logits=logits if keep_logits else None)

    @staticmethod
    def empty(cache, B: int, C: int, V: int, keep_logits: bool) -> "_Verified":
        return _Verified(cache=cache, emitted=jnp.zeros((B, C), jnp.int32), n=jnp.zeros((B,), jnp.int32),
                         finite=jnp.ones((B, C), bool),
                         logits=jnp.zeros((B, C, V), jnp.float32) if keep_logits else None)

    def fields(self):
        return self.cache, self.emitted, self.n, self.logits, self.finite


def _no_proposal(draft, draft_state, history: History, sampler, key, tuning) -> Proposal:
    """A proposal shaped like the draft's, with no row found (for rounds the draft skips)."""
    shapes = jax.eval_shape(lambda: draft.propose(draft_state, history, sampler, key, tuning)[0])
    proposal = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    return proposal.replace(found=jnp.zeros(shapes.found.shape, bool))


def _run_if(pred: jax.Array, fn, carry):
    """fn(carry) where pred (bool []) is True, else carry: as a loop of zero or one iteration.
    Under a `lax.cond` XLA's CPU backend copied the whole carried cache in and out of both
    branches every round; a loop updates it in place."""
    return jax.lax.while_loop(lambda c: c[0], lambda c: (jnp.zeros((), bool), fn(c[1])), (pred, carry))[1]


def speculative_loop(extend_fn, params, cache, first_logits: jax.Array, prompts: jax.Array,
                     prompt_lengths: jax.Array, *, draft, draft_state, sampler, key: jax.Array,
                     max_new_tokens: int, eos_id: jax.Array, pad_id: jax.Array, return_logits: bool = False,
                     fam: family.Family, tuning):
    """Samples max_new_tokens tokens per row in one `lax.while_loop` of draft-and-verify rounds.

    Args:
      extend_fn: (params, cache, tokens int32 [B, C]) -> (logits float32 [B, C, V], cache), the
        target family's `extend`.
      cache: the target's cache after the prefill (any family; its self-attention KVCache is
        switched to per-row write slots here).
      first_logits: float32 [B, V], the prefill's prediction of each row's first new token.
      prompts, prompt_lengths: int32 [B, P] right-padded and [B] (for the history).
      draft, draft_state: a `Draft` and what its `start` returned.

    Returns:
      the final SpecState (`outputs` gives tokens int32 [B, max_new_tokens], lengths, logits
      float32 [B, max_new_tokens, V] or None, nonfinite bool [B], SpeculationStats).
    """
    gamma = draft.num_tokens
    kv = fam.self_kv(cache).per_row()
    cache = fam.with_self_kv(cache, kv)
    B, V = first_logits.shape
    key, sub = jax.random.split(key)
    first = sampler(first_logits, sub).astype(jnp.int32)
    width = kv.capacity + gamma + 2
    history = History(tokens=kv_cache.place_rows(prompts, prompt_lengths, kv.starts, width), starts=kv.starts,
                      end=kv.end)
    history = history.replace(tokens=_write_rows(history.tokens, first[:, None], history.end))
    out_width = max_new_tokens + gamma + 1
    out_logits = None
    if return_logits:
        out_logits = jnp.zeros((B, out_width, V), jnp.float32).at[:, 0].set(first_logits)
    state = SpecState(
        cache=cache, draft_state=draft_state, history=history,
        done=(first == eos_id) | (max_new_tokens <= 1),
        lengths=jnp.ones((B,), jnp.int32),
        key=key,
        out_tokens=jnp.full((B, out_width), pad_id, jnp.int32).at[:, 0].set(first),
        nonfinite=checks.nonfinite_rows(first_logits),
        stats=SpeculationStats(rounds=jnp.zeros((B,), jnp.int32), steps=jnp.zeros((B,), jnp.int32),
                               accepted=jnp.zeros((B,), jnp.int32), accepted_at=jnp.zeros((gamma,), jnp.int32),
                               drafted=jnp.zeros((B,), jnp.int32)),
        expected=jnp.full((B,), float(gamma), jnp.float32),
        out_logits=out_logits,
    )
    ratio = verify_ratio(B, gamma, tuning.verify_row_cost)
    skippable = hasattr(draft, "skip")
    no_proposal = _no_proposal(draft, draft_state, history, sampler, key, tuning) if skippable else None

    def draft_round(state: SpecState, key):
        """(the proposal, the draft's state, bool []: the draft proposed). A draft with `skip` is
        skipped when even a draft for every running row would not be verified."""
        if not skippable:
            return *draft.propose(state.draft_state, state.history, sampler, key, tuning), jnp.ones((), bool)
        running = ~state.done
        drafting = should_verify(state.expected, running, running, ratio)
        carry = _run_if(drafting, lambda c: draft.propose(c[1], state.history, sampler, key, tuning),
                        (no_proposal, state.draft_state))
        carry = _run_if(~drafting, lambda c: (c[0], draft.skip(c[1], state.history, tuning)), carry)
        return *carry, drafting

    def round_(state: SpecState) -> SpecState:
        running = ~state.done
        key, k_draft, k_accept = jax.random.split(state.key, 3)
        proposal, draft_state, drafting = draft_round(state, k_draft)
        newest = state.history.at(0)
        end = fam.self_kv(state.cache).end

        def verify(carry):
            tokens = jnp.concatenate([newest[:, None], proposal.tokens], axis=1)  # [B, γ + 1]
            logits, cache = extend_fn(params, carry.cache, tokens)
            emitted, n = accept(logits, proposal, sampler, k_accept)
            return _Verified.of(cache, emitted, n, logits, return_logits)

        def step(carry):  # no row has a draft: one token, as plain decoding would
            logits, cache = extend_fn(params, carry.cache, newest[:, None])
            emitted, n = accept(logits, proposal, sampler, k_accept)
            pad = lambda a: jnp.pad(a, ((0, 0), (0, gamma)) + ((0, 0),) * (a.ndim - 2))  # noqa: E731
            return _Verified.of(cache, pad(emitted), n, pad(logits), return_logits)

        verifying = should_verify(state.expected, proposal.found, running, ratio)
        out = _Verified.empty(state.cache, B, gamma + 1, V, return_logits)
        out = _run_if(verifying, verify, out)
        cache, emitted, n, logits, finite = _run_if(~verifying, step, out).fields()
        # Tokens this round adds to each row: the accepted drafts and one more, cut at eos and at
        # max_new_tokens; none for rows already done.
        slots = jnp.arange(gamma + 1, dtype=jnp.int32)[None, :]
        is_eos = (emitted == eos_id) & (slots <= n[:, None])
        first_eos = jnp.min(jnp.where(is_eos, slots, gamma + 1), axis=1)
        count = jnp.minimum(jnp.minimum(n + 1, first_eos + 1), max_new_tokens - state.lengths)
        count = jnp.where(running, count, 0)
        lengths = state.lengths + count
        done = state.done | (first_eos < count) | (lengths >= max_new_tokens)
        # The verified tokens of a row sit at slots end .. end + n; later slots are rejected drafts,
        # never attended: the row's next write starts after its accepted ones.
        kv = fam.self_kv(cache)
        cache = fam.with_self_kv(cache, kv.replace(end=end + jnp.where(running, n + 1, 0)))
        written = jnp.where(slots < count[:, None], emitted, pad_id)
        out_tokens = _write_rows(state.out_tokens, written, state.lengths)
        history = state.history.replace(tokens=_write_rows(state.history.tokens, emitted, state.history.end + 1),
                                        end=state.history.end + jnp.where(running, n + 1, 0))
        out_logits = state.out_logits
        if return_logits:
            out_logits = _write_rows(out_logits, logits, state.lengths)
        nonfinite = state.nonfinite | (running & jnp.any(~finite & (slots < count[:, None]), axis=1))
        verified = running & verifying
        accepted_mask = verified[:, None] & (slots[:, :gamma] < n[:, None])  # [B, γ]
        stats = SpeculationStats(
            rounds=state.stats.rounds + verified.astype(jnp.int32),
            steps=state.stats.steps + (running & ~verifying).astype(jnp.int32),
            accepted=state.stats.accepted + jnp.where(verified, n, 0),
            accepted_at=state.stats.accepted_at + jnp.sum(accepted_mask, axis=0, dtype=jnp.int32),
            drafted=state.stats.drafted + (running & drafting).astype(jnp.int32),
        )
        tried = verified & proposal.found
        expected = jnp.where(tried, (1 - ESTIMATE_WEIGHT) * state.expected + ESTIMATE_WEIGHT * n.astype(jnp.float32),
                             jnp.where(running & ~verifying,
                                       state.expected + ESTIMATE_RECOVERY * (gamma - state.expected), state.expected))
        return SpecState(cache=cache, draft_state=draft_state, history=history, done=done, lengths=lengths,
                         key=key, out_tokens=out_tokens, nonfinite=nonfinite, stats=stats, expected=expected,
                         out_logits=out_logits)

    return jax.lax.while_loop(lambda s: ~jnp.all(s.done), round_, state)
