"""jaxdec.hf.export: params written as a Hugging Face folder load back into jaxdec with identical
logits, into transformers with the same logits (1e-4), and a config the chosen family cannot
express is refused before anything is written."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import jaxdec
import tiny_pretrained
from jaxdec.config import RopeScaling
from jaxdec.hf import load_checkpoint
from jaxdec.hf.cli import folder_chat_template, load_tokenizer
from jaxdec.hf.export import config_differences, export_folder, hf_config

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")


def _tokens(cfg, B=2, T=40, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)


CASES = {
    "llama_tied_gqa": ("llama", tiny_pretrained.config()),
    "llama_untied_biases_llama3_rope": ("llama", tiny_pretrained.config(
        tie_embeddings=False, qkv_bias=True, out_bias=True, mlp_bias=True,
        rope_scaling=RopeScaling("llama3", 8.0, original_max_len=64, low_freq_factor=1.0,
                                        high_freq_factor=4.0))),
    "qwen2_qkv_bias": ("qwen2", tiny_pretrained.config(qkv_bias=True, out_bias=False)),
    "qwen3_head_norm": ("qwen3", tiny_pretrained.config(qk_norm="head")),
    "mistral_window": ("mistral", tiny_pretrained.config(sliding_window=8)),
}


# Two cases by default (tied GQA; q/k/v split with biases); the rest compile more programs (slow).
_DEFAULT = ("llama_tied_gqa", "qwen2_qkv_bias")
_SLOW = pytest.mark.slow  # why: one more compiled forward per case (the default suite has its time budget)


@pytest.mark.parametrize("case", [c if c in _DEFAULT else pytest.param(c, marks=_SLOW) for c in CASES])
def test_export_then_import_gives_identical_params_and_logits(tmp_path, case):
    model_type, cfg = CASES[case]
    params = tiny_pretrained.params(cfg)
    export_folder(tmp_path, params, cfg, model_type=model_type, tokenizer=tiny_pretrained.tokenizer(),
                  chat_template=tiny_pretrained.CHAT_TEMPLATE, eos_id=tiny_pretrained.EOS, bos_id=257, pad_id=256)
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt.model_type == model_type and not config_differences(ckpt.config, cfg)
    assert ckpt.special.eos_id == tiny_pretrained.EOS and ckpt.special.pad_id == 256
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ckpt.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b))
    tokens = _tokens(cfg)
    lengths = np.full((2,), tokens.shape[1], np.int32)
    np.testing.assert_array_equal(np.asarray(jaxdec.forward(params, cfg, tokens, lengths)),
                                  np.asarray(jaxdec.forward(ckpt.params, ckpt.config, tokens, lengths)))
    # The folder stands alone: its tokenizer and chat template load as jaxdec reads any folder.
    tok = load_tokenizer(str(tmp_path), model_type)
    assert tok.encode("hé") == [104, 195, 169]
    assert folder_chat_template(str(tmp_path)) == tiny_pretrained.CHAT_TEMPLATE


@pytest.mark.slow  # why: imports torch and transformers and builds their models (the default suite has its time budget)
def test_transformers_loads_the_exported_folder_with_the_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for case in ("llama_untied_biases_llama3_rope", "qwen3_head_norm"):
        model_type, cfg = CASES[case]
        params = tiny_pretrained.params(cfg, seed=3)
        folder = tmp_path / case
        export_folder(folder, params, cfg, model_type=model_type, tokenizer=tiny_pretrained.tokenizer())
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert model.config.model_type == model_type
        tokens = _tokens(cfg, T=100)  # past original_max_len=64 of the llama3 scaling
        with torch.no_grad():
            theirs = model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
        ours = np.asarray(jaxdec.forward(params, cfg, tokens, np.full((2,), 100, np.int32)))
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
        fast = transformers.AutoTokenizer.from_pretrained(folder)
        assert fast("hé").input_ids == [104, 195, 169]


@pytest.mark.parametrize("model_type, overrides, match", [
    ("llama", dict(qkv_bias=True, out_bias=False), "out_bias"),
    ("llama", dict(sliding_window=8), "sliding_window"),
    ("llama", dict(norm="rms_plus_one"), "norm"),
    ("qwen2", dict(qkv_bias=False), "qkv_bias"),
    ("gemma", {}, "gemma"),
])
def test_configs_the_family_cannot_express_are_refused_before_writing(tmp_path, model_type, overrides, match):
    cfg = tiny_pretrained.config(**overrides)
    with pytest.raises(ValueError, match=match):
        export_folder(tmp_path / "out", tiny_pretrained.params(cfg), cfg, model_type=model_type)
    assert not os.path.exists(tmp_path / "out")


def test_config_json_names_what_transformers_needs():
    cfg = hf_config(tiny_pretrained.config(), "llama", eos_id=2, bos_id=1, pad_id=2)
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (32, 4, 2, 16)
    assert cfg["tie_word_embeddings"] is True and cfg["eos_token_id"] == 2
    json.dumps(cfg)
