"""jaxdec.sharding: the rules table, refused input, and the 8-device checks in their own process.

The rules are pure functions of shapes and mesh sizes, so they are tested here on abstract
meshes. Everything that needs 8 devices runs in tests/sharded_checks.py, in a fresh process
started with JAX_NUM_CPU_DEVICES=8 (this pytest process has already started JAX on 1 device).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

import jaxdec
from jaxdec import cache as kv_cache
from jaxdec import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _mesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _specs(tree, mesh, axes_fn=sharding.param_axes):
    return jax.tree.map(lambda s: s.spec, sharding.tree_shardings(tree, mesh, axes_fn))


DECODER = jaxdec.DecoderConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                               max_len=32, d_ff=64, tie_embeddings=False)
SEQ2SEQ = jaxdec.Seq2SeqConfig(vocab_size=64, num_encoder_layers=2, num_decoder_layers=3, d_model=32,
                               num_heads=4, max_len=32, share_embeddings=False, tie_embeddings=False,
                               logits_bias=True, position="learned", norm_position="pre")


@pytest.mark.parametrize("config", [DECODER, SEQ2SEQ], ids=["decoder", "seq2seq"])
def test_every_parameter_has_logical_axes_and_a_valid_spec(config):
    params = jax.eval_shape(lambda: jaxdec.init_params(config, jax.random.key(0)))
    mesh = _mesh(2, 2, 2)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        axes = sharding.param_axes(path, leaf.shape)
        assert len(axes) == leaf.ndim
        if "layers" in sharding._dict_keys(path):
            assert axes[0] == "layers", jax.tree_util.keystr(path)
        spec = sharding.logical_to_spec(axes, leaf.shape, mesh, fsdp_fallback=True)
        for size, entry in zip(leaf.shape, tuple(spec) + (None,) * (leaf.ndim - len(spec))):
            names = () if entry is None else (entry,) if isinstance(entry, str) else entry
            assert size % np.prod([mesh.shape[n] for n in names], dtype=int) == 0


def test_rules_on_the_stacked_layout():
    params = jax.eval_shape(lambda: jaxdec.init_params(DECODER, jax.random.key(0)))
    specs = _specs(params, _mesh(2, 2, 2))
    assert specs["embed"] == P("tensor", "fsdp")
    assert specs["head"] == P("fsdp", "tensor")
    assert specs["pos_embed"] == P(None, "fsdp")
    assert specs["layers"]["attn"]["qkv"] == P(None, "fsdp", "tensor")
    assert specs["layers"]["attn"]["out"] == P(None, "tensor", "fsdp")
    assert specs["layers"]["mlp"]["w_in"] == P(None, "fsdp", "tensor")
    assert specs["layers"]["mlp"]["w_out"] == P(None, "tensor", "fsdp")
    # Vectors no rule splits over fsdp are split over it anyway (ZeRO-3), in mesh order.
    assert specs["layers"]["mlp"]["b_in"] == P(None, ("fsdp", "tensor"))
    assert specs["layers"]["attn_norm"]["scale"] == P(None, "fsdp")


def test_optimizer_state_mirrors_the_params():
    state = jax.eval_shape(lambda: jaxdec.create_train_state(
        DECODER, jaxdec.TrainConfig(grad_accum_steps=2), jax.random.key(0)))
    specs = _specs(state, _mesh(1, 4, 2))
    qkv = specs.params["layers"]["attn"]["qkv"]
    moments = [s for p, s in jax.tree_util.tree_flatten_with_path(specs.opt_state)[0]
               if jax.tree_util.keystr(p).endswith("['attn']['qkv']")]
    assert len(moments) == 3 and all(s == qkv for s in moments)  # mu, nu, accumulated grads
    assert specs.step == P() and specs.key == P()


def test_undividable_dimensions_are_replicated_not_refused():
    # GQA: 2 KV heads on tensor=4 stay whole; vocab 259 splits over nothing.
    cache = jax.eval_shape(lambda: kv_cache.init_cache(2, 8, 16, 2, 8))
    specs = _specs(cache, _mesh(2, 1, 4), sharding.cache_axes)
    assert specs.k == P(None, ("data", "fsdp"), None, None, None)  # size-1 axes stay named
    assert specs.starts == P(("data", "fsdp")) and specs.end == P()
    assert sharding.logical_to_spec(("vocab", "embed"), (259, 32), _mesh(1, 2, 4)) == P(None, "fsdp")
    # A batch of 6 rows on data=4: only what divides.
    assert sharding.logical_to_spec(("batch",), (6,), _mesh(4, 2, 1)) == P("fsdp")


def test_cache_is_split_over_batch_and_kv_heads_never_slots():
    cache = jax.eval_shape(lambda: kv_cache.init_cache(2, 8, 64, 4, 8))
    specs = _specs(cache, _mesh(2, 2, 2), sharding.cache_axes)
    assert specs.k == specs.v == P(None, ("data", "fsdp"), "tensor", None, None)
    cross = kv_cache.CrossKV(k=cache.k, v=cache.v, lengths=cache.starts)
    assert _specs(cross, _mesh(2, 2, 2), sharding.cache_axes).lengths == P(("data", "fsdp"))


def test_unknown_parameter_is_refused_by_path():
    with pytest.raises(ValueError, match=r"\['mystery'\]"):
        sharding.tree_shardings({"mystery": np.zeros((4, 4))}, _mesh(1, 1, 1))
    with pytest.raises(ValueError, match="w_in"):
        sharding.tree_shardings({"mlp": {"w_in": np.zeros((4, 4, 4, 4))}}, _mesh(1, 1, 1))


@pytest.mark.parametrize("text, message", [
    ("data=2,pipeline=2", "pipeline"), ("data=0", "positive"), ("data=2,data=2", "twice"),
    ("fsdp", "AXIS=SIZE"), ("tensor=x", "positive"),
])
def test_bad_mesh_specs_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        sharding.parse_mesh(text)


def test_parse_mesh():
    assert sharding.parse_mesh("data=2, tensor=4") == {"data": 2, "fsdp": 1, "tensor": 4}


def test_make_mesh_refuses_the_wrong_device_count():
    with pytest.raises(ValueError, match=r"data=2 x fsdp=1 x tensor=2 = 4 devices, but 1"):
        jaxdec.make_mesh(data=2, tensor=2)
    with pytest.raises(ValueError, match="fsdp"):
        jaxdec.make_mesh(fsdp=0)
    mesh = jaxdec.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3


@pytest.mark.slow  # compiles a sharded and a plain train step
def test_one_device_mesh_trains_like_no_mesh():
    mc = jaxdec.DecoderConfig(vocab_size=32, num_layers=1, d_model=16, num_heads=2, max_len=16)
    tc = jaxdec.TrainConfig(warmup_steps=0, decay_steps=10)
    tokens = np.random.default_rng(0).integers(0, 32, (4, 9)).astype(np.int32)
    mesh = jaxdec.make_mesh()
    assert sharding.process_rows(4, mesh) == slice(0, 4)
    losses = []
    for m in (None, mesh):
        state = jaxdec.create_train_state(mc, tc, jax.random.key(0), mesh=m)
        batch = {"tokens": tokens} if m is None else jaxdec.shard_batch({"tokens": tokens}, m)
        state, metrics = jaxdec.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_devices_cannot_change_after_jax_started():
    jax.devices()
    with pytest.raises(ValueError, match="before JAX starts"):
        sharding.init_devices(num_cpu_devices=jax.local_device_count() + 1)
    with pytest.raises(ValueError, match="missing"):
        sharding.init_devices(coordinator_address="localhost:1234")
    with pytest.raises(ValueError, match="process_id"):
        sharding.init_devices(coordinator_address="localhost:1234", num_processes=2, process_id=2)


@pytest.mark.slow  # eight simulated devices in a subprocess, a compile per mesh; CI runs it
def test_eight_simulated_devices():
    """Train parity on 4 meshes, specs, per-device bytes, the guard, checkpoints across meshes."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_checks.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "all sharded checks passed" in proc.stdout
