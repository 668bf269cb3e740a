"""Optimizers (`TrainConfig.optimizer`, `create_train_state(optimizer=)`) and the weight-decay mask.

The independent computation for each named optimizer is optax's own transform, built here by
hand from parameter names written out below (not from `training`'s structural rules), on the
same gradients.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdec
from jaxdec import api, checkpoint, training
from jaxdec.config import OPTIMIZERS

# GPT-2's block with an untied head: every kind of leaf (embeddings, stacked matrices, stacked
# norms and biases [L, D], final norm, head).
MC = jaxdec.DecoderConfig(vocab_size=32, num_layers=2, d_model=32, num_heads=4, max_len=32, tie_embeddings=False)
TC = jaxdec.TrainConfig(learning_rate=3e-3, warmup_steps=1, decay_steps=100, weight_decay=0.1, clip_norm=0.5)
_SLOW = pytest.mark.slow(reason="one more optimizer's compilation each")


def _default_run(*names):
    """OPTIMIZERS as parameters, the ones not named marked slow."""
    return [n if n in names else pytest.param(n, marks=_SLOW) for n in OPTIMIZERS]

MATRICES = {"qkv", "out", "w_in", "w_out", "w_gate", "head"}  # the weight matrices, by name
EMBEDDINGS = {"embed", "pos_embed"}


def _name(path) -> str:
    return path[-1].key


def _by_hand_mask(params, decay_embeddings=False):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _name(path) in MATRICES or (decay_embeddings and _name(path) in EMBEDDINGS), params)


def _by_hand(tc: jaxdec.TrainConfig, params) -> optax.GradientTransformation:
    """Clipping and tc.optimizer's optax transform, built from the names above."""
    schedule = training.learning_rate_schedule(tc)
    mask = _by_hand_mask(params, tc.decay_embeddings)
    adamw = optax.adamw(schedule, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay, mask=mask)
    rule = {
        "adamw": lambda: adamw,
        "lion": lambda: optax.lion(schedule, weight_decay=tc.weight_decay, mask=mask),
        "adafactor": lambda: optax.adafactor(schedule, weight_decay_rate=lambda c: tc.weight_decay * schedule(c),
                                             weight_decay_mask=mask),
    }
    if tc.optimizer == "muon":
        in_layers = lambda path: "layers" in [getattr(p, "key", None) for p in path]  # noqa: E731
        labels = jax.tree_util.tree_map_with_path(
            lambda path, _: "muon" if in_layers(path) and _name(path) in MATRICES else "adam", params)
        dims = jax.tree.map(lambda label: optax.contrib.MuonDimensionNumbers(1, 2) if label == "muon" else None,
                            labels)
        muon = optax.contrib.muon(schedule, weight_decay=tc.weight_decay, consistent_rms=0.2,
                                  muon_weight_dimension_numbers=lambda _: dims)
        return optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                           optax.partition({"muon": muon, "adam": adamw}, labels))
    return optax.chain(optax.clip_by_global_norm(tc.clip_norm), rule[tc.optimizer]())


_init = jax.jit(jaxdec.init_params, static_argnums=0)


