"""Modern decoder families (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, OLMo 2) read by
`jaxdec.hf.load_checkpoint` against the Hugging Face models that wrote them.

Each case of `hf_families.CASES` is a tiny random model (head_dim != D / N, grouped K/V heads,
every parameter re-randomised, norms around their identity, biases non-zero, sliding windows of
8, RoPE scalings) saved with `save_pretrained` as transformers 5 writes it, then loaded through
the real loader. Checks, with the tolerance each states:
  (a) `jaxdec.forward` logits == HF's (eval, eager attention) at every real position of a
      right-padded batch with rows of 300, 123 and 9 tokens: past 256 positions, past the
      original context of the RoPE scalings and far past every window.
  (b) `jaxdec.generate` greedy == HF `generate(do_sample=False)` on left-padded prompts of 261,
      5 and 20 tokens, 32 new tokens each, per-step logits included.
  (c) jaxdec cached == uncached (`use_cache=False`) generation.
  (v4) a config.json in transformers v4's shape (`rope_theta` + `rope_scaling` with "type", no
      `layer_types`) loads to the same model.
  (e) an unknown model_type, a missing tensor and a misshapen tensor raise ValueError naming them.
  (slow) a random model of SmolLM2-135M's full shape: logits at 256 positions, 32 greedy tokens.

Greedy tokens may differ between two correct float32 implementations only at a near tie: where a
token differs, the reference's top-1 / top-2 logit gap at that step is reported, and the test
passes (with a warning saying so) only when that gap is below NEAR_TIE.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import warnings

import jax
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub read it
torch = pytest.importorskip("torch", reason="HF interop tests need torch (pip install torch)")
transformers = pytest.importorskip(
    "transformers", reason="HF interop tests need transformers (pip install transformers)")
pytest.importorskip("safetensors", reason="checkpoint folders need safetensors")

import hf_families  # noqa: E402  (tests/ is on sys.path under pytest's default import mode)
import jaxdec  # noqa: E402
import jaxdec.hf  # noqa: E402
from jaxdec.config import DecoderConfig  # noqa: E402

torch.set_num_threads(1)  # tiny models: 2 threads fight XLA's pool (see test_convert.py)
transformers.logging.set_verbosity_error()

CASES = list(hf_families.CASES)
MAX_NEW = 32
PAD = hf_families.BASE["pad_token_id"]
# (a) one row past 256 positions (RoPE bugs hide in short prompts), one between, one just past
# the window of 8.
LOGIT_LENGTHS = np.array([300, 123, 9], np.int32)
# (b), (c): prompts past 256, shorter than the window, and past it.
PROMPT_LENGTHS = np.array([261, 5, 20], np.int32)

# (a) |ours - HF| at every real position. HF's own float32 logits are within 2.2e-5 of a float64
# run of the same weights at these scales (|logits| up to ~40), so 1e-4 allows float32 noise.
LOGITS_ATOL = 1e-4
# (b) per-step logits of generate, and (c) cached against uncached: the cached path sums the
# same terms over other shapes (one query row against a cache), so its rounding differs more.
STEP_LOGITS_ATOL = 2e-4
# A differing greedy token is accepted only where the reference's top-2 logit gap at that step
# is below this (a float32 near tie); far above the logit differences allowed above.
NEAR_TIE = 1e-3


# --- models, folders, inputs --------------------------------------------------------------------


@dataclasses.dataclass
class Family:
    case: str
    model_type: str
    hf: object  # the transformers model, eval, float32
    folder: str  # its save_pretrained folder

    @functools.cached_property
    def ckpt(self):
        return jaxdec.hf.load_checkpoint(self.folder)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """family(case) -> Family, each built and saved once per module (loaded on first use)."""
    built: dict[str, Family] = {}

    def get(case: str) -> Family:
        if case not in built:
            hf = hf_families.make_model(case)
            folder = str(tmp_path_factory.mktemp(case))
            hf_families.make_folder(hf, folder)
            built[case] = Family(case, hf_families.CASES[case][0], hf, folder)
        return built[case]

    return get


def _right_padded(lengths, vocab, seed):
    """Random ids in [3, vocab - 1) (never a special id), right-padded with PAD: int32 [B, max]."""
    width = int(max(lengths))
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab - 1, (len(lengths), width)).astype(np.int32)
    real = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
    return np.where(real, ids, PAD).astype(np.int32), real


def _left_pad(ids, lengths):
    """Right-padded rows -> HF's left padding (input_ids, attention_mask) as torch tensors."""
    width = ids.shape[1]
    left = np.full_like(ids, PAD)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        left[b, width - n:] = ids[b, :n]
        mask[b, width - n:] = 1
    return torch.tensor(left, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def _hf_logits(hf, tokens, real):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                  attention_mask=torch.tensor(real, dtype=torch.long)).logits.numpy()


