"""Teacher-forcing training with optax: masked cross-entropy, TrainState, train_step, eval_step.

The model reads `tokens[:, :-1]` and is scored on `tokens[:, 1:]`, every position in parallel
under the causal mask. A target counts iff it is a real token (index < the row's length), so
padding has weight zero. The step is one pure function of (state, batch). On a mesh
(`create_train_state(..., mesh=)`) the same step runs sharded: the state carries its mesh (static)
and the step pins the batch, gradients and new state to the shardings `jaxdec.sharding` names, so
a step returns the state with the shardings it was given.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jax.sharding import Mesh

from jaxdec import sharding
from jaxdec.api import apply, init_params
from jaxdec.config import DecoderConfig, TrainConfig


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: a pytree.

    Attributes:
      params: model parameters, float32.
      opt_state: optax state of `make_optimizer(train_config)`.
      step: int32 [], train steps taken (micro-batches, with gradient accumulation).
      key: PRNG key; dropout at step s uses fold_in(key, s), so a resumed run draws the same masks.
      model_config, train_config: static (part of the tree structure, not leaves).
      mesh: static; the (data, fsdp, tensor) mesh the arrays are placed on, or None (one device).
    """

    params: dict
    opt_state: optax.OptState
    step: jax.Array
    key: jax.Array
    model_config: DecoderConfig = flax.struct.field(pytree_node=False)
    train_config: TrainConfig = flax.struct.field(pytree_node=False)
    mesh: Mesh | None = flax.struct.field(pytree_node=False, default=None)


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup to the peak, then cosine decay to end_lr_fraction of it."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.learning_rate,
        warmup_steps=tc.warmup_steps,
        decay_steps=tc.decay_steps,
        end_value=tc.learning_rate * tc.end_lr_fraction,
    )


def _decay_mask(params):
    """Weight decay on matrices only: norms, biases (rank < 2) are not decayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW with warmup + cosine, global-norm clipping, a non-finite guard and accumulation.

    The guard (optax.apply_if_finite) sees the averaged gradient of each update: one non-finite
    micro-batch skips that whole update and leaves params and moments unchanged.
    """
    parts = [] if tc.clip_norm is None else [optax.clip_by_global_norm(tc.clip_norm)]
    parts.append(optax.adamw(learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps,
                             weight_decay=tc.weight_decay, mask=_decay_mask))
    tx = optax.apply_if_finite(optax.chain(*parts), tc.max_consecutive_nonfinite)
    if tc.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=tc.grad_accum_steps)
    return tx


def create_train_state(model_config: DecoderConfig, train_config: TrainConfig, key: jax.Array,
                       mesh: Mesh | None = None) -> TrainState:
    """Initial params (from `key`), optimizer state, step 0 and the dropout key.

    With a `mesh`, params and optimizer state are created already split by `jaxdec.sharding`'s
    rules (one jit whose out_shardings are those shardings: no device ever holds the whole
    model), and step and key are replicated. The values equal the unsharded ones.
    """
    if mesh is None:
        return _init_state(model_config, train_config, None, key)
    return _sharded_init(model_config, train_config, mesh)(key)


def _init_state(model_config, train_config, mesh, key) -> TrainState:
    init_key, dropout_key = jax.random.split(key)
    params = init_params(model_config, init_key)
    return TrainState(
        params=params,
        opt_state=make_optimizer(train_config).init(params),
        step=jnp.zeros((), jnp.int32),
        key=dropout_key,
        model_config=model_config,
        train_config=train_config,
        mesh=mesh,
    )


@functools.lru_cache(maxsize=16)
def _sharded_init(model_config, train_config, mesh):
    """The jitted initialiser for one (configs, mesh): compiled once, however often called."""
    init = functools.partial(_init_state, model_config, train_config, mesh)
    shardings = sharding.tree_shardings(jax.eval_shape(init, jax.random.key(0)), mesh)
    return jax.jit(init, in_shardings=sharding.replicated(mesh), out_shardings=shardings)


