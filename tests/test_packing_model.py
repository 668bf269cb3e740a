"""Packed documents (segment ids): a row holding several documents trains, predicts and attends
exactly as its documents would on rows of their own.

The independent computation is the unpacked path that existed before packing: each document
alone in its own right-padded row, with `lengths`. Two position schemes, because they catch
different bugs: with RoPE attention depends only on relative positions, so a leak across a
boundary shows but positions that fail to restart do not; learned positions show both.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdec
from jaxdec import api, inspect, layers, training

_TINY = dict(vocab_size=32, num_layers=2, d_model=32, num_heads=4, max_len=32)
CONFIGS = {
    # Llama's block: RoPE, RMSNorm, SwiGLU, no biases, grouped K/V heads.
    "rope": jaxdec.DecoderConfig(**_TINY, position="rope", norm="rms", mlp="gated", activation="silu",
                                 use_bias=False, num_kv_heads=2),
    # GPT-2's block: learned absolute positions.
    "learned": jaxdec.DecoderConfig(**_TINY),
}
TC = jaxdec.TrainConfig(learning_rate=3e-3, warmup_steps=2, decay_steps=100, weight_decay=0.0)

# Two packed rows of T + 1 = 17 tokens: documents of 5, 7 and 3 tokens then 2 padding slots;
# one of 16 tokens then a one-token document (which has no target of its own).
DOC_LENGTHS = [[5, 7, 3], [16, 1]]
T1 = 17


def _documents(key) -> list[np.ndarray]:
    lengths = [n for row in DOC_LENGTHS for n in row]
    tokens = np.asarray(jax.random.randint(key, (sum(lengths),), 0, _TINY["vocab_size"]), np.int32)
    return np.split(tokens, np.cumsum(lengths)[:-1])


def _packed(docs) -> dict:
    """The documents packed in DOC_LENGTHS's rows: segment ids 1, 2, ... per row, 0 for padding
    (whose tokens are arbitrary nonzero ids, so padding that leaked in would show)."""
    tokens = np.full((len(DOC_LENGTHS), T1), 7, np.int32)
    segments = np.zeros((len(DOC_LENGTHS), T1), np.int32)
    it = iter(docs)
    for b, row in enumerate(DOC_LENGTHS):
        at = 0
        for i, n in enumerate(row):
            tokens[b, at:at + n] = next(it)
            segments[b, at:at + n] = i + 1
            at += n
    return {"tokens": tokens, "segment_ids": segments}


def _separate(docs) -> dict:
    """Each document alone in a right-padded row with its length: the path before packing."""
    tokens = np.zeros((len(docs), T1), np.int32)
    for b, doc in enumerate(docs):
        tokens[b, :len(doc)] = doc
    return {"tokens": tokens, "lengths": np.asarray([len(d) for d in docs], np.int32)}


# Plain gradient descent at rate 1 without clipping: a step's update is minus the gradient, so
# train_step itself hands back the gradients it took (params before - params after).
SGD = optax.sgd(1.0)


def _step(mc, batch):
    """train_step's metrics and gradients on `batch` from the same initial params."""
    state = jaxdec.create_train_state(mc, TC, jax.random.key(0), optimizer=SGD)
    before = jax.tree.map(np.asarray, state.params)
    new, metrics = jaxdec.train_step(state, batch)
    return metrics, jax.tree.map(lambda b, a: b - np.asarray(a), before, new.params)


@pytest.mark.parametrize("name", [
    pytest.param("rope", marks=pytest.mark.slow(reason="two more train-step compilations; the learned case "
                                                       "catches everything this one does")),
    "learned"])
