"""Teacher-forcing training with optax: masked cross-entropy, TrainState, train_step, eval_step.

The model reads `tokens[:, :-1]` and is scored on `tokens[:, 1:]`, every position in parallel
under the causal mask. A target counts iff it is a real token (index < the row's length), so
padding has weight zero. A row may pack several documents (`batch["segment_ids"]`): each token
attends only within its own document, positions restart at each, and a target counts only
inside its document, so a packed row trains exactly as its documents would on rows of their own.
The step is one pure function of (state, batch). On a mesh (`create_train_state(..., mesh=)`) the
same step runs sharded: the state carries its mesh (static) and the step pins the batch,
gradients and new state to the shardings `jaxdec.sharding` names, so a step returns the state
with the shardings it was given.
"""

from __future__ import annotations

import functools
import math

from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import checkify
from jax.sharding import Mesh

from jaxdec import checks, family, sampling, sharding, tuning
from jaxdec.api import apply, check_params, check_segment_ids, init_params
from jaxdec.config import OPTIMIZERS, DecoderConfig, TrainConfig
from jaxdec.tuning import Tuning


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: a pytree.

    Attributes:
      params: model parameters, float32.
      opt_state: optax state of `make_optimizer(train_config)`.
      step: int32 [], train steps taken (micro-batches, with gradient accumulation).
      key: PRNG key; dropout at step s uses fold_in(key, s), and row b of the batch
        fold_in(fold_in(key, s), b), so a resumed run draws the same masks, whatever the tuning.
      model_config, train_config: static (part of the tree structure, not leaves).
      mesh: static; the (data, fsdp, tensor) mesh the arrays are placed on, or None (one device).
      tuning: static; the platform's speed choices (`jaxdec.tuning`), resolved when the state is
        created (the mesh's platform, else JAX's default backend).
      optimizer: static; a custom optax GradientTransformation (`create_train_state(...,
        optimizer=)`) in place of train_config.optimizer's, or None.
    """

    params: dict
    opt_state: optax.OptState
    step: jax.Array
    key: jax.Array
    model_config: DecoderConfig = flax.struct.field(pytree_node=False)
    train_config: TrainConfig = flax.struct.field(pytree_node=False)
    mesh: Mesh | None = flax.struct.field(pytree_node=False, default=None)
    tuning: Tuning = flax.struct.field(pytree_node=False, default=tuning.PLAIN)
    optimizer: optax.GradientTransformation | None = flax.struct.field(pytree_node=False, default=None)


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup to the peak, then cosine decay to end_lr_fraction of it."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.learning_rate,
        warmup_steps=tc.warmup_steps,
        decay_steps=tc.decay_steps,
        end_value=tc.learning_rate * tc.end_lr_fraction,
    )


# Parameter names (the last dict key of a leaf's path) of the token and position embeddings.
EMBEDDINGS = ("embed", "pos_embed")


def _keys(path) -> list[str]:
    return [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]


def _is_matrix(path, leaf) -> bool:
    """A weight matrix: rank 2, or rank 3 under "layers" (the [L, I, O] stack of L matrices).
    Stacked norms and biases are [L, D] / [L, O]: vectors, however many dimensions they have."""
    return leaf.ndim - ("layers" in _keys(path)) >= 2


def decay_mask(params, decay_embeddings: bool = False):
    """The leaves weight decay applies to (True): weight matrices, an untied head included;
    embeddings only with decay_embeddings; never norms or biases (`_is_matrix`)."""
    def decays(path, leaf):
        keys = _keys(path)
        if keys and keys[-1] in EMBEDDINGS:
            return decay_embeddings
        return _is_matrix(path, leaf)

    return jax.tree_util.tree_map_with_path(decays, params)


def muon_dimension_numbers(params):
    """Muon's view of each leaf: a layer's stacked matrix [L, I, O] contracts axis 1 and outputs
    axis 2, so the layer axis 0 is a batch axis and each layer's [I, O] matrix is orthogonalised
    on its own; every other leaf (embeddings, head, norms, biases) is None: not Muon's."""
    def numbers(path, leaf):
        if "layers" in _keys(path) and leaf.ndim == 3:
            return optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2)
        return None

    return jax.tree_util.tree_map_with_path(numbers, params)


def _muon_labels(params):
    dims = muon_dimension_numbers(params)
    return jax.tree.map(lambda d: "adam" if d is None else "muon", dims, is_leaf=lambda d: d is None
                        or isinstance(d, optax.contrib.MuonDimensionNumbers))


