"""Tests for jaxdec.checkpoint: bit-identical round trip, pruning, corrupt-checkpoint fallback."""

import functools
import pathlib
import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdec import checkpoint

# When tensorstore fails on a damaged file, its other in-flight reads finish after orbax has
# closed its asyncio loop ("RuntimeError: Event loop is closed", printed as an unraisable
# exception from a tensorstore thread). Harmless orbax noise; keep it out of the test report.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@flax.struct.dataclass
class State:
    params: dict
    opt_state: optax.OptState
    step: jax.Array  # int32 []
    key: jax.Array  # typed key []
    raw_key: jax.Array  # uint32 [2]


def _tx():
    adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=0.1)
    return optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), adamw), every_k_schedule=2)


@functools.cache
def _make_state(seed: int) -> State:
    """A state with non-trivial values everywhere: a few optimizer updates, split keys."""
    # optax mixes float32 and bfloat16 leaves (and Python floats with int32 counts) internally;
    # the suite's strict dtype promotion is for our code, not optax's.
    with jax.numpy_dtype_promotion("standard"):
        return _build_state(seed)


@jax.jit  # one compile instead of many slow eager optax ops per state
def _build_state(seed):
    k = jax.random.key(seed)
    params = {
        "w": jax.random.normal(jax.random.fold_in(k, 1), (3, 4), jnp.float32),
        "b": jax.random.normal(jax.random.fold_in(k, 2), (4,), jnp.float32),
        "emb": jax.random.normal(jax.random.fold_in(k, 3), (5, 2), jnp.bfloat16),
    }
    tx = _tx()
    opt_state = tx.init(params)
    for i in range(3):
        grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (i + 1)), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return State(
        params=params,
        opt_state=opt_state,
        step=jnp.asarray(seed, jnp.int32),
        key=jax.random.split(k)[1],
        raw_key=jax.random.PRNGKey(seed + 100),
    )