def test_packed_rows_train_as_separate_rows(name):
    """train_step's loss and gradients on the packed rows equal those on the same documents in
    rows of their own (float32, 1e-5; the update's own rounding, ulp(|param| <= 1) ~ 6e-8, is far
    below). Both sides count 27 targets: 4 + 6 + 2 + 15 + 0."""
    mc = CONFIGS[name]
    docs = _documents(jax.random.key(1))
    (m_p, grads_p), (m_s, grads_s) = _step(mc, _packed(docs)), _step(mc, _separate(docs))
    assert float(m_p["tokens"]) == float(m_s["tokens"]) == sum(len(d) - 1 for d in docs) == 27
    np.testing.assert_allclose(float(m_p["loss"]), float(m_s["loss"]), rtol=1e-5)
    chex.assert_trees_all_close(grads_p, grads_s, atol=1e-5, rtol=1e-5)
    # Not trivially equal: the gradients are far from zero.
    assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads_p)) > 1e-3


@pytest.mark.slow(reason="four more compilations (forward and eval step, packed and separate)")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_packed_documents_logits_are_its_own(name):
    """Each packed document's logits equal those of the document alone at the start of a row
    (positions restart at 0, nothing crosses a boundary): float32, 1e-5. eval_step's metrics on
    the packed rows equal those on the separate rows."""
    mc = CONFIGS[name]
    params = jaxdec.init_params(mc, jax.random.key(2))
    docs = _documents(jax.random.key(3))
    packed, separate = _packed(docs), _separate(docs)
    logits = np.asarray(jaxdec.forward(params, mc, packed["tokens"], segment_ids=packed["segment_ids"]))
    alone = np.asarray(jaxdec.forward(params, mc, separate["tokens"], separate["lengths"]))
    it = iter(range(len(docs)))
    for b, row in enumerate(DOC_LENGTHS):
        at = 0
        for n in row:
            np.testing.assert_allclose(logits[b, at:at + n], alone[next(it), :n], atol=1e-5, rtol=1e-5)
            at += n
    state = jaxdec.create_train_state(mc, TC, jax.random.key(0), params=params)
    eval_p, eval_s = jaxdec.eval_step(state, packed), jaxdec.eval_step(state, separate)
    for key in ("loss", "tokens", "accuracy"):
        np.testing.assert_allclose(float(eval_p[key]), float(eval_s[key]), rtol=1e-5, err_msg=key)


def _block_diagonal_causal(segment_ids: np.ndarray) -> np.ndarray:
    """bool [B, T, T] by loops: query t sees key s <= t iff no document boundary lies between."""
    B, T = segment_ids.shape
    mask = np.zeros((B, T, T), bool)
    for b in range(B):
        for t in range(T):
            for s in range(t + 1):
                mask[b, t, s] = all(segment_ids[b, u] == segment_ids[b, t] for u in range(s, t + 1))
    return mask


def test_attention_never_crosses_a_document_boundary():
    """inspect.attention with segment ids: the mask is the block-diagonal causal mask built by
    loops; every probability on another document's key (or padding) is exactly 0; each real
    query's row sums to 1 over its own document."""
    mc = CONFIGS["rope"]
    params = jaxdec.init_params(mc, jax.random.key(4))
    packed = _packed(_documents(jax.random.key(5)))
    tokens, segments = packed["tokens"][:, :-1], packed["segment_ids"][:, :-1]
    result = inspect.attention(params, mc, tokens, segment_ids=segments)
    allowed = _block_diagonal_causal(segments)
    np.testing.assert_array_equal(np.asarray(result.masks["self"]), allowed)
    for probs in result.self_attention:
        probs = np.asarray(probs)  # [B, N, T, T]
        assert np.all(probs[~np.broadcast_to(allowed[:, None], probs.shape)] == 0.0)
        sums = probs.sum(-1)  # [B, N, T]
        real = np.broadcast_to((segments != 0)[:, None], sums.shape)
        np.testing.assert_allclose(sums[real], 1.0, rtol=1e-6)
    np.testing.assert_allclose(result.logits, jaxdec.forward(params, mc, tokens, segment_ids=segments),
                               atol=1e-6, rtol=0)


