"""Teacher-forcing training: loss, padding weights, accumulation, the non-finite guard, resume."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdec
from jaxdec import api, checkpoint, training, tuning

MC = jaxdec.DecoderConfig(vocab_size=32, num_layers=2, d_model=32, num_heads=4, max_len=32)
TC = jaxdec.TrainConfig(learning_rate=3e-3, warmup_steps=2, decay_steps=100, weight_decay=0.0)


def _batch(key, B=4, T=16, lengths=None):
    tokens = jax.random.randint(key, (B, T + 1), 0, MC.vocab_size)
    batch = {"tokens": tokens}
    if lengths is not None:
        batch["lengths"] = jnp.asarray(lengths, jnp.int32)
    return batch


def _state(tc=TC, mc=MC):
    return jaxdec.create_train_state(mc, tc, jax.random.key(0))


def test_state_shapes_and_metrics():
    state = _state()
    chex.assert_trees_all_equal_shapes(state.params, jaxdec.init_params(MC, jax.random.key(1)))
    new, metrics = jaxdec.train_step(state, _batch(jax.random.key(1)))
    assert int(new.step) == 1
    for name in ("loss", "tokens", "accuracy", "grad_norm", "learning_rate", "skipped"):
        chex.assert_shape(metrics[name], ())
    assert float(metrics["tokens"]) == 4 * 16


def test_loss_is_mean_per_real_target_token():
    """metrics["loss"] equals an independent cross-entropy over the real targets only."""
    state = _state()
    batch = _batch(jax.random.key(2), lengths=[17, 9, 2, 12])
    logits = jaxdec.forward(state.params, MC, batch["tokens"][:, :-1], jnp.minimum(batch["lengths"], 16))
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    tokens, lengths = np.asarray(batch["tokens"]), np.asarray(batch["lengths"])
    losses = [-logp[b, t, tokens[b, t + 1]] for b in range(4) for t in range(16) if t + 1 < lengths[b]]
    _, metrics = jaxdec.train_step(_state(), batch)
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)
    assert float(metrics["tokens"]) == len(losses)


def test_loss_halves_on_a_fixed_batch():
    state = _state()
    batch = _batch(jax.random.key(3))
    first = None
    for _ in range(40):
        state, metrics = jaxdec.train_step(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < first / 2, (first, float(metrics["loss"]))


def test_padding_weights_exclude_padding():
    """Changing the tokens in padded positions changes neither the loss nor the gradients."""
    batch = _batch(jax.random.key(4), lengths=[17, 5, 11, 1])
    tokens = np.asarray(batch["tokens"]).copy()
    for b, n in enumerate([17, 5, 11, 1]):
        tokens[b, n:] = (tokens[b, n:] + 7) % MC.vocab_size
    other = {**batch, "tokens": jnp.asarray(tokens)}
    s1, m1 = jaxdec.train_step(_state(), batch)
    s2, m2 = jaxdec.train_step(_state(), other)
    assert float(m1["loss"]) == float(m2["loss"])
    chex.assert_trees_all_close(s1.params, s2.params, atol=0, rtol=0)


@pytest.mark.parametrize("dropout", [pytest.param(0.0, marks=pytest.mark.slow(reason="time budget: 0.2 covers it")), 0.2])
def test_row_groups_equal_one_group(dropout):
    """A step split into independent row groups (the CPU tuning's form) gives the loss, metrics
    and update of one group: padded rows and rows of different lengths in each group, fp32,
    1e-6. With dropout too: masks are drawn per row, so they do not depend on the grouping."""
    batch = _batch(jax.random.key(12), lengths=[17, 5, 11, 1])
    tc = dataclasses.replace(TC, dropout=dropout)
    one_group = tuning.Tuning(row_groups=1)
    two_groups = tuning.Tuning(row_groups=2, row_group_min_tokens=1)
    assert training.row_groups(batch["tokens"].shape, None, two_groups) == 2
    step = jax.jit(training._train_step)
    one_state, one = step(_state(tc).replace(tuning=one_group), batch)
    two_state, two = step(_state(tc).replace(tuning=two_groups), batch)
    for name in one:
        np.testing.assert_allclose(float(two[name]), float(one[name]), rtol=1e-6, err_msg=name)
    chex.assert_trees_all_close(two_state.params, one_state.params, atol=1e-6, rtol=1e-6)
    assert training.row_groups((3, 1025), None, two_groups) == 1, "an odd batch keeps one group"
    if dropout:  # the masks matter: without dropout the loss differs
        _, plain = step(_state(dataclasses.replace(TC, dropout=0.0)).replace(tuning=one_group), batch)
        assert abs(float(plain["loss"]) - float(one["loss"])) > 1e-4


@pytest.mark.slow  # two train-step compilations (with and without accumulation)
def test_gradient_accumulation_equals_one_big_batch():
    """k micro-batches through optax.MultiSteps == one batch of k times the size (fp32, 1e-6).

    Adam moves a parameter whose gradient g is below eps by about lr * g / eps, so the float32
    rounding of a near-zero gradient (4 micro-batch sums vs 1 batch sum: ~1e-11) reaches the
    params amplified lr / eps-fold: 1.5e5 at the default eps 1e-8 (1.1e-6 seen on a Xeon),
    1.5e3 at eps 1e-6, used here."""
    k = 4
    tc = dataclasses.replace(TC, eps=1e-6)
    acc_state = _state(dataclasses.replace(tc, grad_accum_steps=k))
    big_state = _state(tc)
    for update in range(2):  # the warmup's first learning rate is 0: take two updates
        big = _batch(jax.random.key(5 + update), B=8)
        for i in range(k):
            acc_state, _ = jaxdec.train_step(acc_state, {"tokens": big["tokens"][2 * i : 2 * i + 2]})
        big_state, _ = jaxdec.train_step(big_state, big)
    chex.assert_trees_all_close(acc_state.params, big_state.params, atol=1e-6, rtol=1e-5)
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), acc_state.params,
                                         _state().params)), "params must have moved"


def test_non_finite_gradient_skips_the_update():
    state = _state()
    state, _ = jaxdec.train_step(state, _batch(jax.random.key(6)))
    poisoned = jax.tree.map(lambda x: x, state.params)
    poisoned["embed"] = poisoned["embed"].at[0, 0].set(jnp.inf)
    bad_state = state.replace(params=poisoned)
    # Host copies: the step donates the state's buffers.
    params_before = jax.tree.map(np.asarray, bad_state.params)
    moments_before = jax.tree.map(np.asarray, bad_state.opt_state.inner_state)
    new, metrics = jaxdec.train_step(bad_state, _batch(jax.random.key(7)))
    assert float(metrics["skipped"]) == 1.0
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, new.params), params_before)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, new.opt_state.inner_state), moments_before)
    assert int(new.opt_state.notfinite_count) == 1


def test_eval_step_metrics():
    state = _state()
    batch = _batch(jax.random.key(8), lengths=[17, 3, 9, 17])
    ev = jaxdec.eval_step(state, batch)
    np.testing.assert_allclose(float(ev["bits_per_token"]), float(ev["loss"]) / np.log(2), rtol=1e-6)
    assert float(ev["tokens"]) == 16 + 2 + 8 + 16
    assert 0.0 <= float(ev["accuracy"]) <= 1.0


@pytest.mark.parametrize("zero_embed", [False, True])
def test_accuracy_counts_argmax_hits_over_real_targets(zero_embed):
    """eval_step's and train_step's correct predictions equal numpy's first-index argmax compared
    with the real targets. With the (tied) embedding zeroed every logit ties at 0, so only
    targets of id 0 count as correct (the lowest id wins a tie, as in greedy decoding)."""
    params = jaxdec.init_params(MC, jax.random.key(0))
    if zero_embed:
        params["embed"] = jnp.zeros_like(params["embed"])
    state = jaxdec.create_train_state(MC, TC, jax.random.key(0), params=params)
    lengths = [17, 3, 9, 17]
    batch = _batch(jax.random.key(8), lengths=lengths)
    batch["tokens"] = batch["tokens"].at[:, 1::3].set(0)  # some targets of id 0
    logits = np.asarray(jaxdec.forward(state.params, MC, batch["tokens"][:, :-1],
                                       jnp.minimum(batch["lengths"], 16)))
    tokens = np.asarray(batch["tokens"])
    hits = [np.argmax(logits[b, t]) == tokens[b, t + 1] for b in range(4) for t in range(16)
            if t + 1 < lengths[b]]
    if zero_embed:
        assert np.all(logits == 0.0)
    ev = jaxdec.eval_step(state, batch)
    assert float(ev["correct"]) == sum(hits)
    np.testing.assert_allclose(float(ev["accuracy"]), np.mean(hits), rtol=1e-6)
    _, metrics = jaxdec.train_step(state, batch)
    np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(hits), rtol=1e-6)


def test_dropout_changes_training_but_not_eval():
    tc = dataclasses.replace(TC, dropout=0.5)
    batch = _batch(jax.random.key(9))
    _, m_drop = jaxdec.train_step(_state(tc), batch)
    _, m_plain = jaxdec.train_step(_state(), batch)
    assert float(m_drop["loss"]) != float(m_plain["loss"])
    e1, e2 = jaxdec.eval_step(_state(tc), batch), jaxdec.eval_step(_state(), batch)
    assert float(e1["loss"]) == float(e2["loss"])


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, ...]]:
    """The operand dtypes of every dot_general in a jaxpr, nested jaxprs (scan, remat, custom
    derivatives, pjit) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dot_operand_dtypes(sub)
    return found


def test_bfloat16_compute_keeps_float32_params():
    """TrainConfig(dtype="bfloat16"): every matmul of the step's forward and backward takes
    bfloat16 operands (float32 ones in the float32 step), params, gradients and Adam's moments
    stay float32, and the loss and gradient norm are those of a bfloat16 forward the test casts
    itself, not the float32 ones.

    Tolerances: the step and the reference run the same bfloat16 ops (1e-6 relative: a float32
    reduction order may differ, ~1e-7), while a float32 step is 1.2e-5 (loss) and 9e-4
    (gradient norm) away from the reference on this batch. bfloat16 keeps 8 significant bits
    (2^-8 = 3.9e-3 per rounding, averaged over many terms), so [1e-4, 2e-2] relative between
    the two steps' gradient norms brackets bfloat16 rounding, far above float32's and far below
    a wrong computation."""
    tc = dataclasses.replace(TC, dtype="bfloat16")
    batch = _batch(jax.random.key(11))
    step_dots = {name: _dot_operand_dtypes(jax.make_jaxpr(training._train_step)(_state(c), batch).jaxpr)
                 for name, c in (("bfloat16", tc), ("float32", TC))}
    assert len(step_dots["bfloat16"]) == len(step_dots["float32"]) > 0
    assert set(step_dots["bfloat16"]) == {("bfloat16", "bfloat16")}, step_dots["bfloat16"]
    assert set(step_dots["float32"]) == {("float32", "float32")}, step_dots["float32"]

    # The reference: a bfloat16 forward (under the step's tuning) from float32 params cast
    # here, its mean cross-entropy, and the gradient with respect to the float32 params.
    state = _state(tc)
    params, tuned = state.params, state.tuning
    T = batch["tokens"].shape[1] - 1

    def reference_loss(p):
        p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p)
        logits = api.apply(p16, MC, batch["tokens"][:, :-1], jnp.full((4,), T, jnp.int32), tuning=tuned)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["tokens"][:, 1:]))

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference_loss))(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(ref_grads))

    s_bf, m_bf = jaxdec.train_step(_state(tc), batch)
    _, m_fp = jaxdec.train_step(_state(), batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s_bf.params))
    opt_floats = [x for x in jax.tree.leaves(s_bf.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert len(opt_floats) >= 2 * len(jax.tree.leaves(s_bf.params))  # Adam's mu and nu
    assert all(x.dtype == jnp.float32 for x in opt_floats)
    np.testing.assert_allclose(float(m_bf["loss"]), float(ref_loss), rtol=1e-6)
    np.testing.assert_allclose(float(m_bf["grad_norm"]), float(optax.tree.norm(ref_grads)), rtol=1e-6)
    gap = abs(float(m_bf["grad_norm"]) - float(m_fp["grad_norm"])) / float(m_fp["grad_norm"])
    assert 1e-4 < gap < 2e-2, gap
    np.testing.assert_allclose(float(m_bf["loss"]), float(m_fp["loss"]), rtol=2e-2)


@pytest.mark.slow  # an orbax round trip plus three steps
def test_save_restore_continue_is_bit_identical(tmp_path):
    batches = [_batch(jax.random.key(20 + i), lengths=[17, 8, 12, 17]) for i in range(6)]
    tc = dataclasses.replace(TC, dropout=0.1)
    state = _state(tc)
    straight = []
    for b in batches:
        state, m = jaxdec.train_step(state, b)
        straight.append({k: float(v) for k, v in m.items()})

    state = _state(tc)
    for b in batches[:3]:
        state, _ = jaxdec.train_step(state, b)
    checkpoint.save(tmp_path, state, 3)
    restored, step = checkpoint.restore(tmp_path, _state(tc))
    assert step == 3
    resumed = []
    for b in batches[3:]:
        restored, m = jaxdec.train_step(restored, b)
        resumed.append({k: float(v) for k, v in m.items()})
    assert resumed == straight[3:]


def test_target_weights_by_hand():
    batch = {"tokens": jnp.zeros((2, 5), jnp.int32), "lengths": jnp.array([5, 2])}
    expected = np.array([[1, 1, 1, 1], [1, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(np.asarray(training.target_weights(batch)), expected)


def test_train_config_validation():
    with pytest.raises(ValueError, match="decay_steps"):
        jaxdec.TrainConfig(warmup_steps=10, decay_steps=5)
    with pytest.raises(ValueError, match="dropout"):
        jaxdec.TrainConfig(dropout=1.0)
    with pytest.raises(ValueError, match="dtype"):
        jaxdec.TrainConfig(dtype="float16")


# --- bad batches: ValueError before any compute; the checked step ------------------------------

_TOKENS = np.ones((2, 9), np.int32)
_BAD_BATCHES = {
    "not_a_dict": ([_TOKENS], "dict"),
    "no_tokens": ({"inputs": _TOKENS}, "tokens"),
    "typo_key": ({"tokens": _TOKENS, "lenghts": np.array([9, 9], np.int32)}, "lenghts"),
    "float_tokens": ({"tokens": _TOKENS.astype(np.float32)}, "integer"),
    "rank_1_tokens": ({"tokens": _TOKENS[0]}, "rank 2"),
    "one_column": ({"tokens": _TOKENS[:, :1]}, "T\\+1 >= 2"),
    "beyond_max_len": ({"tokens": np.ones((2, MC.max_len + 2), np.int32)}, "max_len=32"),
    "lengths_shape": ({"tokens": _TOKENS, "lengths": np.array([9, 9, 9], np.int32)}, r"shape \[2\]"),
    "float_lengths": ({"tokens": _TOKENS, "lengths": np.array([9.0, 9.0])}, "lengths"),
    "lengths_too_long": ({"tokens": _TOKENS, "lengths": np.array([10, 9], np.int32)}, "10"),
    "id_too_big": ({"tokens": np.where(np.arange(9) == 3, 32, _TOKENS).astype(np.int32)}, "token id 32"),
    "negative_id": ({"tokens": np.where(np.arange(9) == 3, -1, _TOKENS).astype(np.int32)}, "token id -1"),
    "source_for_decoder": ({"tokens": _TOKENS, "source": _TOKENS}, "for an encoder-decoder model, got a DecoderConfig"),
}


@pytest.mark.parametrize("batch, match", _BAD_BATCHES.values(), ids=_BAD_BATCHES.keys())
def test_bad_batches_are_refused_before_compute(batch, match, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("reached the compiled step")

    for name in ("_train_step_jit", "_eval_step_jit", "_train_step_checked_jit"):
        monkeypatch.setattr(training, name, no_compute)
    state = _state()
    for step in (jaxdec.train_step, jaxdec.eval_step, training.train_step_checked):
        with pytest.raises(ValueError, match=match):
            step(state, batch)


def test_max_len_inputs_are_accepted_and_one_more_is_refused(monkeypatch):
    # T + 1 = max_len + 1 tokens feed positions 0 .. max_len - 1: the longest valid batch.
    monkeypatch.setattr(training, "_train_step_jit", lambda state, batch: "compiled step reached")
    state = _state()
    assert jaxdec.train_step(state, {"tokens": np.ones((2, MC.max_len + 1), np.int32)}) == (
        "compiled step reached")
    with pytest.raises(ValueError, match="beyond the model's max_len"):
        jaxdec.train_step(state, {"tokens": np.ones((2, MC.max_len + 2), np.int32)})


def test_shape_checks_run_under_an_outer_jit():
    state = _state()
    with pytest.raises(ValueError, match="max_len"):
        jax.jit(jaxdec.eval_step)(state, {"tokens": jnp.ones((2, MC.max_len + 2), jnp.int32)})


def test_checked_step_finds_out_of_range_ids_in_device_arrays():
    """A device batch with an id >= vocab_size: train_step itself does not read values back (its
    loss is NaN and the update is skipped); train_step_checked reports the bad id."""
    from jax.experimental import checkify

    batch = _batch(jax.random.key(30), lengths=[17, 9, 2, 12])
    error, state, metrics = training.train_step_checked(_state(), batch)
    assert error.get() is None
    _, plain = jaxdec.train_step(_state(), batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(plain["loss"]), rtol=1e-6)
    assert int(state.step) == 1
    for bad in (MC.vocab_size, -1):
        error, _, _ = training.train_step_checked(_state(), dict(batch, tokens=batch["tokens"].at[2, 5].set(bad)))
        assert "token ids must lie in [0, vocab_size=32)" in error.get()
        with pytest.raises(checkify.JaxRuntimeError, match="token ids"):
            error.throw()
    error, _, _ = training.train_step_checked(_state(), dict(batch, lengths=batch["lengths"].at[0].set(18)))
    assert "lengths must lie in [0, 17]" in error.get()


def test_create_train_state_from_params_checks_them():
    params = jaxdec.init_params(MC, jax.random.key(5))
    state = jaxdec.create_train_state(MC, TC, jax.random.key(0), params=params)
    chex.assert_trees_all_equal(state.params, params)
    wrong = jaxdec.init_params(dataclasses.replace(MC, d_model=16), jax.random.key(5))
    with pytest.raises(ValueError, match=r"params\['embed'\] has shape \(32, 16\)"):
        jaxdec.create_train_state(MC, TC, jax.random.key(0), params=wrong)
    with pytest.raises(ValueError, match="head"):
        jaxdec.create_train_state(MC, TC, jax.random.key(0), params={**params, "head": params["embed"].T})