@jax.jit
def _grads(params, key):
    """Random gradients like params, normal with std 0.1."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _updates(txs, params, grads_list):
    """For each transform in txs, the updates of its successive steps from params (one per
    gradient in grads_list), all in one jitted program."""
    def run(params, grads_list):
        results = []
        for tx in txs:
            p = params
            with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 count with floats
                state = tx.init(p)
                out = []
                for grads in grads_list:
                    updates, state = tx.update(grads, state, p)
                    out.append(updates)
                    p = optax.apply_updates(p, updates)
            results.append(out)
        return results

    return jax.jit(run)(params, grads_list)


@pytest.mark.parametrize("name", _default_run("adamw"))
def test_each_optimizer_equals_optax_built_by_hand(name):
    """Three updates of make_optimizer(tc) equal optax's transform built by hand on the same
    gradients (clipping engaged: their norm is ~4 > clip_norm 0.5; the first update in warmup at
    rate 0, the next two past it; decay on). The same ops, though XLA may fuse the two programs differently: 1e-6
    relative, and 1e-8 absolute on updates of ~1e-3 (Muon's Newton-Schulz iterations amplify
    the rounding of small entries to ~2e-9)."""
    tc = dataclasses.replace(TC, optimizer=name)
    params = _init(MC, jax.random.key(0))
    grads = [_grads(params, jax.random.key(i)) for i in range(3)]
    assert float(optax.tree.norm(grads[0])) > 4 * tc.clip_norm
    ours, theirs = _updates([training.make_optimizer(tc), _by_hand(tc, params)], params, grads)
    for a, b in zip(ours, theirs):
        chex.assert_trees_all_close(a, b, atol=1e-8, rtol=1e-6)
    assert float(optax.tree.norm(ours[-1])) > 0


def test_muon_orthogonalises_each_layer_on_its_own():
    """Muon's update of a stacked [L, D, F] weight, layer by layer, equals optax's Muon applied
    to that layer's [D, F] matrix alone (its plain 2-D rule), and its singular values are those
    of an orthogonalised matrix scaled to AdamW's RMS (Newton-Schulz leaves them in ~[0.7, 1.2]):
    so the layer axis is a batch axis, never part of the matrix. 1e-5 relative."""
    tc = dataclasses.replace(TC, optimizer="muon", clip_norm=None, weight_decay=0.0, warmup_steps=0)
    params = _init(MC, jax.random.key(0))
    grads = _grads(params, jax.random.key(1))
    update = _updates([training.make_optimizer(tc)], params, [grads])[0][0]["layers"]["mlp"]["w_in"]  # [L, D, F]
    D, F = MC.d_model, MC.ff_dim
    alone = optax.contrib.muon(training.learning_rate_schedule(tc), consistent_rms=0.2)
    layer_params = {str(i): params["layers"]["mlp"]["w_in"][i] for i in range(MC.num_layers)}
    layer_grads = {str(i): grads["layers"]["mlp"]["w_in"][i] for i in range(MC.num_layers)}
    expected = _updates([alone], layer_params, [layer_grads])[0][0]
    for layer in range(MC.num_layers):
        np.testing.assert_allclose(update[layer], expected[str(layer)], rtol=1e-5, atol=1e-8)
        singular = np.linalg.svd(np.asarray(update[layer]) / (tc.learning_rate * 0.2 * np.sqrt(max(D, F))),
                                 compute_uv=False)
        assert 0.5 < singular.min() and singular.max() < 1.3, singular


@pytest.mark.parametrize("name", _default_run("adamw", "muon"))
def test_decay_reaches_only_the_weight_matrices(name):
    """With zero gradients every rule's own step is zero, so a leaf changes iff it is decayed:
    exactly the weight matrices (stacked [L, I, O] ones and the untied head), plus the
    embeddings with decay_embeddings; never norms or biases (stacked [L, D] leaves included,
    which the old ndim >= 2 mask decayed)."""
    params = jax.tree.map(lambda x: x + 0.5, _init(MC, jax.random.key(0)))  # no leaf at zero
    zeros = jax.tree.map(jnp.zeros_like, params)
    flags = (False, True)
    tcs = [dataclasses.replace(TC, optimizer=name, warmup_steps=0, decay_embeddings=f) for f in flags]
    results = _updates([training.make_optimizer(tc) for tc in tcs], params, [zeros])
    for decay_embeddings, (updates,) in zip(flags, results):
        new = optax.apply_updates(params, updates)
        changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new)
        assert changed == _by_hand_mask(params, decay_embeddings), decay_embeddings
        assert training.decay_mask(params, decay_embeddings) == _by_hand_mask(params, decay_embeddings)


@pytest.mark.slow(reason="one train-step compilation per optimizer")
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_lowers_the_loss(name):
    """30 train steps on one batch of the tiny model at a rate suited to the rule lower the loss
    by more than a third (the loss starts at ln 32 = 3.47)."""
    rates = {"adamw": 3e-3, "lion": 3e-3, "adafactor": 3e-2, "muon": 3e-3}
    tc = dataclasses.replace(TC, optimizer=name, learning_rate=rates[name], clip_norm=1.0)
    state = jaxdec.create_train_state(MC, tc, jax.random.key(0))
    batch = {"tokens": jax.random.randint(jax.random.key(1), (4, 17), 0, MC.vocab_size)}
    losses = []
    for _ in range(30):
        state, metrics = jaxdec.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] * 2 / 3, losses


def test_optimizer_names_are_checked():
    with pytest.raises(ValueError, match=r"optimizer must be one of \('adamw', 'lion', 'adafactor', 'muon'\), "
                                         r"got 'sgd'"):
        jaxdec.TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="decay_embeddings must be a bool"):
        jaxdec.TrainConfig(decay_embeddings="yes")


@pytest.mark.slow(reason="a train-step and a gradient compilation (tests/test_packing_model.py's "
                         "gradient oracle drives train_step with a custom optax.sgd by default)")
def test_a_custom_optimizer_drives_the_step():
    """create_train_state(optimizer=optax.sgd(0.5)): one train step moves the params by -0.5 times
    the gradient of an independently written loss (api.apply + optax's cross-entropy): 1e-6."""
    tx = optax.sgd(0.5)
    state = jaxdec.create_train_state(MC, TC, jax.random.key(0), optimizer=tx)
    assert state.optimizer is tx
    batch = {"tokens": jax.random.randint(jax.random.key(1), (4, 17), 0, MC.vocab_size)}
    before = jax.tree.map(np.asarray, state.params)

    def loss(p):
        logits = api.apply(p, MC, batch["tokens"][:, :-1], jnp.full((4,), 16, jnp.int32), tuning=state.tuning)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:]))

    grads = jax.jit(jax.grad(loss))(state.params)
    new, _ = jaxdec.train_step(state, batch)
    chex.assert_trees_all_close(new.params, jax.tree.map(lambda p, g: p - 0.5 * g, before, grads),
                                atol=1e-6, rtol=1e-6)