def update_rule(tc: TrainConfig) -> optax.GradientTransformation:
    """tc.optimizer's update under the schedule, with decoupled weight decay (times the scheduled
    rate) on `decay_mask`'s leaves; no clipping, guard or accumulation (`make_optimizer`)."""
    schedule = learning_rate_schedule(tc)
    mask = functools.partial(decay_mask, decay_embeddings=tc.decay_embeddings)
    adamw = optax.adamw(schedule, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay, mask=mask)
    if tc.optimizer == "adamw":
        return adamw
    if tc.optimizer == "lion":
        return optax.lion(schedule, weight_decay=tc.weight_decay, mask=mask)
    if tc.optimizer == "adafactor":
        # optax's adafactor adds weight_decay_rate * param after its learning-rate scaling: a
        # rate following the schedule gives the decoupled decay the other rules apply.
        decay = None if tc.weight_decay == 0 else (lambda count: tc.weight_decay * schedule(count))
        return optax.adafactor(schedule, weight_decay_rate=decay, weight_decay_mask=mask)
    if tc.optimizer == "muon":
        # Muon on the layers' matrices, AdamW (with the decay mask, which optax.contrib.muon's
        # own Adam fallback does not take) on the rest, as Muon's authors advise. consistent_rms
        # scales Muon's updates to AdamW's RMS (Moonlight's recipe), so one rate serves both.
        muon = optax.contrib.muon(schedule, weight_decay=tc.weight_decay, consistent_rms=0.2,
                                  muon_weight_dimension_numbers=muon_dimension_numbers)
        return optax.partition({"muon": muon, "adam": adamw}, _muon_labels)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {tc.optimizer!r}")


def make_optimizer(tc: TrainConfig, optimizer: optax.GradientTransformation | None = None
                   ) -> optax.GradientTransformation:
    """Global-norm clipping and tc.optimizer's rule (`update_rule`), or a custom `optimizer`,
    under a non-finite guard and gradient accumulation.

    The guard (optax.apply_if_finite) sees the averaged gradient of each update: one non-finite
    micro-batch skips that whole update and leaves params and moments unchanged.

    optimizer: any optax GradientTransformation, used as it is in place of clipping and the named
      rule (its own schedule, clipping and decay are its business); the guard and accumulation
      still wrap it.
    """
    if optimizer is None:
        parts = [] if tc.clip_norm is None else [optax.clip_by_global_norm(tc.clip_norm)]
        optimizer = optax.chain(*parts, update_rule(tc))
    tx = optax.apply_if_finite(optimizer, tc.max_consecutive_nonfinite)
    if tc.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=tc.grad_accum_steps)
    return tx


def check_optimizer(optimizer) -> None:
    """A custom optimizer must be an optax GradientTransformation (init and update callables)
    and hashable: it is a static part of the TrainState, in the compiled step's key."""
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise ValueError(f"optimizer must be an optax.GradientTransformation (e.g. optax.sgd(1e-2)), "
                         f"got {optimizer!r}")
    try:
        hash(optimizer)
    except TypeError:
        raise ValueError(f"optimizer must be hashable (an optax.GradientTransformation is), got "
                         f"{optimizer!r}") from None


def _optax_promotion(fn, *args):
    """Calls an optax function under standard dtype promotion: optax mixes Python floats with
    its int32 step count (b1 ** count), which jax_numpy_dtype_promotion="strict" refuses, and a
    user's strict mode should not make training impossible. Our own code stays strict-clean."""
    with jax.numpy_dtype_promotion("standard"):
        return fn(*args)


