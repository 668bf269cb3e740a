"""Autoregressive decoding: one `lax.while_loop` over steps (it ends early once every row has
emitted eos), carrying a named DecodeState.

The loop (`decode_loop`) knows the model only through a step function
`step_fn(params, state_cache, tokens [B], positions [B]) -> (logits [B, V], state_cache)`,
so the same loop runs the cached path, the uncached baseline and every model family.
`generate` reaches the model only through its family (`family.of(config)`: prefill and step),
validates input on the host, pads prompts to a width fixed by (capacity, max_new_tokens) so
prompt contents and lengths never recompile, and runs prefill plus the loop as one XLA program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdec import cache as kv_cache
from jaxdec import api, checks, family, sampling, sharding, speculative, tuning
from jaxdec.config import DecoderConfig, Seq2SeqConfig
from jaxdec.sampling import Greedy, Sampler
from jaxdec.tuning import Tuning


@flax.struct.dataclass
class DecodeState:
    """Loop carry of the decode loop.

    Attributes:
      cache: the step function's state (KVCache, token buffer, ...).
      tokens: int32 [B], the latest sampled token of each example (fed at the next step).
      positions: int32 [B], the position of `tokens` in its example's sequence.
      done: bool [B], the example has emitted eos_id.
      lengths: int32 [B], tokens generated so far, the eos included.
      key: PRNG key for the next sample.
      step: int32 [], index of the next token to sample (1 .. max_new_tokens - 1).
      out_tokens: int32 [B, max_new_tokens], the tokens so far (pad_id beyond).
      out_logits: float32 [B, max_new_tokens, V] of each sampled token (zeros beyond), or None.
      nonfinite: bool [B], a logit this row sampled from was NaN or inf.
    """

    cache: Any
    tokens: jax.Array
    positions: jax.Array
    done: jax.Array
    lengths: jax.Array
    key: jax.Array
    step: jax.Array
    out_tokens: jax.Array
    nonfinite: jax.Array
    out_logits: jax.Array | None = None


@flax.struct.dataclass
class GenerateResult:
    """tokens int32 [B, max_new_tokens] (pad_id after an example's eos); lengths int32 [B];
    logits float32 [B, max_new_tokens, V] that each token was sampled from (if requested; after
    an example's eos they are the model's logits after the fed pad_id, as in Hugging Face, and
    unused; zeros at the steps after every example has stopped, which are skipped);
    nonfinite bool [B]: a logit that row's tokens were sampled from was NaN or inf (broken
    params or overflow), so its tokens are meaningless; None only where nothing was checked;
    speculation: what speculative decoding did (`speculative.SpeculationStats`: verification
    rounds, accepted drafts per row and per draft position), None without a draft;
    buffer: the cache's storage (`cache.KVBuffer`) to pass to the next call, when this call was
    given one."""

    tokens: jax.Array
    lengths: jax.Array
    logits: jax.Array | None = None
    nonfinite: jax.Array | None = None
    speculation: speculative.SpeculationStats | None = None
    buffer: kv_cache.KVBuffer | None = None


@flax.struct.dataclass
class DecodeParams:
    """A model's params laid out once for many `generate` / `beam_search` calls (`decode_params`).

    params: the family's decode params (`Family.decode_params`) for the platform's tuning; for the
      decoder-only LM and the encoder-decoder's decoder on CPU: per-layer weights (up to
      `Tuning.split_layers_max` layers) and a tied head's [D, V] copy. config: the config they
      were checked against (static). tuning: the tuning they were laid out for (static).
    """

    params: Any
    config: Any = flax.struct.field(pytree_node=False)
    tuning: Tuning = flax.struct.field(pytree_node=False, default=tuning.PLAIN)


# Rows the layout of `decode_params` is made for: any batch above 1 reads the same layout, and
# batch 1 simply ignores the tied head's copy.
_LAYOUT_ROWS = 2
_decode_params_jit = jax.jit(lambda params, config, tuning: family.of(config).decode_params(params, config, _LAYOUT_ROWS,
                                                                               tuning=tuning),
                  static_argnames=("config", "tuning"))


def decode_params(params, config: DecoderConfig | Seq2SeqConfig) -> DecodeParams:
    """`params` laid out for decoding once, to pass to any number of `generate` and
    `beam_search` calls (cached, on one device or where the arrays are; not with a mesh).

    Every decode program otherwise lays the weights out anew on each call, because on CPU a
    loop cannot read layer i of a stacked [L, ...] weight in place. For a large model each call
    then pays for that copy into fresh memory (`python -m jaxdec.tools.bench gpt2` decodes both ways).
    The result holds its own copy of the weights: memory holds both layouts for as long as both
    are referenced. ValueError if params do not match config.
    """
    api.check_config(config)
    api.check_params(params, config)
    tuned = tuning.for_platform(_platform(params, None))
    return DecodeParams(params=_decode_params_jit(params, config, tuned), config=config, tuning=tuned)


def check_layout(params, config, mesh, use_cache: bool = True) -> None:
    """DecodeParams serve cached decoding of their own config without a mesh (ValueError
    otherwise)."""
    if not isinstance(params, DecodeParams):
        return
    if params.config != config:
        raise ValueError(f"these DecodeParams were laid out for {params.config}, not for {config}")
    if mesh is not None:
        raise ValueError("DecodeParams are for decoding without a mesh: pass the placed params with mesh=")
    if not use_cache:
        raise ValueError("DecodeParams are for cached decoding: pass the model's params with use_cache=False")


def decode_params_for(params, config, batch: int, mesh=None, tuning: Tuning = tuning.PLAIN):
    """The params a loop of cached steps over `batch` rows reads (inside a decode program):
    the family's loop layout for the tuning, except on a mesh (the stacked params keep their
    sharding)."""
    if isinstance(params, DecodeParams):
        params = params.params
    elif mesh is not None:
        return params
    return family.of(config).decode_params(params, config, batch, tuning=tuning)


StepFn = Callable[[Any, Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


def decode_loop(
    step_fn: StepFn,
    params,
    cache,
    first_logits: jax.Array,
    positions: jax.Array,
    *,
    sampler: Sampler,
    key: jax.Array,
    max_new_tokens: int,
    eos_id: jax.Array,
    pad_id: jax.Array,
    return_logits: bool = False,
    return_cache: bool = False,
) -> GenerateResult | tuple[GenerateResult, Any]:
    """Samples max_new_tokens tokens per example in one `lax.while_loop`.

    The loop ends after max_new_tokens - 1 steps or as soon as every example has emitted
    eos_id, so steps after the last row stops cost nothing, while the outputs keep their fixed
    shapes and the program its single compilation. (A `lax.cond` skipping the model inside a
    scan would copy the whole carried cache every step on CPU.)

    Args:
      step_fn: (params, cache, tokens [B], positions [B]) -> (logits [B, V], cache).
      first_logits: float32 [B, V], the prefill's prediction of the first new token.
      positions: int32 [B], position of the first new token (each prompt's length).
      eos_id: int32 [], stop token (-1: never stop); pad_id: int32 [], emitted after stopping.
      return_cache: also return the step function's final state (the pair (result, cache)).
    """
    key, sub = jax.random.split(key)
    first = sampler(first_logits, sub)
    B = first.shape[0]
    out_logits = None
    if return_logits:
        out_logits = jnp.zeros((B, max_new_tokens, first_logits.shape[-1]), jnp.float32)
        out_logits = out_logits.at[:, 0].set(first_logits)
    state = DecodeState(
        cache=cache,
        tokens=first,
        positions=positions.astype(jnp.int32),
        done=first == eos_id,
        lengths=jnp.ones_like(first),
        key=key,
        step=jnp.ones((), jnp.int32),
        out_tokens=jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first),
        nonfinite=checks.nonfinite_rows(first_logits),
        out_logits=out_logits,
    )

    def running(state: DecodeState):
        return (state.step < max_new_tokens) & ~jnp.all(state.done)

    def body(state: DecodeState) -> DecodeState:
        logits, cache = step_fn(params, state.cache, state.tokens, state.positions)
        key, sub = jax.random.split(state.key)
        token = jnp.where(state.done, pad_id, sampler(logits, sub))
        out_logits = state.out_logits
        if return_logits:
            out_logits = jax.lax.dynamic_update_slice_in_dim(out_logits, logits[:, None], state.step, axis=1)
        return DecodeState(
            cache=cache,
            tokens=token,
            positions=state.positions + 1,
            done=state.done | (token == eos_id),
            lengths=state.lengths + (~state.done).astype(jnp.int32),
            key=key,
            step=state.step + 1,
            out_tokens=jax.lax.dynamic_update_slice_in_dim(state.out_tokens, token[:, None], state.step, axis=1),
            nonfinite=state.nonfinite | (~state.done & checks.nonfinite_rows(logits)),
            out_logits=out_logits,
        )

    final = jax.lax.while_loop(running, body, state)
    result = GenerateResult(tokens=final.out_tokens, lengths=final.lengths, logits=final.out_logits,
                            nonfinite=final.nonfinite)
    return (result, final.cache) if return_cache else result


def prefill_and_step(params, config, tokens, lengths, capacity, source, source_lengths, use_cache: bool,
                     tuning: Tuning = tuning.PLAIN, buffer: kv_cache.KVBuffer | None = None):
    """The model family's prefill, run now (into `buffer`'s storage, if given), and its step
    function for the loop (cached, or the uncached baseline), both under `tuning`."""
    fam = family.of(config)
    if not use_cache:
        logits, state = fam.prefill_uncached(params, config, tokens, lengths, capacity, source, source_lengths,
                                             tuning=tuning)
        return logits, state, functools.partial(fam.recompute_step, tuning=tuning)
    logits, state = fam.prefill(params, config, tokens, lengths, capacity, source, source_lengths, tuning=tuning,
                                buffer=buffer)
    return logits, state, functools.partial(fam.step, tuning=tuning)


@functools.cache
def _options_accepted(options: tuple) -> bool:
    """Whether this jaxlib knows the compiler options (an unknown one fails compilation)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(np.float32(0)).compile()
    except Exception:  # noqa: BLE001 - any refusal means: compile with XLA's defaults
        return False
    return True