def test_bad_custom_optimizers_and_unsharded_states_are_refused():
    with pytest.raises(ValueError, match="optax.GradientTransformation"):
        jaxdec.create_train_state(MC, TC, jax.random.key(0), optimizer="sgd")
    with pytest.raises(ValueError, match="optimizer='adafactor' keeps state that jaxdec.sharding has no rules for"):
        jaxdec.create_train_state(MC, dataclasses.replace(TC, optimizer="adafactor"), jax.random.key(0),
                                  mesh=jaxdec.make_mesh())


@pytest.mark.slow(reason="an orbax round trip and two train-step compilations")
def test_a_custom_optimizer_resumes_from_a_checkpoint(tmp_path):
    """Saved after 2 steps and restored into a template created with the same optimizer, a run
    continues exactly as the one that never stopped (bitwise)."""
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.lion(1e-3, weight_decay=0.1))
    batches = [{"tokens": jax.random.randint(jax.random.key(10 + i), (4, 17), 0, MC.vocab_size)} for i in range(4)]
    state = jaxdec.create_train_state(MC, TC, jax.random.key(0), optimizer=tx)
    straight = []
    for b in batches:
        state, m = jaxdec.train_step(state, b)
        straight.append(float(m["loss"]))
    state = jaxdec.create_train_state(MC, TC, jax.random.key(0), optimizer=tx)
    for b in batches[:2]:
        state, _ = jaxdec.train_step(state, b)
    checkpoint.save(tmp_path, state, 2)
    restored, step = checkpoint.restore(tmp_path, jaxdec.create_train_state(MC, TC, jax.random.key(0), optimizer=tx))
    assert step == 2 and restored.optimizer is tx
    resumed = []
    for b in batches[2:]:
        restored, m = jaxdec.train_step(restored, b)
        resumed.append(float(m["loss"]))
    assert resumed == straight[2:]