def create_train_state(model_config: DecoderConfig, train_config: TrainConfig, key: jax.Array,
                       mesh: Mesh | None = None, params: dict | None = None,
                       optimizer: optax.GradientTransformation | None = None) -> TrainState:
    """Initial params (from `key`), optimizer state, step 0 and the dropout key.

    With a `mesh`, params and optimizer state are created already split by `jaxdec.sharding`'s
    rules (one jit whose out_shardings are those shardings: no device ever holds the whole
    model), and step and key are replicated. The values equal the unsharded ones. The rules
    cover AdamW's and Lion's state; Adafactor's factored moments and Muon's coefficients have
    none yet (ValueError naming the optimizer).

    params: start from these parameters (e.g. converted pretrained weights) instead of a random
      init; they must be exactly the tree, shapes and floating dtypes `model_config` describes
      (`jaxdec.api.check_params`, ValueError naming the first mismatched leaf). Not with a mesh.
    optimizer: a custom optax GradientTransformation (`make_optimizer`) in place of
      train_config.optimizer's rule; the state keeps it (static), so steps use it. To resume,
      restore a checkpoint into a template created with the same optimizer.
    """
    if optimizer is not None:
        check_optimizer(optimizer)
    if params is not None:
        check_params(params, model_config)
        if mesh is not None:
            raise ValueError("create_train_state(params=...) starts one device; place the state "
                             "on a mesh by restoring a checkpoint onto a mesh template")
        return _init_state(model_config, train_config, None, optimizer, key, params)
    if mesh is None:
        return _init_state(model_config, train_config, None, optimizer, key)
    try:
        init = _sharded_init(model_config, train_config, mesh, optimizer)
    except ValueError as err:  # a state leaf `jaxdec.sharding` has no logical axes for
        which = "the custom optimizer" if optimizer is not None else f"optimizer={train_config.optimizer!r}"
        raise ValueError(f"{which} keeps state that jaxdec.sharding has no rules for, so it cannot be "
                         f"placed on a mesh yet ({err}); 'adamw' and 'lion' can") from err
    return init(key)


def _init_state(model_config, train_config, mesh, optimizer, key, params=None) -> TrainState:
    init_key, dropout_key = jax.random.split(key)
    if params is None:
        params = init_params(model_config, init_key)
    else:
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return TrainState(
        params=params,
        opt_state=_optax_promotion(make_optimizer(train_config, optimizer).init, params),
        step=jnp.zeros((), jnp.int32),
        key=dropout_key,
        model_config=model_config,
        train_config=train_config,
        mesh=mesh,
        tuning=tuning.for_platform(None if mesh is None else mesh.devices.flat[0].platform),
        optimizer=optimizer,
    )


@functools.lru_cache(maxsize=16)
def _sharded_init(model_config, train_config, mesh, optimizer=None):
    """The jitted initialiser for one (configs, mesh, optimizer): compiled once, however often called."""
    init = functools.partial(_init_state, model_config, train_config, mesh, optimizer)
    shardings = sharding.tree_shardings(jax.eval_shape(init, jax.random.key(0)), mesh)
    return jax.jit(init, in_shardings=sharding.replicated(mesh), out_shardings=shardings)


_BATCH_KEYS = ("tokens", "lengths", "segment_ids", "source", "source_lengths")