def _assert_bit_identical(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.tobytes() == y.tobytes()  # bits, so NaN == NaN and -0 != 0


def _data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """The OCDBT array-data files (under `d/` folders) of one step directory."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    return files


def _corrupt_arrays(step_dir: pathlib.Path):
    """Truncates every array-data file to half its size."""
    for p in _data_files(step_dir):
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def test_round_trip_bit_identical(tmp_path):
    state = _make_state(7)
    path = checkpoint.save(tmp_path, state, 7)
    assert path == tmp_path / "7" and path.is_dir()
    assert checkpoint.latest_step(tmp_path) == 7

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a clean restore warns about nothing
        restored, step = checkpoint.restore(tmp_path, _make_state(0))
    assert step == 7
    assert isinstance(restored, State)
    _assert_bit_identical(restored, state)

    # Continuing from the restored state gives exactly the same update as from the original.
    tx = _tx()
    grads = jax.tree.map(jnp.ones_like, state.params)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes the float32 and bfloat16 leaves
        _assert_bit_identical(
            tx.update(grads, restored.opt_state, restored.params),
            tx.update(grads, state.opt_state, state.params),
        )
    _assert_bit_identical(jax.random.normal(restored.key, (4,)), jax.random.normal(state.key, (4,)))


def test_rbg_typed_key_keeps_its_impl(tmp_path):
    state = {"key": jax.random.key(3, impl="rbg"), "x": jnp.arange(3)}
    checkpoint.save(tmp_path, state, 0)
    template = {"key": jax.random.key(0, impl="rbg"), "x": jnp.zeros(3, jnp.int32)}
    restored, _ = checkpoint.restore(tmp_path, template)
    _assert_bit_identical(restored, state)


def test_keep_prunes_oldest(tmp_path):
    state = _make_state(1)
    for s in [10, 20, 30, 40]:
        checkpoint.save(tmp_path, state, s, keep=2)
    assert checkpoint.all_steps(tmp_path) == [30, 40]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["30", "40"]


def test_restore_explicit_step(tmp_path):
    checkpoint.save(tmp_path, _make_state(1), 1)
    checkpoint.save(tmp_path, _make_state(2), 2)
    restored, step = checkpoint.restore(tmp_path, _make_state(0), step=1)
    assert step == 1
    _assert_bit_identical(restored, _make_state(1))
    with pytest.raises(FileNotFoundError, match="step 5"):
        checkpoint.restore(tmp_path, _make_state(0), step=5)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: [p.unlink() for p in _data_files(d)], id="delete-data"),
        pytest.param(_corrupt_arrays, id="truncate-data"),
        pytest.param(lambda d: (d / "_METADATA").write_text("{garbage"), id="garbage-metadata"),
        pytest.param(lambda d: (d / "_CHECKPOINT_METADATA").unlink(), id="delete-step-metadata"),
    ],
)
def test_corrupt_latest_falls_back_with_warning(tmp_path, damage):
    checkpoint.save(tmp_path, _make_state(1), 1)
    checkpoint.save(tmp_path, _make_state(2), 2)
    damage(tmp_path / "2")
    with pytest.warns(UserWarning, match="step 2"):
        restored, step = checkpoint.restore(tmp_path, _make_state(0))
    assert step == 1
    _assert_bit_identical(restored, _make_state(1))
    with pytest.raises(checkpoint.CorruptCheckpointError, match="step 2"):
        checkpoint.restore(tmp_path, _make_state(0), step=2)


def test_bit_flip_in_array_data_is_detected(tmp_path):
    # OCDBT does not checksum array chunks: without our digests this restores a wrong value.
    state = {"w": jnp.arange(4096, dtype=jnp.float32)}
    checkpoint.save(tmp_path, state, 1)
    checkpoint.save(tmp_path, state, 2)
    biggest = max(_data_files(tmp_path / "2"), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x01
    biggest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"step 2 .* leaf \['w'\] does not match its SHA-256"):
        _, step = checkpoint.restore(tmp_path, {"w": jnp.zeros(4096, jnp.float32)})
    assert step == 1


def test_half_written_step_is_ignored(tmp_path):
    checkpoint.save(tmp_path, _make_state(1), 1)
    # What a save killed before orbax's final rename leaves behind.
    (tmp_path / "2.orbax-checkpoint-tmp").mkdir()
    assert checkpoint.latest_step(tmp_path) == 1
    _, step = checkpoint.restore(tmp_path, _make_state(0))
    assert step == 1
    checkpoint.save(tmp_path, _make_state(3), 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "3"]


def test_resaving_after_fallback(tmp_path):
    for s in [1, 2, 3]:
        checkpoint.save(tmp_path, _make_state(s), s)
    _corrupt_arrays(tmp_path / "3")
    with pytest.warns(UserWarning, match="step 3"):
        _, step = checkpoint.restore(tmp_path, _make_state(0))
    assert step == 2
    # Re-reaching the corrupt step replaces it.
    checkpoint.save(tmp_path, _make_state(33), 3)
    restored, step = checkpoint.restore(tmp_path, _make_state(0))
    assert step == 3
    _assert_bit_identical(restored, _make_state(33))
    # Saving below existing steps (resumed from an older one) drops the abandoned newer ones.
    with pytest.warns(UserWarning, match=r"deleting newer checkpoints \[3\]"):
        checkpoint.save(tmp_path, _make_state(22), 2)
    assert checkpoint.all_steps(tmp_path) == [1, 2]


def test_all_corrupt_or_missing_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.restore(tmp_path / "nothing", _make_state(0))
    assert checkpoint.latest_step(tmp_path / "nothing") is None
    checkpoint.save(tmp_path, _make_state(1), 1)
    _corrupt_arrays(tmp_path / "1")
    with pytest.warns(UserWarning, match="step 1"):
        with pytest.raises(FileNotFoundError, match="no usable checkpoint"):
            checkpoint.restore(tmp_path, _make_state(0))


def test_relative_directory(tmp_path, monkeypatch):
    # orbax itself rejects relative paths ("Checkpoint path should be absolute").
    monkeypatch.chdir(tmp_path)
    checkpoint.save("ckpt", {"w": jnp.arange(3.0)}, 4)
    restored, step = checkpoint.restore("ckpt", {"w": jnp.zeros(3)})
    assert step == 4 and restored["w"].tolist() == [0.0, 1.0, 2.0]


def test_template_mismatch_is_value_error_not_fallback(tmp_path):
    checkpoint.save(tmp_path, {"w": jnp.zeros((2, 3), jnp.float32)}, 1)
    with pytest.raises(ValueError, match=r"float32\[2, 3\].*bfloat16\[2, 3\]"):
        checkpoint.restore(tmp_path, {"w": jnp.zeros((2, 3), jnp.bfloat16)})


@pytest.mark.parametrize("kwargs", [{"step": -1}, {"step": 1.5}, {"step": 1, "keep": 0}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match="step|keep"):
        checkpoint.save(tmp_path, {"w": jnp.zeros(2)}, **kwargs)


def test_train_state_template_must_fit_its_model_config(tmp_path):
    """A TrainState template whose params are another model's is refused before any read."""
    import dataclasses

    import jaxdec

    mc = jaxdec.DecoderConfig(vocab_size=11, num_layers=1, d_model=8, num_heads=2, max_len=8)
    tc = jaxdec.TrainConfig(warmup_steps=1, decay_steps=4)
    state = jaxdec.create_train_state(mc, tc, jax.random.key(0))
    checkpoint.save(tmp_path, state, 1)
    wrong = state.replace(model_config=dataclasses.replace(mc, vocab_size=12))
    with pytest.raises(ValueError, match=r"params\['embed'\] has shape \(11, 8\)"):
        checkpoint.restore(tmp_path, wrong)
    restored, step = checkpoint.restore(tmp_path, state)
    assert step == 1