def _platform(params, mesh) -> str | None:
    """The platform the decode program will run on (`tuning.platform_of`); None inside the
    caller's jit, where compiler options cannot apply (only a top-level jit takes them)."""
    return tuning.platform_of(params.params if isinstance(params, DecodeParams) else params, mesh)


class DecodeProgram:
    """A decode function `fn(..., tuning=)`, jit-compiled once per tuning: the tuning of the
    platform its params (or mesh) are on (`tuning.for_platform`; DecodeParams carry their own),
    bound into the program, with that tuning's compiler options where this jaxlib accepts them
    (and the program is not traced inside the caller's jit)."""

    def __init__(self, fn: Callable, static_argnames: tuple[str, ...], donate_argnames: tuple[str, ...] = ()):
        self._fn, self._static_argnames, self._donate_argnames = fn, static_argnames, donate_argnames
        self._programs = {}  # (tuning, compiler options) -> jitted fn

    def for_tuning(self, tuned: Tuning, traced: bool = False):
        """The jitted program of one tuning (its compiler options unless traced)."""
        options = tuned.decode_compiler_options
        if traced or not (options and _options_accepted(options)):
            options = ()
        if (tuned, options) not in self._programs:
            self._programs[tuned, options] = jax.jit(functools.partial(self._fn, tuning=tuned),
                                                     static_argnames=self._static_argnames,
                                                     donate_argnames=self._donate_argnames,
                                                     compiler_options=dict(options) or None)
        return self._programs[tuned, options]

    def for_inputs(self, params, mesh=None):
        """The jitted program for these params (or this mesh)."""
        platform = _platform(params, mesh)
        tuned = params.tuning if isinstance(params, DecodeParams) else tuning.for_platform(platform)
        return self.for_tuning(tuned, traced=platform is None)

    def __call__(self, params, inputs, options, *args):
        return self.for_inputs(params, options.mesh)(params, inputs, options, *args)


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """The static choices of one `generate` program (hashable: the jit key, with the tuning).

    config; max_new_tokens; capacity (cache slots); sampler; use_cache (False: the uncached
    baseline); return_logits; mesh (the params' mesh, or None).
    """

    config: Any
    max_new_tokens: int
    capacity: int
    sampler: Any = Greedy()
    use_cache: bool = True
    return_logits: bool = False
    mesh: Any = None