def target_weights(batch: dict) -> jax.Array:
    """float32 [B, T]: 1 for real targets tokens[:, 1:], 0 for padding."""
    tokens = batch["tokens"]
    B, T1 = tokens.shape
    lengths = batch.get("lengths")
    if lengths is None:
        return jnp.ones((B, T1 - 1), jnp.float32)
    return (jnp.arange(1, T1)[None, :] < lengths[:, None]).astype(jnp.float32)


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy per position in nats: logits float32 [B,T,V], targets int [B,T] -> [B,T]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def _compute_dtype(tc: TrainConfig):
    return jnp.bfloat16 if tc.dtype == "bfloat16" else jnp.float32


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _logits(params, mc, tc: TrainConfig, batch: dict, dropout_rng):
    """Teacher forcing: logits [B, T, V] of tokens[:, :-1] (and the source, for seq2seq)."""
    tokens = batch["tokens"]
    T = tokens.shape[1] - 1
    lengths = batch.get("lengths")
    lengths = jnp.full(tokens.shape[:1], T, jnp.int32) if lengths is None else jnp.minimum(lengths, T)
    return apply(
        _cast(params, _compute_dtype(tc)), mc, tokens[:, :-1], lengths,
        source=batch.get("source"), source_lengths=batch.get("source_lengths"),
        dropout_rate=tc.dropout if dropout_rng is not None else 0.0, rng=dropout_rng,
    )


def _sums(logits, batch):
    """Summed loss, real-target count and correct predictions over the batch."""
    targets = batch["tokens"][:, 1:]
    weights = target_weights(batch)
    loss_sum = jnp.sum(token_losses(logits, targets) * weights)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)
    return loss_sum, jnp.sum(weights), correct


def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One optimizer step (or micro-step, with accumulation) of teacher forcing; jit-compiled.

    Args:
      state: TrainState (donated: its buffers are reused for the new state).
      batch: {"tokens": int32 [B, T+1], "lengths": optional int32 [B] real tokens per row;
        for seq2seq also "source" int32 [B, S] and "source_lengths" int32 [B]}. On a mesh,
        place it with `jaxdec.shard_batch` (rows over data x fsdp).

    Returns:
      the new state and metrics: loss (mean nats per real target), tokens (real targets),
      accuracy, grad_norm (before clipping), learning_rate, skipped (1.0 if the update was
      dropped as non-finite). On a mesh the new state has exactly the shardings the rules give
      (jit out_shardings), so the next step reuses the same compiled program and the donated
      buffers; metrics are replicated.
    """
    if state.mesh is None:
        return _train_step_jit(state, batch)
    # One jitted step per (mesh, configs): those fix the state's structure and its shardings.
    cache_key = (state.mesh, state.model_config, state.train_config)
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
        loss_sum, count, correct = _sums(_logits(params, mc, tc, batch, dropout_rng), batch)
        return loss_sum / jnp.maximum(count, 1.0), (count, correct)

    (loss, (count, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # Gradients take the params' shardings: under fsdp XLA reduce-scatters them instead of
    # all-reducing whole gradients onto every device.
    grads = sharding.constrain(grads, state.mesh)
    tx = make_optimizer(tc)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)
    metrics = {
        "loss": loss,
        "tokens": count,
        "accuracy": correct / jnp.maximum(count, 1.0),
        "grad_norm": grad_norm,
        "learning_rate": learning_rate_schedule(tc)(state.step // tc.grad_accum_steps),
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


@jax.jit
def eval_step(state: TrainState, batch: dict) -> dict:
    """Held-out metrics without dropout: loss (nats/token), bits_per_token, accuracy, and the
    sums (loss_sum, tokens, correct) for averaging over batches of different sizes."""
    batch = sharding.constrain(batch, state.mesh, sharding.batch_axes)
    logits = _logits(state.params, state.model_config, state.train_config, batch, None)
    loss_sum, count, correct = _sums(logits, batch)
    loss = loss_sum / jnp.maximum(count, 1.0)
    return {
        "loss": loss,
        "bits_per_token": loss / math.log(2.0),
        "accuracy": correct / jnp.maximum(count, 1.0),
        "loss_sum": loss_sum,
        "tokens": count,
        "correct": correct,
    }