def _hf_greedy(hf, prompts, lengths, max_new=MAX_NEW):
    """HF greedy on the left-padded prompts: (tokens [B, max_new], per-step logits [B, max_new, V])."""
    input_ids, mask = _left_pad(prompts, lengths)
    with torch.no_grad():
        out = hf.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                          max_new_tokens=max_new, min_new_tokens=None, eos_token_id=None,
                          pad_token_id=PAD, repetition_penalty=1.0, no_repeat_ngram_size=0,
                          bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
                          forced_bos_token_id=None, forced_eos_token_id=None, temperature=None,
                          top_k=None, top_p=None, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[:, prompts.shape[1]:].numpy()
    assert tokens.shape == (len(lengths), max_new), "HF stopped early: an eos was applied"
    return tokens, torch.stack(out.logits, 1).numpy()


# --- reports ------------------------------------------------------------------------------------


def _logits_report(ours, theirs, real, atol) -> str:
    """Max abs error and where, and per row the first real position whose error exceeds atol."""
    err = np.where(real[..., None], np.abs(ours - theirs), 0.0)
    b, t, v = np.unravel_index(np.argmax(err), err.shape)
    lines = [f"max abs error {err.max():.3e} at row {b} position {t} (token id {v}); "
             f"|HF logits| up to {np.abs(theirs[real]).max():.1f}; tolerance atol={atol:g}"]
    per_pos = err.max(-1)
    for row in range(err.shape[0]):
        bad = np.flatnonzero(per_pos[row] > atol)
        n = int(real[row].sum())
        first = (f"first position over tolerance {bad[0]} (error there {per_pos[row, bad[0]]:.2e})"
                 if bad.size else "all within")
        lines.append(f"  row {row} (length {n}): max {per_pos[row, :n].max():.2e}, {first}")
    return "\n".join(lines)


def _assert_logits_close(what, ours, theirs, real, atol=LOGITS_ATOL):
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != {theirs.shape}"
    assert np.isfinite(theirs[real]).all(), f"{what}: the reference has non-finite logits"
    ok = np.isfinite(ours[real]).all() and np.abs(ours[real] - theirs[real]).max() <= atol
    assert ok, f"{what}: logits differ\n" + _logits_report(ours, theirs, real, atol)


def _top2_gap(logits_row) -> float:
    top2 = np.sort(logits_row)[-2:]
    return float(top2[1] - top2[0])


def _compare_greedy(what, ours, theirs, ref_logits):
    """Per row, the steps whose tokens are comparable (up to and including the first divergence).

    Fails where a token differs and the reference's top-2 gap there is >= NEAR_TIE; warns (the test
    passes on a float32 near tie) where it is below."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, f"{what}: tokens shape {ours.shape} != {theirs.shape}"
    steps, failures = [], []
    for b in range(ours.shape[0]):
        diff = np.flatnonzero(ours[b] != theirs[b])
        if not diff.size:
            steps.append(ours.shape[1])
            continue
        s = int(diff[0])
        steps.append(s + 1)
        gap = _top2_gap(ref_logits[b, s])
        msg = (f"{what}: row {b} first differs at new token {s}: ours {ours[b, s]} vs reference "
               f"{theirs[b, s]}; reference top-2 logit gap there {gap:.3e} (near-tie bound {NEAR_TIE:g}); "
               f"ours {ours[b, :s + 1].tolist()} reference {theirs[b, :s + 1].tolist()}")
        if gap < NEAR_TIE:
            warnings.warn(f"passing on a float32 near tie: {msg}")
        else:
            failures.append(msg)
    assert not failures, "\n".join(failures)
    return steps


def _assert_varied(what, tokens, min_distinct=6):
    """Guards the test's meaning: a model repeating one token would match trivially."""
    for row in np.asarray(tokens):
        assert len(set(row.tolist())) >= min_distinct, f"{what}: degenerate reference output {row}"