def prefill_inputs(params, inputs: "DecodeInputs", options, tuning: Tuning, use_cache: bool = True,
                   rows_per_prompt: int = 1, buffer: kv_cache.KVBuffer | None = None):
    """Inside a decode program: the inputs constrained to the mesh, the decode params (for the
    cached path, laid out before the prefill so that it reads the same layout, for a loop over
    rows_per_prompt rows per prompt: beam search's beams), and the prefill's logits, state (its
    cache in `buffer`'s storage, if given) and step function."""
    mesh, config = options.mesh, options.config
    params, (prompts, lengths, source, source_lengths) = sharding.constrain_decode_inputs(
        mesh, params, (inputs.prompts, inputs.lengths, inputs.source, inputs.source_lengths))
    inputs = inputs.replace(prompts=prompts, lengths=lengths, source=source, source_lengths=source_lengths)
    rows = inputs.prompts.shape[0] * rows_per_prompt
    if use_cache:
        params = decode_params_for(params, config, rows, mesh, tuning)
    elif isinstance(params, DecodeParams):
        params = params.params
    logits, state, step = prefill_and_step(params, config, inputs.prompts, inputs.lengths, options.capacity,
                                           inputs.source, inputs.source_lengths, use_cache, tuning, buffer)
    return params, inputs, logits, state, sharding.sharded_step(step, mesh)