def check_batch(batch, model_config, *, check_values: bool | None = None) -> None:
    """Host checks of a training batch, before anything is compiled or run; ValueError naming
    the bad key, its shape or dtype and what was expected.

    Shapes and dtypes are static, so they are checked even under an outer jit: keys (only
    tokens, lengths, segment_ids, source, source_lengths; tokens required, source required by and
    only accepted for a Seq2SeqConfig), ranks, integer dtypes, one batch size, 2 <= T + 1 and
    T <= max_len (learned positions past max_len would be silently clipped), S <= max_len.
    segment_ids (packed documents) must have the tokens' shape [B, T+1], only for a decoder-only
    model, and never with lengths: segment id 0 marks padding, so lengths would be a second,
    possibly contradicting, account of it.

    check_values: also check token ids in [0, vocab_size), lengths in range and segment ids
      non-negative. None (default):
      only for host (numpy) arrays, where it costs no device round trip; device arrays are not
      read back (that would stall the step pipeline): use `train_step_checked` for those.
    """
    expected = ('expected {"tokens": int32 [B, T+1], "lengths": optional int32 [B]'
                + (', "source": int32 [B, S], "source_lengths": optional int32 [B]}'
                   if family.of(model_config).takes_source
                   else ' or "segment_ids": optional int32 [B, T+1]}'))
    if not isinstance(batch, Mapping):
        raise ValueError(f"a batch must be a dict, got {type(batch).__name__}; {expected}")
    unknown = [k for k in batch if k not in _BATCH_KEYS]
    if unknown:
        raise ValueError(f"batch has unknown key(s) {unknown}; {expected}")
    if "tokens" not in batch:
        raise ValueError(f"batch has no \"tokens\" (keys: {sorted(batch)}); {expected}")
    seq2seq = family.of(model_config).takes_source
    if seq2seq and "source" not in batch:
        raise ValueError(f"an encoder-decoder batch needs \"source\"; {expected}")
    if not seq2seq and ("source" in batch or "source_lengths" in batch):
        raise ValueError(f"source / source_lengths are for an encoder-decoder model, got a "
                         f"{type(model_config).__name__}; {expected}")
    tokens = batch["tokens"]
    checks.check_int_array("batch['tokens']", tokens, 2)
    B, T1 = np.shape(tokens)
    if B == 0 or T1 < 2:
        raise ValueError(f"batch['tokens'] must be [B, T+1] with B >= 1 and T+1 >= 2 (inputs "
                         f"tokens[:, :-1], targets tokens[:, 1:]), got shape {(B, T1)}")
    if T1 - 1 > model_config.max_len:
        raise ValueError(f"batch['tokens'] has shape {(B, T1)}: {T1 - 1} input positions, beyond "
                         f"the model's max_len={model_config.max_len} (T+1 <= {model_config.max_len + 1})")
    present = [k for k in _BATCH_KEYS if k in batch]
    values = check_values if check_values is not None else all(
        isinstance(batch[k], (np.ndarray, np.generic)) for k in present)
    if "lengths" in batch:
        _check_lengths("batch['lengths']", batch["lengths"], B, 0, T1, values)
    if "segment_ids" in batch:
        check_segment_ids("batch['segment_ids']", batch["segment_ids"], (B, T1), model_config,
                          batch.get("lengths"), values)
    if seq2seq:
        source = batch["source"]
        checks.check_int_array("batch['source']", source, 2)
        if np.shape(source)[0] != B or np.shape(source)[1] == 0:
            raise ValueError(f"batch['source'] must be int32 [B={B}, S] with S >= 1, got shape "
                             f"{np.shape(source)}")
        S = np.shape(source)[1]
        if S > model_config.max_len:
            raise ValueError(f"batch['source'] has length {S}, beyond the model's max_len={model_config.max_len}")
        if "source_lengths" in batch:
            _check_lengths("batch['source_lengths']", batch["source_lengths"], B, 1, S, values)
        if values:
            checks.check_token_ids("batch['source']", source, model_config.vocab_size)
    if values:
        checks.check_token_ids("batch['tokens']", tokens, model_config.vocab_size)


def _check_lengths(name: str, lengths, batch: int, low: int, high: int, values: bool) -> None:
    """int [B] lengths; with values, also low <= lengths[b] <= high."""
    checks.check_int_array(name, lengths, 1)
    if np.shape(lengths)[0] != batch:
        raise ValueError(f"{name} must have shape [{batch}] (one per row), got {np.shape(lengths)}")
    if values:
        checks.check_lengths(name, lengths, batch, low, high)


def target_weights(batch: dict) -> jax.Array:
    """float32 [B, T]: 1 for real targets tokens[:, 1:], 0 for padding. With segment_ids, the
    target at t + 1 counts iff segment_ids[t + 1] == segment_ids[t] != 0: inside one document,
    never across a boundary or in padding."""
    tokens = batch["tokens"]
    B, T1 = tokens.shape
    if "segment_ids" in batch:
        seg = batch["segment_ids"]
        return ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)).astype(jnp.float32)
    lengths = batch.get("lengths")
    if lengths is None:
        return jnp.ones((B, T1 - 1), jnp.float32)
    return (jnp.arange(1, T1, dtype=jnp.int32)[None, :] < lengths[:, None]).astype(jnp.float32)


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy per position in nats: logits float32 [B,T,V], targets int [B,T] -> [B,T]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def _compute_dtype(tc: TrainConfig):
    return jnp.bfloat16 if tc.dtype == "bfloat16" else jnp.float32


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _logits(params, mc, tc: TrainConfig, batch: dict, dropout_rng, tuned: Tuning = tuning.PLAIN,
            remat: str = "none"):
    """Teacher forcing: logits [B, T, V] of tokens[:, :-1] (and the source, for seq2seq).
    dropout_rng: per-row keys [B] (or None: no dropout). remat: what each layer keeps for the
    backward pass (the training step's tc.remat; nothing to keep without one)."""
    tokens = batch["tokens"]
    T = tokens.shape[1] - 1
    lengths = batch.get("lengths")
    lengths = jnp.full(tokens.shape[:1], T, jnp.int32) if lengths is None else jnp.minimum(lengths, T)
    segment_ids = batch.get("segment_ids")
    return apply(
        _cast(params, _compute_dtype(tc)), mc, tokens[:, :-1], lengths,
        source=batch.get("source"), source_lengths=batch.get("source_lengths"),
        dropout_rate=tc.dropout if dropout_rng is not None else 0.0, rng=dropout_rng, tuning=tuned,
        segment_ids=None if segment_ids is None else segment_ids[:, :-1], remat=remat,
    )