def _assert_step_logits_close(what, ours, theirs, steps, atol=STEP_LOGITS_ATOL):
    """Per-step logits over each row's comparable steps (its tokens fed so far were equal)."""
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape, f"{what}: logits shape {ours.shape} != {theirs.shape}"
    real = np.arange(ours.shape[1])[None, :] < np.asarray(steps)[:, None]
    ok = np.isfinite(ours[real]).all() and np.abs(ours[real] - theirs[real]).max() <= atol
    assert ok, (f"{what}: per-step logits differ (position = new-token index)\n"
                + _logits_report(ours, theirs, real, atol))


# --- (a) logits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_logits_match_hf_on_padded_batch(family, case):
    """(a) Every real position of rows of 300, 123, 9 tokens within 1e-4 abs of HF (eager, fp32)."""
    fam = family(case)
    ckpt = fam.ckpt
    assert ckpt.model_type == fam.model_type
    assert isinstance(ckpt.config, DecoderConfig)
    assert ckpt.config.vocab_size == fam.hf.config.vocab_size
    tokens, real = _right_padded(LOGIT_LENGTHS, ckpt.config.vocab_size, seed=1)
    theirs = _hf_logits(fam.hf, tokens, real)
    ours = jaxdec.forward(ckpt.params, ckpt.config, tokens, LOGIT_LENGTHS)
    _assert_logits_close(f"{case} forward", ours, theirs, real)
    assert np.abs(theirs[real]).max() > 3.0  # logits of a real scale, not all ~0


@pytest.mark.parametrize("case", CASES)
def test_loaded_params_have_init_params_tree(family, case):
    """The loaded tree and shapes are exactly what `jaxdec.init_params(config)` builds (so a
    loaded model trains and decodes like a fresh one of the same config)."""
    ckpt = family(case).ckpt
    ref = jax.eval_shape(lambda k: jaxdec.init_params(ckpt.config, k), jax.random.key(0))
    assert jax.tree.structure(ckpt.params) == jax.tree.structure(ref)
    leaves = jax.tree_util.tree_leaves_with_path(ckpt.params)
    bad = [(jax.tree_util.keystr(path), tuple(np.shape(a)), tuple(r.shape))
           for (path, a), r in zip(leaves, jax.tree.leaves(ref)) if tuple(np.shape(a)) != tuple(r.shape)]
    assert not bad, f"{case}: loaded shape != init_params shape: {bad}"


@pytest.mark.parametrize("case", ["llama", "gemma2", "qwen3"])
def test_special_ids(family, case):
    """eos / bos / pad as config.json and generation_config.json give them."""
    fam = family(case)
    special = fam.ckpt.special
    assert special.eos_id == hf_families.BASE["eos_token_id"], special
    assert special.bos_id == hf_families.BASE["bos_token_id"], special
    assert special.pad_id == hf_families.BASE["pad_token_id"], special


# --- (b) greedy == HF generate; (c) cached == uncached ------------------------------------------


@pytest.mark.slow  # transformers' generate of 32 tokens on every family
@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_hf_generate(family, case):
    """(b) 32 greedy tokens: jaxdec on right-padded prompts + lengths, HF on the same prompts
    left-padded. Tokens identical (a differing token only at a reference top-2 gap < 1e-3, with a
    warning); per-step logits within 2e-4 abs up to each row's first differing token."""
    fam = family(case)
    ckpt = fam.ckpt
    prompts, _ = _right_padded(PROMPT_LENGTHS, ckpt.config.vocab_size, seed=2)
    theirs, their_logits = _hf_greedy(fam.hf, prompts, PROMPT_LENGTHS)
    _assert_varied(case, theirs)
    ours = jaxdec.generate(ckpt.params, ckpt.config, prompts, PROMPT_LENGTHS, max_new_tokens=MAX_NEW,
                           eos_id=None, pad_id=PAD, return_logits=True)
    steps = _compare_greedy(f"{case} generate vs HF", ours.tokens, theirs, their_logits)
    _assert_step_logits_close(f"{case} generate vs HF", ours.logits, their_logits, steps)


# One case per family (every window layout); the other cases' decode paths are covered by (b).
UNCACHED_CASES = [c for c in CASES if c not in ("llama_bias", "qwen2")]