def _buffer_of(config, cache) -> kv_cache.KVBuffer:
    """The storage of a decode state's self-attention cache, to hand to the next call."""
    kv = family.of(config).self_kv(cache)
    return kv_cache.KVBuffer(k=kv.k, v=kv.v)


def _generate_program(params, inputs: "DecodeInputs", options: DecodeOptions, buffer=None, *,
                      tuning: Tuning) -> GenerateResult:
    params, inputs, logits, state, step = prefill_inputs(params, inputs, options, tuning, options.use_cache,
                                                         buffer=buffer)
    result, cache = decode_loop(
        lambda p, c, t, pos: step(p, options.config, c, t, pos),
        params, sharding.constrain_caches(state, options.mesh), logits, inputs.lengths,
        sampler=sampling.tuned(options.sampler, tuning), key=inputs.key, max_new_tokens=options.max_new_tokens,
        eos_id=inputs.eos_id, pad_id=inputs.pad_id, return_logits=options.return_logits, return_cache=True,
    )
    return result if buffer is None else result.replace(buffer=_buffer_of(options.config, cache))


# A given buffer is donated: the program writes its cache into that storage in place.
_generate = DecodeProgram(_generate_program, static_argnames=("options",), donate_argnames=("buffer",))


def _speculative_program(params, inputs: "DecodeInputs", draft, options: DecodeOptions, buffer=None, *,
                         tuning: Tuning) -> GenerateResult:
    """Prefill, the draft's start, and the draft-and-verify rounds (`speculative.speculative_loop`)
    as one program."""
    # The verification reads γ + 1 rows per prompt: the params' layout is the one for that many rows.
    params, inputs, logits, state, _ = prefill_inputs(params, inputs, options, tuning,
                                                      rows_per_prompt=draft.num_tokens + 1, buffer=buffer)
    fam, config, mesh = family.of(options.config), options.config, options.mesh
    draft_state = draft.start(speculative.DraftStart(inputs=inputs, capacity=options.capacity, tuning=tuning,
                                                     mesh=mesh))
    extend = sharding.sharded_step(lambda p, c, t: fam.extend(p, config, c, t, tuning=tuning), mesh)
    final = speculative.speculative_loop(
        extend, params, sharding.constrain_caches(state, mesh), logits, inputs.prompts, inputs.lengths,
        draft=draft, draft_state=draft_state, sampler=sampling.tuned(options.sampler, tuning), key=inputs.key,
        max_new_tokens=options.max_new_tokens, eos_id=inputs.eos_id, pad_id=inputs.pad_id,
        return_logits=options.return_logits, fam=fam, tuning=tuning)
    tokens, lengths, out_logits, nonfinite, stats = final.outputs(options.max_new_tokens)
    return GenerateResult(tokens=tokens, lengths=lengths, logits=out_logits, nonfinite=nonfinite, speculation=stats,
                          buffer=None if buffer is None else _buffer_of(config, final.cache))


_speculative = DecodeProgram(_speculative_program, static_argnames=("options",), donate_argnames=("buffer",))