def _sums(logits, batch, tuned: Tuning = tuning.PLAIN):
    """Summed loss, real-target count and correct predictions over the batch."""
    targets = batch["tokens"][:, 1:]
    weights = target_weights(batch)
    loss_sum = jnp.sum(token_losses(logits, targets) * weights)
    predicted = sampling.argmax(logits, tuned.argmax).astype(targets.dtype)  # int64 under x64
    correct = jnp.sum((predicted == targets).astype(jnp.float32) * weights)
    return loss_sum, jnp.sum(weights), correct


def row_groups(tokens_shape: tuple[int, int], mesh, tuned: Tuning = tuning.PLAIN) -> int:
    """Independent row groups the train step splits a [B, T+1] batch into: tuned.row_groups on
    one device when B divides evenly and each group holds at least tuned.row_group_min_tokens
    tokens; else 1."""
    B, T1 = tokens_shape
    G = tuned.row_groups
    if mesh is not None or G == 1 or B % G or B // G * (T1 - 1) < tuned.row_group_min_tokens:
        return 1
    return G


def row_keys(dropout_rng: jax.Array | None, batch_size: int) -> jax.Array | None:
    """Per-row dropout keys [B]: row b's is fold_in(dropout_rng, b), so its masks do not depend
    on how the step groups its rows."""
    if dropout_rng is None:
        return None
    return jax.vmap(lambda b: jax.random.fold_in(dropout_rng, b))(jnp.arange(batch_size, dtype=jnp.int32))