@pytest.mark.slow  # two decode programs per family
@pytest.mark.parametrize("case", UNCACHED_CASES)
def test_cached_equals_uncached(family, case):
    """(c) Cached generate == the uncached baseline (use_cache=False): tokens identical (or a
    near tie, gap < 1e-3, warned), per-step logits within 2e-4 abs."""
    fam = family(case)
    ckpt = fam.ckpt
    prompts, _ = _right_padded(PROMPT_LENGTHS, ckpt.config.vocab_size, seed=2)
    cached, uncached = (jaxdec.generate(ckpt.params, ckpt.config, prompts, PROMPT_LENGTHS,
                                        max_new_tokens=MAX_NEW, pad_id=PAD, return_logits=True,
                                        use_cache=use_cache) for use_cache in (True, False))
    steps = _compare_greedy(f"{case} cached vs uncached", cached.tokens, uncached.tokens,
                            np.asarray(uncached.logits))
    _assert_step_logits_close(f"{case} cached vs uncached", cached.logits, np.asarray(uncached.logits), steps)


# --- (v4) config.json in transformers v4's shape ------------------------------------------------

V4_CASES = [
    ("llama", "rope_type"),  # llama3 scaling, spelled as Llama 3.1's config.json does
    ("llama_bias", "type"),  # linear
    ("qwen2", "type"),  # yarn
    ("mistral", "type"),
    ("qwen2_swa", "type"),  # no layer_types: use_sliding_window + max_window_layers decide
    ("gemma2", "type"),  # no layer_types: even layers slide
    # sliding_window_pattern, rope_local_base_freq, rope_scaling spelled as Gemma 3's released
    # configs do ("rope_type": transformers 5.25 reads Gemma 3's {"type": "linear"} as default RoPE).
    ("gemma3_text", "rope_type"),
]


@pytest.mark.parametrize("case,type_key", V4_CASES)
def test_v4_config_json_loads_to_the_same_logits(family, case, type_key, tmp_path):
    """The same weights with config.json rewritten in v4's shape: HF reads it to the same logits
    (bitwise: proves the rewrite means the same model), and jaxdec's logits are within 1e-4 abs
    of HF's, as for the v5 folder."""
    fam = family(case)
    shutil.copytree(fam.folder, tmp_path, dirs_exist_ok=True)
    cfg = hf_families.to_v4_config(hf_families.read_config(fam.folder))
    if type_key == "rope_type" and cfg.get("rope_scaling"):
        cfg["rope_scaling"]["rope_type"] = cfg["rope_scaling"].pop("type")
    hf_families.write_config(tmp_path, cfg)
    assert "rope_parameters" not in cfg and "layer_types" not in cfg and "rope_theta" in cfg
    tokens, real = _right_padded(LOGIT_LENGTHS, cfg["vocab_size"], seed=1)
    theirs = _hf_logits(fam.hf, tokens, real)
    hf_v4 = hf_families.MODEL_CLASSES[fam.model_type].from_pretrained(
        str(tmp_path), attn_implementation="eager", dtype=torch.float32).eval()
    np.testing.assert_array_equal(_hf_logits(hf_v4, tokens, real)[real], theirs[real],
                                  err_msg=f"{case}: the v4 rewrite means another model to HF (test bug)")
    ckpt = jaxdec.hf.load_checkpoint(str(tmp_path))
    v5_config = fam.ckpt.config
    same = "equal to" if ckpt.config == v5_config else f"different from the v5 folder's {v5_config}:"
    ours = jaxdec.forward(ckpt.params, ckpt.config, tokens, LOGIT_LENGTHS)
    _assert_logits_close(f"{case} v4 config.json (config {same} {ckpt.config})", ours, theirs, real)


# --- (e) errors through load_checkpoint ---------------------------------------------------------


def _copy_with_tensors(fam, dest, edit):
    """fam's folder copied to dest with model.safetensors rewritten as edit(tensors)."""
    import safetensors.torch

    shutil.copytree(fam.folder, dest, dirs_exist_ok=True)
    path = os.path.join(dest, "model.safetensors")
    tensors = safetensors.torch.load_file(path)
    tensors = edit(dict(tensors))
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})