def check_draft(draft, config, use_cache: bool) -> None:
    """A draft must be a `speculative.Draft`-like object with num_tokens >= 1; a draft model must
    be of the target's family and vocabulary (ValueError before any compute)."""
    if not use_cache:
        raise ValueError("speculative decoding (draft=) verifies drafts against the KV cache: use_cache must be True")
    num_tokens = getattr(draft, "num_tokens", None)
    if not all(hasattr(draft, name) for name in ("start", "propose")) or not checks.is_int(num_tokens) \
            or num_tokens < 1:
        raise ValueError(f"draft must be a jaxdec.PromptLookup, a jaxdec.DraftModel or another Draft with an "
                         f"int num_tokens >= 1, start and propose; got {draft!r}")
    if family.of(config).extend is None:
        raise ValueError(f"the {family.of(config).name} family has no extend function: it cannot verify drafts")
    if isinstance(draft, speculative.DraftModel):
        if type(draft.config) is not type(config):
            raise ValueError(f"the draft model's config is a {type(draft.config).__name__}; the target's is a "
                             f"{type(config).__name__}: both must be of one family")
        if draft.config.vocab_size != config.vocab_size:
            raise ValueError(f"the draft model's vocab_size={draft.config.vocab_size} differs from the target's "
                             f"{config.vocab_size}: drafts are token ids of one vocabulary")
        if isinstance(draft.params, DecodeParams):
            check_layout(draft.params, draft.config, None)
        else:
            api.check_params(draft.params, draft.config)


def fill_generate_defaults(prompts, prompt_lengths, max_new_tokens: int, capacity, key, eos_id):
    """`generate`'s defaults, in one place: every prompt token real, a cache of exactly
    P + max_new_tokens slots, a fixed key (a deterministic sampler ignores it; one compiled
    program either way), no eos (-1). Returns (prompt_lengths, capacity, key, eos_id)."""
    B, P = np.shape(prompts)
    if prompt_lengths is None:
        prompt_lengths = np.full((B,), P, np.int32)
    if capacity is None:
        capacity = P + max_new_tokens
    if key is None:
        key = jax.random.key(0)
    return prompt_lengths, capacity, key, -1 if eos_id is None else eos_id


def _check_generate_args(params, config, prompts, prompt_lengths, max_new_tokens, capacity, sampler,
                         key, eos_id, pad_id, spare_slots: int = 0):
    """Host-side validation (ValueError before any compute) of what `generate` and `beam_search`
    share; prompts' rank and dtype and max_new_tokens are checked by `prepare_inputs` (the
    defaults need them), prompt_lengths and capacity already hold their defaults."""
    api.check_config(config)
    if not isinstance(params, DecodeParams):  # DecodeParams: checked when laid out, config by check_layout
        api.check_params(params, config)
    B, P = np.shape(prompts)
    if B == 0 or P == 0:
        raise ValueError(f"prompts must be non-empty, got shape {(B, P)}")
    if checks.is_concrete(prompts):
        checks.check_token_ids("prompts", prompts, config.vocab_size)
    checks.check_lengths("prompt_lengths", prompt_lengths, B, 1, P)
    checks.positive_int("capacity", capacity)
    kv_cache.check_capacity(int(capacity), P + max_new_tokens, spare_slots)
    if checks.is_concrete(prompt_lengths):
        longest = int(np.max(prompt_lengths)) + max_new_tokens
    else:
        longest = P + max_new_tokens
    if longest - 1 > config.max_len:
        raise ValueError(
            f"prompt length + max_new_tokens = {longest} needs positions up to {longest - 2}, "
            f"beyond the model's max_len={config.max_len}"
        )
    checks.check_sampler(sampler, B, config.vocab_size)
    if sampler.stochastic and key is None:
        raise ValueError(f"{type(sampler).__name__} samples at random: pass key=jax.random.key(...)")
    check_special_ids(config, eos_id, pad_id)


def check_special_ids(config, eos_id, pad_id) -> None:
    """eos_id (if given) and pad_id must be token ids: a finished row feeds pad_id back in."""
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is None and name == "eos_id":
            continue
        if not checks.is_int(value) or not 0 <= value < config.vocab_size:
            raise ValueError(f"{name} must be an int in [0, vocab_size={config.vocab_size}), got {value!r}")


def _pad_to(prompts, width: int):
    """Right-pads prompts [B, P] with zeros to [B, width] (on the host when concrete)."""
    P = np.shape(prompts)[1]
    if P == width:
        return jnp.asarray(prompts, jnp.int32)
    if checks.is_concrete(prompts):
        return jnp.asarray(np.pad(np.asarray(prompts, np.int32), ((0, 0), (0, width - P))))
    return jnp.pad(prompts.astype(jnp.int32), ((0, 0), (0, width - P)))