def _group_sums(params, mc, tc: TrainConfig, batch: dict, dropout_rng, mesh, tuned: Tuning = tuning.PLAIN):
    """`_sums` of the batch, computed as the sum over `row_groups` independent slices of rows.

    The sums are the same up to float rounding; the groups share no data, so XLA's CPU runtime
    runs one group's single-threaded elementwise kernels beside the other's matmuls. Dropout
    draws per row (`row_keys`), so the masks are those of one group.
    """
    B = batch["tokens"].shape[0]
    G = row_groups(batch["tokens"].shape, mesh, tuned)
    keys = row_keys(dropout_rng, B)
    if G == 1:
        return _sums(_logits(params, mc, tc, batch, keys, tuned, tc.remat), batch, tuned)
    totals = []
    for g in range(G):
        rows = {k: v[g * B // G:(g + 1) * B // G] for k, v in batch.items()}
        group_keys = None if keys is None else keys[g * B // G:(g + 1) * B // G]
        totals.append(_sums(_logits(params, mc, tc, rows, group_keys, tuned, tc.remat), rows, tuned))
    return tuple(sum(parts[1:], parts[0]) for parts in zip(*totals))


def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One optimizer step (or micro-step, with accumulation) of teacher forcing; jit-compiled.

    Args:
      state: TrainState (donated: its buffers are reused for the new state).
      batch: {"tokens": int32 [B, T+1], "lengths": optional int32 [B] real tokens per row, or
        "segment_ids": optional int32 [B, T+1] for rows packing several documents (1, 2, ...
        per document, 0 for padding; decoder-only); for seq2seq also "source" int32 [B, S] and
        "source_lengths" int32 [B]}. On a mesh, place it with `jaxdec.shard_batch` (rows over
        data x fsdp).

    Returns:
      the new state and metrics: loss (mean nats per real target), tokens (real targets),
      accuracy, grad_norm (before clipping), learning_rate, skipped (1.0 if the update was
      dropped as non-finite). On a mesh the new state has exactly the shardings the rules give
      (jit out_shardings), so the next step reuses the same compiled program and the donated
      buffers; metrics are replicated.

    Raises:
      ValueError (before any compute; `check_batch`) for a missing or unknown key, a wrong rank,
      dtype or batch size, T > max_len, or segment_ids with lengths; for a host (numpy) batch
      also token ids outside [0, vocab_size), lengths out of range and negative segment ids.
      Device arrays' values are not read back: an out-of-range id there gives a non-finite loss
      and a skipped update (metrics["skipped"]); `train_step_checked` checks them on the device.
    """
    check_batch(batch, state.model_config)
    if state.mesh is None:
        return _train_step_jit(state, batch)
    # One jitted step per (mesh, configs): those fix the state's structure and its shardings.
    cache_key = (state.mesh, state.model_config, state.train_config, state.optimizer)
    if cache_key not in _sharded_train_steps:
        out_shardings = (sharding.tree_shardings(state, state.mesh), sharding.replicated(state.mesh))
        _sharded_train_steps[cache_key] = jax.jit(_train_step, donate_argnums=0,
                                                  out_shardings=out_shardings)
    return _sharded_train_steps[cache_key](state, batch)


def _train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    mc, tc = state.model_config, state.train_config
    dropout_rng = jax.random.fold_in(state.key, state.step) if tc.dropout > 0 else None
    batch = sharding.constrain(batch, state.mesh, sharding.batch_axes)

    def loss_fn(params):
        loss_sum, count, correct = _group_sums(params, mc, tc, batch, dropout_rng, state.mesh, state.tuning)
        return loss_sum / jnp.maximum(count, 1.0), (count, correct)

    (loss, (count, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # Gradients take the params' shardings: under fsdp XLA reduce-scatters them instead of
    # all-reducing whole gradients onto every device.
    grads = sharding.constrain(grads, state.mesh)
    tx = make_optimizer(tc, state.optimizer)
    updates, opt_state = _optax_promotion(tx.update, grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)
    metrics = {
        "loss": loss,
        "tokens": count,
        "accuracy": correct / jnp.maximum(count, 1.0),
        "grad_norm": grad_norm,
        "learning_rate": _optax_promotion(learning_rate_schedule(tc), state.step // tc.grad_accum_steps),
        "skipped": (~jnp.isfinite(grad_norm)).astype(jnp.float32),
    }
    new_state = state.replace(
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        step=state.step + 1,
    )
    return new_state, metrics


_train_step_jit = jax.jit(_train_step, donate_argnums=0)
_sharded_train_steps: dict = {}


def _checked_train_step(state: TrainState, batch: dict):
    mc = state.model_config
    checks.device_checks(batch["tokens"], batch.get("lengths"), mc.vocab_size)
    if "source" in batch:
        checks.device_checks(batch["source"], batch.get("source_lengths"), mc.vocab_size)
    if "segment_ids" in batch:
        checkify.check(jnp.all(batch["segment_ids"] >= 0), "segment_ids must be >= 0 (0 marks padding)")
    return _train_step(state, batch)


_train_step_checked_jit = jax.jit(checkify.checkify(_checked_train_step, errors=checkify.user_checks))


def train_step_checked(state: TrainState, batch: dict):
    """`train_step` with the batch's value checks compiled in (checkify), for your own loops over
    device arrays: token ids in [0, vocab_size), lengths in range and segment ids >= 0, checked
    on the device.

    Returns (error, new_state, metrics). `error.throw()` raises (a checkify JaxRuntimeError naming
    the check) if a check failed; `error.get()` is None otherwise. The state is not donated: on
    an error, keep the state you passed in (the returned one has taken a step on bad data).
    """
    check_batch(batch, state.model_config)
    error, (new_state, metrics) = _train_step_checked_jit(state, batch)
    return error, new_state, metrics


def eval_step(state: TrainState, batch: dict) -> dict:
    """Held-out metrics without dropout: loss (nats/token), bits_per_token, accuracy, and the
    sums (loss_sum, tokens, correct) for averaging over batches of different sizes. The batch is
    checked as in `train_step` (ValueError before any compute)."""
    check_batch(batch, state.model_config)
    return _eval_step_jit(state, batch)


@jax.jit
def _eval_step_jit(state: TrainState, batch: dict) -> dict:
    batch = sharding.constrain(batch, state.mesh, sharding.batch_axes)
    logits = _logits(state.params, state.model_config, state.train_config, batch, None, state.tuning)
    loss_sum, count, correct = _sums(logits, batch, state.tuning)
    loss = loss_sum / jnp.maximum(count, 1.0)
    return {
        "loss": loss,
        "bits_per_token": loss / math.log(2.0),
        "accuracy": correct / jnp.maximum(count, 1.0),
        "loss_sum": loss_sum,
        "tokens": count,
        "correct": correct,
    }
