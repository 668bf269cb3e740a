"""Beam search as one jitted `lax.while_loop` with fixed shapes, over the same prefill and cached step
functions as sampling.

Each example keeps W running beams (summed log-probabilities) and a set of W finished
hypotheses scored `sum_logprob / length ** length_penalty` (length = generated tokens, the eos
included). Per step, the 2W best continuations of all running beams are ranked: an eos among the
top W finishes a hypothesis, the W best non-eos continuations keep running, and at the last step
every top-W continuation finishes. An example stops (keeps its finished set) once it has W
finished hypotheses and, with early_stopping, at once; otherwise when no running beam can still
beat its worst finished one. These are Hugging Face's `generate(num_beams=W)` rules, so the two
give the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxdec import checks, family, sampling, sharding
from jaxdec.decode import DecodeInputs, DecodeProgram, GenerateResult, check_layout, prefill_inputs, prepare_inputs
from jaxdec.sampling import Greedy, Sampler
from jaxdec.tuning import Tuning

NEG_INF = -1.0e9  # finite "impossible" score: keeps arithmetic NaN-free


@flax.struct.dataclass
class BeamState:
    """Loop carry. B examples x W beams of up to max_new_tokens tokens.

    cache: decode cache of B * W rows; running_tokens int32 [B, W, max_new_tokens]; running_scores float32
    [B, W] (summed log-probs); finished_tokens int32 [B, W, max_new_tokens]; finished_scores float32 [B, W]
    (length-normalised, NEG_INF where empty); finished_lengths int32 [B, W]; done bool [B];
    nonfinite bool [B] (a live beam's logits held NaN or inf); key: PRNG key of the next draw.
    """

    cache: object
    running_tokens: jax.Array
    running_scores: jax.Array
    finished_tokens: jax.Array
    finished_scores: jax.Array
    finished_lengths: jax.Array
    done: jax.Array
    nonfinite: jax.Array
    key: jax.Array


def _beam_update(state: BeamState, log_probs: jax.Array, t: int | jax.Array, *, sampler, eos_id,
                 length_penalty: float, early_stopping: bool, max_new_tokens: int):
    """Ranks continuations for new-token index t; returns the new state and the parent rows.

    log_probs: float32 [B, W, V] of each running beam's next token.
    """
    B, W, V = log_probs.shape
    candidates = (state.running_scores[:, :, None] + log_probs).reshape(B, W * V)
    key, sub = jax.random.split(state.key)
    # The sampler draws 2W distinct continuations from the W x V candidates (Greedy: the 2W
    # best, as Hugging Face's num_beams search); the rules below want them best first.
    drawn = sampling.draw(sampler, candidates, sub, 2 * W)  # [B, 2W]
    drawn_scores = jnp.take_along_axis(candidates, drawn, axis=1)
    order = jnp.argsort(-drawn_scores, axis=1, stable=True)
    top_ids = jnp.take_along_axis(drawn, order, axis=1)
    top_scores = jnp.take_along_axis(drawn_scores, order, axis=1)
    parents = top_ids // V  # [B, 2W] beam index
    tokens = (top_ids % V).astype(jnp.int32)
    seqs = jnp.take_along_axis(state.running_tokens, parents[:, :, None], axis=1)  # [B, 2W, max_new_tokens]
    seqs = jax.lax.dynamic_update_slice_in_dim(seqs, tokens[:, :, None], t, axis=2)

    # Finishing: an eos among the top W (or any top-W continuation at the last step).
    is_eos = tokens == eos_id
    last = t == max_new_tokens - 1
    finishing = (is_eos | last) & (jnp.arange(2 * W, dtype=jnp.int32)[None, :] < W) & ~state.done[:, None]
    length = (t + 1).astype(jnp.float32) if isinstance(t, jax.Array) else float(t + 1)
    new_scores = jnp.where(finishing, top_scores / length**length_penalty, NEG_INF)
    all_scores = jnp.concatenate([state.finished_scores, new_scores], axis=1)  # [B, 3W]
    all_tokens = jnp.concatenate([state.finished_tokens, seqs], axis=1)
    all_lengths = jnp.concatenate(
        [state.finished_lengths, jnp.full((B, 2 * W), 0, jnp.int32) + (t + 1)], axis=1)
    fin_scores, fin_idx = jax.lax.top_k(all_scores, W)
    fin_tokens = jnp.take_along_axis(all_tokens, fin_idx[:, :, None], axis=1)
    fin_lengths = jnp.take_along_axis(all_lengths, fin_idx, axis=1)

    # Running: the W best continuations that are not eos.
    run_scores, run_idx = jax.lax.top_k(jnp.where(is_eos, NEG_INF, top_scores), W)
    run_tokens = jnp.take_along_axis(seqs, run_idx[:, :, None], axis=1)
    run_parents = jnp.take_along_axis(parents, run_idx, axis=1)  # [B, W]

    # Stop rule, per example.
    full = fin_scores[:, -1] > NEG_INF / 2  # W finished hypotheses
    if early_stopping:
        done = state.done | full
    else:
        best_possible = run_scores[:, 0] / length**length_penalty
        done = state.done | (full & (fin_scores[:, -1] >= best_possible))
    new = BeamState(
        cache=state.cache,
        running_tokens=run_tokens,
        running_scores=run_scores,
        finished_tokens=fin_tokens,
        finished_scores=fin_scores,
        finished_lengths=fin_lengths,
        done=done,
        nonfinite=state.nonfinite,
        key=key,
    )
    rows = (jnp.arange(B, dtype=jnp.int32)[:, None] * W + run_parents).reshape(B * W)
    return new, rows, run_tokens[:, :, t].reshape(B * W)


@dataclasses.dataclass(frozen=True)
class BeamOptions:
    """The static choices of one `beam_search` program (hashable: the jit key, with the tuning):
    as `decode.DecodeOptions`, plus beam_size, length_penalty and early_stopping."""

    config: Any
    beam_size: int
    max_new_tokens: int
    capacity: int
    length_penalty: float = 1.0
    early_stopping: bool = False
    sampler: Any = Greedy()
    mesh: Any = None


def _beam_search_program(params, inputs: DecodeInputs, options: BeamOptions, *, tuning: Tuning):
    config, mesh = options.config, options.mesh
    B, W, new = inputs.prompts.shape[0], options.beam_size, options.max_new_tokens
    fam = family.of(config)
    params, inputs, logits, cache, step = prefill_inputs(params, inputs, options, tuning, rows_per_prompt=W)
    lengths, key, eos_id, pad_id = inputs.lengths, inputs.key, inputs.eos_id, inputs.pad_id
    state = BeamState(
        cache=sharding.constrain_caches(fam.repeat_rows(cache, W), mesh),
        running_tokens=jnp.full((B, W, new), pad_id, jnp.int32),
        # Only beam 0 is live at first, so the W beams do not start as W copies.
        running_scores=jnp.tile(jnp.array([0.0] + [NEG_INF] * (W - 1), jnp.float32), (B, 1)),
        finished_tokens=jnp.full((B, W, new), pad_id, jnp.int32),
        finished_scores=jnp.full((B, W), NEG_INF, jnp.float32),
        finished_lengths=jnp.zeros((B, W), jnp.int32),
        done=jnp.zeros((B,), bool),
        nonfinite=~jnp.all(jnp.isfinite(logits), axis=-1),
        key=key,
    )
    log_probs = jax.nn.log_softmax(logits, axis=-1)  # [B, V]
    log_probs = jnp.broadcast_to(log_probs[:, None], (B, W, log_probs.shape[-1]))
    update = functools.partial(_beam_update, sampler=options.sampler, eos_id=eos_id,
                               length_penalty=options.length_penalty, early_stopping=options.early_stopping,
                               max_new_tokens=new)
    state, rows, last_tokens = update(state, log_probs, 0)
    positions = jnp.repeat(lengths, W)

    def running(carry):
        t, state, _, _ = carry
        # Once every example is done its finished set is final: the loop ends.
        return (t < new) & ~jnp.all(state.done)

    def body(carry):
        t, state, rows, last_tokens = carry
        cache = fam.select_rows(state.cache, rows, tuning=tuning)
        logits, cache = step(params, config, cache, last_tokens, positions + t - 1)
        bad = ~jnp.all(jnp.isfinite(logits.reshape(B, -1)), axis=-1) & ~state.done
        log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(B, W, -1)
        state = state.replace(cache=cache, nonfinite=state.nonfinite | bad)
        return (t + 1, *update(state, log_probs, t))

    _, state, _, _ = jax.lax.while_loop(running, body, (jnp.ones((), jnp.int32), state, rows, last_tokens))
    best = state.finished_tokens[:, 0]  # [B, max_new_tokens]
    best_len = state.finished_lengths[:, 0]
    best = jnp.where(jnp.arange(new, dtype=jnp.int32)[None, :] < best_len[:, None], best, pad_id)
    return (GenerateResult(tokens=best, lengths=best_len, logits=None, nonfinite=state.nonfinite),
            state.finished_scores[:, 0])


_beam_search = DecodeProgram(_beam_search_program, static_argnames=("options",))


def beam_search(
    params,
    config,
    prompts,
    prompt_lengths=None,
    *,
    source=None,
    source_lengths=None,
    beam_size: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    eos_id: int | None = None,
    pad_id: int = 0,
    capacity: int | None = None,
    sampler: Sampler = Greedy(),
    key: jax.Array | None = None,
    mesh=None,
) -> tuple[GenerateResult, jax.Array]:
    """The best of `beam_size` beams per example, as Hugging Face's num_beams search.

    Args: as `generate` (params matching config, prompts int32 [B, P], prompt_lengths,
      source/source_lengths for a Seq2SeqConfig), plus beam_size W >= 1, length_penalty
      (exponent of the length in the score normalisation; > 0 favours longer outputs),
      early_stopping (stop an example as soon as W hypotheses have finished), sampler and key
      (the 2W continuations ranked each step are drawn by the sampler, without replacement, from
      the W x V candidates' summed log-probabilities: Greedy, the default, takes the 2W best, a
      stochastic or user-written sampler gives a sampled beam search; see `sampling.draw`),
      mesh (as `generate`: the placed params' mesh, or None).

    Returns:
      GenerateResult(tokens int32 [B, max_new_tokens] (pad_id after the hypothesis), lengths
      int32 [B], nonfinite bool [B]) and the best hypotheses' scores float32 [B].
    """
    checks.positive_int("beam_size", beam_size)
    check_layout(params, config, mesh)
    inputs, capacity = prepare_inputs(params, config, prompts, prompt_lengths, source=source,
                                      source_lengths=source_lengths, max_new_tokens=max_new_tokens,
                                      capacity=capacity, sampler=sampler, key=key, eos_id=eos_id, pad_id=pad_id)
    if beam_size * 2 > config.vocab_size:
        raise ValueError(f"beam_size {beam_size} needs 2 * beam_size <= vocab_size={config.vocab_size}")
    options = BeamOptions(config=config, beam_size=int(beam_size), max_new_tokens=max_new_tokens,
                          capacity=capacity, length_penalty=float(length_penalty),
                          early_stopping=bool(early_stopping), sampler=sampler, mesh=mesh)
    return _beam_search(params, inputs, options)