@flax.struct.dataclass
class DecodeInputs:
    """Validated device inputs of a decode program (a pytree): prompts int32 [B, capacity -
    max_new_tokens] (right-padded), lengths int32 [B], source / source_lengths (encoder-decoder,
    else None), key, eos_id int32 [] (-1: none), pad_id int32 []."""

    prompts: jax.Array
    lengths: jax.Array
    source: jax.Array | None
    source_lengths: jax.Array | None
    key: jax.Array
    eos_id: jax.Array
    pad_id: jax.Array


def prepare_inputs(params, config, prompts, prompt_lengths=None, *, source=None, source_lengths=None,
                   max_new_tokens: int, capacity=None, sampler=Greedy(), key=None, eos_id=None,
                   pad_id: int = 0, spare_slots: int = 0) -> tuple[DecodeInputs, int]:
    """Host checks shared by `generate` and `beam_search` (ValueError before any compute), then
    the arrays their compiled programs take, and the resolved capacity. spare_slots: cache slots
    needed beyond prompt + max_new_tokens (speculative decoding's γ)."""
    prompts, prompt_lengths = checks.as_array(prompts), checks.as_array(prompt_lengths)
    source, source_lengths = checks.as_array(source), checks.as_array(source_lengths)
    checks.check_int_array("prompts", prompts, 2)
    checks.positive_int("max_new_tokens", max_new_tokens)
    given_key = key
    prompt_lengths, capacity, key, eos = fill_generate_defaults(prompts, prompt_lengths, max_new_tokens,
                                                                capacity, key, eos_id)
    _check_generate_args(params, config, prompts, prompt_lengths, max_new_tokens, capacity, sampler,
                         given_key, eos_id, pad_id, spare_slots)
    capacity = int(capacity)
    source_lengths = api.check_source(config, source, source_lengths)
    if source is not None:
        if np.shape(source)[0] != np.shape(prompts)[0]:
            raise ValueError(f"source has batch {np.shape(source)[0]}, prompts have {np.shape(prompts)[0]}")
        source = jnp.asarray(source, jnp.int32)
    inputs = DecodeInputs(
        prompts=_pad_to(prompts, capacity - max_new_tokens - spare_slots),
        lengths=jnp.asarray(prompt_lengths, jnp.int32),
        source=source,
        source_lengths=source_lengths,
        key=key,
        eos_id=jnp.asarray(eos, jnp.int32),
        pad_id=jnp.asarray(pad_id, jnp.int32),
    )
    return inputs, capacity