def test_positions_restart_and_masks_follow_runs_by_hand():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0, 3], [1, 2, 2, 2, 1, 1, 0, 0]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(layers.segment_positions(seg)),
                                  [[0, 1, 2, 0, 1, 0, 1, 0], [0, 0, 1, 2, 0, 1, 0, 1]])
    # An id reused later in the row is a new document (runs, not equal ids, are documents).
    mask = np.asarray(layers.segment_mask(seg))
    assert not mask[1, 4, 0] and mask[1, 5, 4]
    batch = {"tokens": jnp.zeros((2, 8), jnp.int32), "segment_ids": seg}
    np.testing.assert_array_equal(np.asarray(training.target_weights(batch)),
                                  [[1, 1, 0, 1, 0, 0, 0], [0, 1, 1, 0, 1, 0, 0]])


_TOKENS = np.ones((2, 9), np.int32)
_SEGMENTS = np.ones((2, 9), np.int32)
_BAD = {
    "with_lengths": ({"tokens": _TOKENS, "segment_ids": _SEGMENTS, "lengths": np.array([9, 9], np.int32)},
                     "not both"),
    "shape": ({"tokens": _TOKENS, "segment_ids": _SEGMENTS[:, :-1]}, r"tokens' shape \(2, 9\)"),
    "rank": ({"tokens": _TOKENS, "segment_ids": _SEGMENTS[0]}, "rank 2"),
    "float": ({"tokens": _TOKENS, "segment_ids": _SEGMENTS.astype(np.float32)}, "integer"),
    "negative": ({"tokens": _TOKENS, "segment_ids": np.where(np.arange(9) == 4, -1, _SEGMENTS).astype(np.int32)},
                 "holds -1"),
}


@pytest.mark.parametrize("batch, match", _BAD.values(), ids=_BAD.keys())
def test_bad_segment_ids_are_refused_before_compute(batch, match, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("reached the compiled step")

    for name in ("_train_step_jit", "_eval_step_jit", "_train_step_checked_jit"):
        monkeypatch.setattr(training, name, no_compute)
    state = jaxdec.create_train_state(CONFIGS["learned"], TC, jax.random.key(0))
    for step in (jaxdec.train_step, jaxdec.eval_step, training.train_step_checked):
        with pytest.raises(ValueError, match=match):
            step(state, batch)


def test_an_encoder_decoder_refuses_segment_ids():
    from jaxdec import seq2seq

    mc = jaxdec.Seq2SeqConfig(vocab_size=32, num_encoder_layers=1, num_decoder_layers=1, d_model=32,
                              num_heads=4, max_len=32)
    params = api.expected_params(mc)  # shapes only: each refusal comes before params are read
    with pytest.raises(ValueError, match="decoder-only"):
        training.check_batch({"tokens": _TOKENS, "source": _TOKENS, "segment_ids": _SEGMENTS}, mc)
    with pytest.raises(ValueError, match="decoder-only"):
        jaxdec.forward(params, mc, _TOKENS, source=_TOKENS, segment_ids=_SEGMENTS)
    with pytest.raises(ValueError, match="decoder-only"):  # the traceable path refuses it too
        seq2seq.seq2seq_logits(params, mc, jnp.asarray(_TOKENS), jnp.full((2,), 9, jnp.int32),
                               jnp.asarray(_TOKENS), jnp.full((2,), 9, jnp.int32), segment_ids=_SEGMENTS)


@pytest.mark.slow  # compiles the checkified train step
def test_checked_step_finds_negative_segment_ids_on_the_device():
    state = jaxdec.create_train_state(CONFIGS["learned"], TC, jax.random.key(0))
    batch = {"tokens": jnp.asarray(_TOKENS), "segment_ids": jnp.asarray(_SEGMENTS).at[1, 3].set(-2)}
    error, _, _ = training.train_step_checked(state, batch)
    assert "segment_ids must be >= 0" in error.get()