def test_unknown_model_type_lists_the_supported_ones(family, tmp_path):
    fam = family("llama")
    shutil.copytree(fam.folder, tmp_path, dirs_exist_ok=True)
    hf_families.write_config(tmp_path, {**hf_families.read_config(fam.folder), "model_type": "falcon_mamba"})
    with pytest.raises(ValueError) as info:
        jaxdec.hf.load_checkpoint(str(tmp_path))
    message = str(info.value)
    for name in ("falcon_mamba", "llama", "gemma2"):
        assert name in message, f"{name!r} not in the error: {message}"


# Tensors a lax loader could default silently (a q/k norm, a bias, Gemma 2's extra norms).
MISSING = [
    ("llama", "model.layers.1.mlp.up_proj.weight"),
    ("llama_bias", "model.layers.2.self_attn.o_proj.bias"),
    ("qwen2", "model.layers.0.self_attn.k_proj.bias"),
    ("qwen3", "model.layers.1.self_attn.q_norm.weight"),
    ("gemma2", "model.layers.2.pre_feedforward_layernorm.weight"),
    ("olmo2", "model.layers.0.self_attn.k_norm.weight"),
    ("llama", "lm_head.weight"),  # an untied head
]


@pytest.mark.parametrize("case,name", MISSING)
def test_missing_tensor_is_named(family, case, name, tmp_path):
    fam = family(case)
    _copy_with_tensors(fam, tmp_path, lambda t: {k: v for k, v in t.items() if k != name})
    short = name.removeprefix("model.")
    with pytest.raises(ValueError, match=re.escape(short)):
        jaxdec.hf.load_checkpoint(str(tmp_path))


MISSHAPEN = [
    ("llama", "model.layers.0.self_attn.k_proj.weight", (40, 64)),  # expected (48, 64)
    ("gemma3_text", "model.layers.1.self_attn.q_norm.weight", (32,)),  # expected (24,)
    ("olmo2", "model.layers.1.self_attn.q_norm.weight", (24,)),  # expected (96,): whole projection
    ("llama_bias", "model.layers.0.mlp.gate_proj.bias", (95,)),  # expected (96,)
]


@pytest.mark.parametrize("case,name,shape", MISSHAPEN)
def test_misshapen_tensor_is_named(family, case, name, shape, tmp_path):
    fam = family(case)
    _copy_with_tensors(fam, tmp_path, lambda t: {**t, name: torch.zeros(shape)})
    short = name.removeprefix("model.")
    with pytest.raises(ValueError, match=re.escape(short)):
        jaxdec.hf.load_checkpoint(str(tmp_path))


# --- (d) SmolLM2-135M's full shape, random weights ----------------------------------------------


@pytest.mark.slow
def test_smollm2_shape_matches_hf(tmp_path):
    """30 layers, D 576, 9 / 3 heads, vocab 49,152, tied, RoPE base 1e5: logits within 1e-3 abs
    of HF at every real position of rows of 256 and 100 tokens (deeper, wider: more float32
    rounding than the tiny cases), and 32 identical greedy tokens (near-tie rule as above)."""
    config = hf_families.make_config("llama", **hf_families.SMOLLM2)
    hf = hf_families.build("llama", config, seed=0)
    hf_families.make_folder(hf, tmp_path)
    ckpt = jaxdec.hf.load_checkpoint(str(tmp_path))
    assert ckpt.model_type == "llama" and ckpt.config.vocab_size == 49152
    lengths = np.array([256, 100], np.int32)
    tokens, real = _right_padded(lengths, 49152, seed=3)
    theirs = _hf_logits(hf, tokens, real)
    ours = jaxdec.forward(ckpt.params, ckpt.config, tokens, lengths)
    _assert_logits_close("smollm2 forward", ours, theirs, real, atol=1e-3)
    prompts, _ = _right_padded(np.array([200, 17], np.int32), 49152, seed=4)
    lengths = np.array([200, 17], np.int32)
    theirs, their_logits = _hf_greedy(hf, prompts, lengths)
    _assert_varied("smollm2", theirs)
    ours = jaxdec.generate(ckpt.params, ckpt.config, prompts, lengths, max_new_tokens=MAX_NEW,
                           pad_id=PAD, return_logits=True)
    steps = _compare_greedy("smollm2 generate vs HF", ours.tokens, theirs, their_logits)
    _assert_step_logits_close("smollm2 generate vs HF", ours.logits, their_logits, steps, atol=2e-3)