def generate(
    params,
    config: DecoderConfig | Seq2SeqConfig,
    prompts,
    prompt_lengths=None,
    *,
    source=None,
    source_lengths=None,
    max_new_tokens: int,
    sampler: Sampler = Greedy(),
    key: jax.Array | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    use_cache: bool = True,
    capacity: int | None = None,
    return_logits: bool = False,
    mesh=None,
    draft=None,
    buffer: kv_cache.KVBuffer | None = None,
) -> GenerateResult:
    """Generates max_new_tokens tokens after each prompt.

    Args:
      params: the model's params; their tree and shapes must match `config` (checked); or
        `decode_params(params, config)`, laid out once for many calls (cached, no mesh).
      prompts: int32 [B, P], right-padded when prompt_lengths is given.
      prompt_lengths: int32 [B], 1 <= length <= P; None means all P tokens are real.
      source, source_lengths: the encoder input int32 [B, S] and its lengths [B], for a
        Seq2SeqConfig (prompts are then decoder prompts, e.g. just the start token).
      max_new_tokens: tokens to generate per example.
      sampler: Greedy() (default), Temperature, TopK, TopP, or your own: a hashable callable
        (logits float32 [B, V], key) -> int32 [B] with a bool `stochastic` attribute
        (`jaxdec.Sampler` is an optional base class).
      key: PRNG key, required by a stochastic sampler; same key -> same samples.
      eos_id: an example stops after emitting it; later slots hold pad_id.
      use_cache: False runs the uncached baseline (recompute the whole prefix every step).
      capacity: KV-cache slots S >= P + max_new_tokens (default exactly that). Compilation is
        keyed on (B, capacity, max_new_tokens, sampler): fix capacity to decode prompts of any
        width up to capacity - max_new_tokens without recompiling.
      return_logits: also return the float32 [B, max_new_tokens, V] logits of every step.
      mesh: the mesh `params` are placed on (`jaxdec.shard_params` or a sharded TrainState):
        the batch is split over data x fsdp and the KV cache over batch and KV heads for the
        whole loop (`jaxdec.sharding`). None: wherever the arrays are.
      draft: speculative decoding (`jaxdec.speculative`): `PromptLookup(...)`, `DraftModel(...)`
        or your own `Draft`; each round verifies its num_tokens (γ) drafts per row in one
        forward of the model. The tokens have exactly the distribution plain decoding gives
        (greedy: the same tokens, up to float rounding of near-ties). Needs γ spare cache slots:
        capacity >= P + max_new_tokens + γ (the default when capacity is None).
      buffer: storage for the KV cache (`jaxdec.kv_buffer(config, B, capacity, dtype)`, or the
        `.buffer` of an earlier result), so that a large capacity is not allocated again on each
        call. It is donated: its arrays are deleted and the result's `.buffer` holds the storage
        for the next call. Its contents never affect the tokens. capacity defaults to its own.

    Returns:
      GenerateResult(tokens int32 [B, max_new_tokens], lengths int32 [B], logits, nonfinite
      bool [B]: check it, a row sampled from NaN or inf logits holds meaningless tokens;
      speculation: acceptance counts, with a draft; buffer: with buffer=, the storage back).

    Raises:
      ValueError before any compute for params that do not match config, bad shapes, dtypes,
      ids, lengths, sizes, samplers or special ids.
    """
    check_layout(params, config, mesh, use_cache)
    if buffer is not None:
        check_buffer_arg(buffer, config, np.shape(prompts)[0], capacity, use_cache)
        capacity = buffer.k.shape[3] if capacity is None else capacity
    spare = 0
    if draft is not None:
        check_draft(draft, config, use_cache)
        spare = draft.num_tokens
        if capacity is None:
            capacity = np.shape(prompts)[1] + max_new_tokens + spare
    inputs, capacity = prepare_inputs(params, config, prompts, prompt_lengths, source=source,
                                      source_lengths=source_lengths, max_new_tokens=max_new_tokens,
                                      capacity=capacity, sampler=sampler, key=key, eos_id=eos_id, pad_id=pad_id,
                                      spare_slots=spare)
    options = DecodeOptions(config=config, max_new_tokens=max_new_tokens, capacity=capacity, sampler=sampler,
                            use_cache=use_cache, return_logits=return_logits, mesh=mesh)
    if draft is not None:
        return _speculative.for_inputs(params, mesh)(params, inputs, draft, options, buffer)
    return _generate(params, inputs, options, buffer)


def kv_buffer(config: DecoderConfig | Seq2SeqConfig, batch: int, capacity: int, dtype=jnp.float32,
              mesh=None) -> kv_cache.KVBuffer:
    """Storage for the KV cache of `generate(..., buffer=)` calls over `batch` rows with
    `capacity` slots: k and v [L, B, K, S, H] in `dtype` (the params' dtype; the decoder's for an
    encoder-decoder), allocated once here and then handed from each result (`.buffer`) to the
    next call. mesh: placed as a decode program under that mesh holds its cache (batch over
    data x fsdp, KV heads over tensor)."""
    api.check_config(config)
    checks.positive_int("batch", batch)
    checks.positive_int("capacity", capacity)
    shape = (config.num_layers, batch, config.kv_heads, capacity, config.head_dim)
    buffer = kv_cache.KVBuffer(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
    return buffer if mesh is None else sharding.shard_cache(buffer, mesh)


def check_buffer_arg(buffer, config, batch: int, capacity, use_cache: bool) -> None:
    """`generate`'s buffer: the cached path, a live KVBuffer of this call's cache shape (the dtype
    is checked against the params' where the cache is made). ValueError before any compute."""
    if not use_cache:
        raise ValueError("buffer= holds a KV cache: use_cache must be True")
    kv_cache.check_buffer(buffer)
    if any(isinstance(x, jax.Array) and checks.is_concrete(x) and x.is_deleted() for x in (buffer.k, buffer.v)):
        raise ValueError("this buffer was donated to an earlier generate call and its arrays are deleted: "
                         "pass that call's result.buffer instead")
    S = buffer.k.shape[3] if capacity is None else capacity
    shape = (config.num_layers, batch, config.kv_heads, S, config.head_dim)
    kv_cache.check_buffer(buffer, shape)
