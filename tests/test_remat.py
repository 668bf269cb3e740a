"""Rematerialisation (`TrainConfig.remat`): the same loss and gradients under every policy, a
step program that really checkpoints each layer with the named policy, and less memory."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec
from jaxdec import training
from jaxdec.config import REMATS
from jaxdec.tools.bench.memory import step_memory

MODELS = {
    # Llama's block.
    "decoder": jaxdec.DecoderConfig(vocab_size=32, num_layers=2, d_model=32, num_heads=4, max_len=32,
                                    position="rope", norm="rms", mlp="gated", activation="silu",
                                    use_bias=False),
    "seq2seq": jaxdec.Seq2SeqConfig(vocab_size=32, num_encoder_layers=2, num_decoder_layers=2, d_model=32,
                                    num_heads=4, max_len=32),
}
TC = jaxdec.TrainConfig(learning_rate=3e-3, warmup_steps=2, decay_steps=100, dropout=0.1)
POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
            "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _batch(mc) -> dict:
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, mc.vocab_size)
    batch = {"tokens": tokens, "lengths": jnp.asarray([17, 9, 13, 4], jnp.int32)}
    if isinstance(mc, jaxdec.Seq2SeqConfig):
        batch |= {"source": jax.random.randint(jax.random.key(2), (4, 11), 0, mc.vocab_size),
                  "source_lengths": jnp.asarray([11, 3, 7, 11], jnp.int32)}
    return batch


@pytest.mark.slow(reason="compiles the gradient under each of the three policies")
@pytest.mark.parametrize("name", list(MODELS))
def test_every_policy_gives_the_same_loss_and_gradients(name):
    """The loss a train step differentiates and its gradients, with dropout (the recomputed
    layers must draw the same masks), under each policy against "none": float32, 1e-6."""
    mc = MODELS[name]
    state = jaxdec.create_train_state(mc, TC, jax.random.key(0))
    batch, rng = _batch(mc), jax.random.key(3)

    def loss(remat, params):
        tc = dataclasses.replace(TC, remat=remat)
        total, count, _ = training._group_sums(params, mc, tc, batch, rng, None, state.tuning)
        return total / count

    results = jax.jit(lambda p: {r: jax.value_and_grad(functools.partial(loss, r))(p) for r in REMATS})(state.params)
    base_loss, base_grads = results["none"]
    for remat in POLICIES:
        value, grads = results[remat]
        np.testing.assert_allclose(float(value), float(base_loss), rtol=1e-6, err_msg=remat)
        chex.assert_trees_all_close(grads, base_grads, atol=1e-6, rtol=1e-6)


def _checkpoints(jaxpr) -> list:
    """The policy of every checkpoint (remat) equation in a jaxpr, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("checkpoint", "remat2"):
            found.append(eqn.params["policy"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _checkpoints(sub)
    return found


@pytest.mark.parametrize("name", list(MODELS))
def test_the_policy_reaches_the_step_program(name):
    """train_step's program holds one checkpointed layer scan body per layer stack (the
    encoder-decoder has two) with the policy TrainConfig.remat names, and none without remat."""
    mc = MODELS[name]
    stacks = 2 if isinstance(mc, jaxdec.Seq2SeqConfig) else 1
    for remat in REMATS:
        tc = dataclasses.replace(TC, remat=remat)
        state = jax.eval_shape(functools.partial(training._init_state, mc, tc, None, None), jax.random.key(0))
        found = _checkpoints(jax.make_jaxpr(training._train_step)(state, _batch(mc)).jaxpr)
        assert found == ([] if remat == "none" else [POLICIES[remat]] * stacks), (remat, found)


@pytest.mark.slow(reason="compiles three train steps at T = 128")
def test_remat_lowers_the_compiled_steps_memory():
    """XLA's memory analysis of the compiled train step (CPU's tuning, whose unrolled layers
    would otherwise undo the saving): full < dots < none in temporary bytes, and the arguments
    (params, optimizer state, batch) are the same. T = 128 makes the [B, N, T, T] attention
    residuals the largest of "none"'s."""
    mc = jaxdec.DecoderConfig(vocab_size=32, num_layers=2, d_model=32, num_heads=4, max_len=128)
    rows = {r: step_memory(mc, dataclasses.replace(TC, remat=r), batch=4, seq=128) for r in REMATS}
    assert rows["full"]["temp_bytes"] < rows["dots"]["temp_bytes"] < rows["none"]["temp_bytes"], rows
    assert len({row["argument_bytes"] for row in rows.values()}) == 1, rows


def test_remat_names_are_checked():
    with pytest.raises(ValueError, match=r"remat must be one of \('none', 'full', 'dots'\), got 'some'"):
        jaxdec.TrainConfig(remat="some")
