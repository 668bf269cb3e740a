"""Checks on 8 simulated CPU devices, run by tests/test_sharding.py in a fresh process.

    JAX_NUM_CPU_DEVICES=8 python tests/sharded_checks.py

The device count must be fixed before JAX starts, and the pytest process has already started
it with one device, hence a separate script. One process, few compilations (one train step per
mesh), tiny configs. Each check prints "ok: <name>"; the first failure raises.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import jaxdec
from jaxdec import checkpoint, decode, sharding

jax.config.update("jax_numpy_rank_promotion", "raise")

# Divisible by every mesh axis below where a split is meant (V 64, D 32, (N+2K)*H 64, F 64), and
# GQA with 2 KV heads, which tensor=4 cannot split: those stay whole.
MC = jaxdec.DecoderConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                          max_len=32, d_ff=64, tie_embeddings=False, init_std=0.1)
# Accumulation over 2 micro-batches and dropout: both must survive sharding unchanged. Adam's
# eps is raised from 1e-8 to 1e-6: Adam divides each gradient by its own magnitude, so an entry
# whose gradient is rounding noise (the key bias's is exactly zero in exact arithmetic: it adds
# the same score to every key) moves by +-lr with the noise's sign, and a sharded sum rounds
# differently from a one-device sum. With eps 1e-6 such entries move by ~lr * 1e-4 at most.
TC = jaxdec.TrainConfig(learning_rate=1e-3, warmup_steps=0, decay_steps=100, grad_accum_steps=2,
                        dropout=0.1, eps=1e-6)
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
STEPS = 3


def ok(name: str) -> None:
    print(f"ok: {name}", flush=True)


def batch(step: int) -> dict:
    """A pure function of the step: int32 tokens [8, 17] and lengths [8] (some padding)."""
    rng = np.random.default_rng([7, step])
    return {"tokens": rng.integers(0, MC.vocab_size, (8, 17)).astype(np.int32),
            "lengths": np.array([17, 9, 17, 4, 17, 12, 17, 1], np.int32)}


def host(tree):
    return jax.tree.map(np.asarray, tree)


def train(mesh, state=None, first=0, steps=STEPS):
    """(state, losses) after `steps` train steps from `state` (fresh if None)."""
    if state is None:
        state = jaxdec.create_train_state(MC, TC, jax.random.key(0), mesh=mesh)
    losses = []
    for step in range(first, first + steps):
        b = batch(step) if mesh is None else jaxdec.shard_batch(batch(step), mesh)
        state, metrics = jaxdec.train_step(state, b)
        losses.append(float(metrics["loss"]))
    return state, losses


def expected_spec(mesh, axes, shape):
    return sharding.logical_to_spec(axes, shape, mesh, fsdp_fallback=True)


def check_training():
    reference, ref_losses = train(None)
    ref_params = host(reference.params)
    states = {}
    for shape in MESHES:
        mesh = jaxdec.make_mesh(*shape)
        state, losses = train(mesh)
        np.testing.assert_allclose(losses, ref_losses, atol=1e-5, err_msg=f"losses on {shape}")
        worst = 0.0
        for path, got in jax.tree_util.tree_flatten_with_path(state.params)[0]:
            want = ref_params
            for p in path:
                want = want[p.key]
            np.testing.assert_allclose(np.asarray(got), want, atol=1e-5,
                                       err_msg=f"{jax.tree_util.keystr(path)} on {shape}")
            worst = max(worst, float(np.max(np.abs(np.asarray(got) - want))))
        print(f"  {shape}: losses {losses}, params at most {worst:.2e} from one device")
        # Params and optimizer state carry exactly the specs the rules name, after 3 steps.
        for tree in (state.params, state.opt_state):
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                axes = sharding.param_axes(path, leaf.shape)
                assert leaf.sharding.spec == expected_spec(mesh, axes, leaf.shape), (
                    shape, jax.tree_util.keystr(path), leaf.sharding.spec)
        assert state.step.sharding.spec == P() and int(state.step) == STEPS
        states[shape] = state
    ok(f"{STEPS} train steps (accumulation 2, dropout) match one device on {MESHES}")

    # The rules, spelled out on the (2,2,2) and (1,2,4) meshes.
    s222, s124 = states[(2, 2, 2)].params, states[(1, 2, 4)].params
    assert s222["embed"].sharding.spec == P("tensor", "fsdp")
    assert s222["head"].sharding.spec == P("fsdp", "tensor")
    assert s222["layers"]["attn"]["qkv"].sharding.spec == P(None, "fsdp", "tensor")
    assert s222["layers"]["attn"]["out"].sharding.spec == P(None, "tensor", "fsdp")
    assert s222["layers"]["mlp"]["w_in"].sharding.spec == P(None, "fsdp", "tensor")
    assert s222["layers"]["mlp"]["w_out"].sharding.spec == P(None, "tensor", "fsdp")
    assert s222["layers"]["mlp"]["b_in"].sharding.spec == P(None, ("fsdp", "tensor"))
    assert s222["layers"]["attn_norm"]["scale"].sharding.spec == P(None, "fsdp")
    assert s124["layers"]["mlp"]["w_in"].sharding.spec == P(None, "fsdp", "tensor")
    ok("parameter specs: vocab/heads/mlp over tensor, D over fsdp, layers whole")

    held = sharding.bytes_per_device((states[(1, 8, 1)].params, states[(1, 8, 1)].opt_state))
    share = max(held["per_device"].values()) / held["total"]
    assert len(held["per_device"]) == 8 and share < 1.02 / 8, held
    print(f"  fsdp=8: {max(held['per_device'].values())} of {held['total']} bytes per device "
          f"({share:.4f} of the total)")
    ok("fsdp=8 holds about 1/8 of params + optimizer state per device")
    return reference, states


def check_nonfinite_guard(state):
    """A NaN parameter gives a non-finite gradient: the update is skipped, nothing reshards."""
    mesh = state.mesh
    poisoned = np.asarray(state.params["embed"]).copy()
    poisoned[0, 0] = np.nan
    params = dict(state.params, embed=jax.device_put(poisoned, state.params["embed"].sharding))
    state = state.replace(params=params)
    before = host(state.params)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    # Two micro-steps: the second applies the (non-finite) accumulated update, which is skipped.
    for step in range(2):
        state, metrics = jaxdec.train_step(state, jaxdec.shard_batch(batch(10 + step), mesh))
    assert float(metrics["skipped"]) == 1.0, metrics
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.params, before)
    assert jax.tree.map(lambda x: x.sharding, state) == shardings
    ok("non-finite guard skips the update on a mesh; shardings unchanged")


def check_checkpoints():
    """Saved on one mesh, restored onto another: bit-identical, and training continues the same."""
    cases = [(None, (1, 8, 1)), ((2, 2, 2), (8, 1, 1)), ((1, 2, 4), None)]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (src, dst) in enumerate(cases):
            src_mesh = None if src is None else jaxdec.make_mesh(*src)
            dst_mesh = None if dst is None else jaxdec.make_mesh(*dst)
            saved, _ = train(src_mesh, steps=2)
            directory = os.path.join(tmp, str(i))
            checkpoint.save(directory, saved, 2)
            template = jaxdec.create_train_state(MC, TC, jax.random.key(1), mesh=dst_mesh)
            restored, step = checkpoint.restore(directory, template)
            assert step == 2
            for a, b in zip(jax.tree.leaves(_raw(saved)), jax.tree.leaves(_raw(restored))):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert jax.tree.map(lambda x: x.sharding, restored) == jax.tree.map(lambda x: x.sharding, template)
            # The resumed run continues the loss curve of the one that saved.
            _, cont_saved = train(src_mesh, saved, first=2, steps=1)
            _, cont_restored = train(dst_mesh, restored, first=2, steps=1)
            np.testing.assert_allclose(cont_restored, cont_saved, atol=1e-5)
            ok(f"checkpoint {src or 'one device'} -> {dst or 'one device'}: bit-identical, same next loss")


def _raw(state):
    return jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                        else x, state)


def _all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
    """Result shapes of every all-gather in compiled HLO text."""
    shapes = []
    for m in re.finditer(r"= \(?([a-z0-9]+)\[([0-9,]*)\][^=]*? all-gather(?:-start)?\(", hlo):
        shapes.append(tuple(int(d) for d in m.group(2).split(",") if d))
    return shapes


def check_decoding():
    """Greedy tokens on a mesh equal one device's; the compiled loop gathers neither the cache
    nor whole parameters."""
    params = jaxdec.init_params(MC, jax.random.key(5))
    prompts = np.random.default_rng(1).integers(1, MC.vocab_size, (8, 6)).astype(np.int32)
    lengths = np.array([6, 3, 5, 1, 6, 2, 4, 6], np.int32)
    new = 10
    want = np.asarray(jaxdec.generate(params, MC, prompts, lengths, max_new_tokens=new).tokens)
    for shape in [(2, 2, 2), (1, 2, 4)]:
        mesh = jaxdec.make_mesh(*shape)
        placed = jaxdec.shard_params(params, mesh)
        got = jaxdec.generate(placed, MC, prompts, lengths, max_new_tokens=new, mesh=mesh)
        np.testing.assert_array_equal(np.asarray(got.tokens), want, err_msg=f"greedy tokens on {shape}")
        beams, _ = jaxdec.beam_search(placed, MC, prompts, lengths, beam_size=2, max_new_tokens=4, mesh=mesh)
        ref_beams, _ = jaxdec.beam_search(params, MC, prompts, lengths, beam_size=2, max_new_tokens=4)
        np.testing.assert_array_equal(np.asarray(beams.tokens), np.asarray(ref_beams.tokens))
    ok("greedy and beam tokens on (2, 2, 2) and (1, 2, 4) equal one device's")

    # Speculative decoding on a mesh: the per-row write slots are split with the batch.
    for shape in [(2, 2, 2), (1, 2, 4)]:
        mesh = jaxdec.make_mesh(*shape)
        placed = jaxdec.shard_params(params, mesh)
        for draft in (jaxdec.PromptLookup(num_tokens=3), jaxdec.DraftModel(placed, MC, num_tokens=2)):
            got = jaxdec.generate(placed, MC, prompts, lengths, max_new_tokens=new, mesh=mesh, draft=draft)
            np.testing.assert_array_equal(np.asarray(got.tokens), want,
                                          err_msg=f"speculative greedy tokens on {shape} with {type(draft).__name__}")
    ok("speculative greedy tokens (prompt lookup, draft model) on (2, 2, 2) and (1, 2, 4) equal one device's")

    # A cache buffer placed for the mesh, handed from call to call: donated, sharded like the cache.
    mesh = jaxdec.make_mesh(2, 2, 2)
    placed = jaxdec.shard_params(params, mesh)
    buffer = jaxdec.kv_buffer(MC, 8, prompts.shape[1] + new + 3, mesh=mesh)
    for draft in (None, jaxdec.PromptLookup(num_tokens=3)):
        passed = buffer
        got = jaxdec.generate(placed, MC, prompts, lengths, max_new_tokens=new, mesh=mesh, draft=draft, buffer=passed)
        np.testing.assert_array_equal(np.asarray(got.tokens), want, err_msg=f"tokens with a buffer, draft {draft}")
        assert passed.k.is_deleted() and passed.v.is_deleted(), "the buffer was not donated on the mesh"
        assert got.buffer.k.sharding.is_equivalent_to(passed.k.sharding, 5), got.buffer.k.sharding
        buffer = got.buffer
    ok("a kv_buffer on (2, 2, 2): donated, kept its sharding, the same tokens, plain and speculative")

    mesh = jaxdec.make_mesh(2, 2, 2)
    placed = jaxdec.shard_params(params, mesh)
    capacity = prompts.shape[1] + new
    inputs = decode.DecodeInputs(prompts=jnp.asarray(prompts), lengths=jnp.asarray(lengths), source=None,
                                 source_lengths=None, key=jax.random.key(0), eos_id=jnp.asarray(-1, jnp.int32),
                                 pad_id=jnp.asarray(0, jnp.int32))
    options = decode.DecodeOptions(config=MC, max_new_tokens=new, capacity=capacity, mesh=mesh)
    hlo = decode._generate.for_inputs(placed, mesh).lower(placed, inputs, options).compile().as_text()
    cache_shape = (MC.num_layers, 8, MC.kv_heads, capacity, MC.head_dim)
    per_device_cache = (MC.num_layers, 2, 1, capacity, MC.head_dim)
    forbidden = {cache_shape, cache_shape[1:], per_device_cache[1:]}
    # FSDP gathers each layer's weight over fsdp as it is used (that is what it trades memory
    # for); what must never happen is a whole stack of layers, or the tensor-split embedding
    # and head, gathered in one piece.
    forbidden |= {tuple(x.shape) for x in jax.tree.leaves(params["layers"]) if x.ndim >= 3}
    forbidden |= {params["embed"].shape, params["head"].shape}
    gathered = _all_gather_shapes(hlo)
    bad = [s for s in gathered if s in forbidden or (len(s) >= 3 and s[-2:] == (capacity, MC.head_dim))]
    assert not bad, f"all-gathers of cache-sized or whole-parameter operands: {bad}"
    print(f"  decode program on (2, 2, 2): {len(gathered)} all-gathers, shapes {sorted(set(gathered))}")
    ok("compiled decode gathers no cache-sized operand and no whole parameter")


def main() -> None:
    assert jax.device_count() == 8, f"run with JAX_NUM_CPU_DEVICES=8, got {jax.device_count()} devices"
    _, states = check_training()
    check_nonfinite_guard(states[(2, 2, 2)])
    check_checkpoints()
    check_decoding()
    print("all sharded checks passed", flush=True)


if __name__ == "__main__":
    sys.exit(main())
