"""Tiny random Hugging Face decoders of the modern families, for tests/test_families.py.

Every case is a transformers config built through its config class (so `save_pretrained` writes
whatever shape transformers writes: v5's `rope_parameters`, `layer_types`, ...), an eager-attention
float32 model whose every parameter is re-randomised (`rerandomise`), saved with `save_pretrained`
(safetensors) for `jaxdec.hf.load_checkpoint` to read. `to_v4_config` rewrites a saved config.json
into the transformers v4 shape (`rope_theta` + `rope_scaling` with "type", no `layer_types`).

Interactive use (e.g. to debug one family):

    import sys; sys.path.insert(0, "tests")
    import hf_families
    hf = hf_families.make_model("gemma2"); hf.save_pretrained("/tmp/g2")
"""

from __future__ import annotations

import json
import math
import os
import re

import torch
import transformers

# hidden 64, 4 heads of 24 (!= 64 / 4) over 2 K/V heads, MLP 96, a vocabulary of 256, positions
# well past the 300-token sequences of the tests.
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=1024,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
TIED_GAIN = 8.0  # see rerandomise
WINDOW = 8  # every sliding window: far shorter than the prompts, so it always matters

# Norms HF computes as x̂ * (1 + w): their identity is w = 0.
GEMMA_NORMS = ("gemma", "gemma2", "gemma3_text")

# name -> (model_type, config kwargs over BASE, seed). Seeds chosen so that HF's greedy
# continuations of the tests' prompts vary (>= 8 distinct of 32 per row) and their top-2 logit
# gaps stay >= 3e-3, far above float32 noise.
CASES: dict[str, tuple[str, dict, int]] = {
    # Llama 3.1's RoPE bands: wavelengths 16..64 (original 64 / 4 .. 64 / 1) blend, longer ones / 8.
    "llama": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)), 3),
    # Biases on q, k, v, o and the MLP; a tied head; 3 layers; linear RoPE scaling (positions / 2).
    "llama_bias": ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                                 num_hidden_layers=3,
                                 rope_parameters=dict(rope_type="linear", rope_theta=5e5, factor=2.0)), 4),
    # A window on every layer.
    "mistral": ("mistral", dict(sliding_window=WINDOW), 5),
    # q/k/v biases; use_sliding_window=False (its sliding_window is ignored: see `make_folder`);
    # YaRN as Qwen2.5 long-context configs: ramp between the beta_fast / beta_slow correction
    # dims, cos/sin * (0.1 ln 4 + 1).
    "qwen2": ("qwen2", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64)), 6),
    # Only layers >= max_window_layers slide: layer 0 full, layers 1 and 2 windowed.
    "qwen2_swa": ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                num_hidden_layers=3), 7),
    # Per-head q/k RMSNorm; head_dim 32 != 64 / 4; tied.
    "qwen3": ("qwen3", dict(head_dim=32, tie_word_embeddings=True), 41),
    # (1 + w) norms, tanh-GELU, sqrt(D) embedding scale, tied.
    "gemma": ("gemma", dict(hidden_act="gelu_pytorch_tanh"), 23),
    # Sandwich norms, soft-caps small enough to bite, 1/sqrt(20) score scale (head_dim 24), a window
    # on layers 0 and 2.
    "gemma2": ("gemma2", dict(num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=20,
                              attn_logit_softcapping=5.0, final_logit_softcapping=10.0), 10),
    # Windowed local layers 0 and 2 (RoPE base 1e4), a global layer 1 (base 1e6, linear factor 2).
    "gemma3_text": ("gemma3_text", dict(
        num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=20,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1e6),
                         "sliding_attention": dict(rope_type="default", rope_theta=1e4)}), 13),
    # No pre-norms; q/k RMSNorm over the whole projection.
    "olmo2": ("olmo2", dict(), 12),
    # Fused qkv_proj and gate_up_proj; half of each head rotated (partial rotary); a window on
    # every layer.
    "phi3": ("phi3", dict(sliding_window=WINDOW, rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)), 14),
}

CONFIG_CLASSES = {
    "llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
    "gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config,
    "gemma3_text": transformers.Gemma3TextConfig, "olmo2": transformers.Olmo2Config,
    "phi3": transformers.Phi3Config,
}
MODEL_CLASSES = {
    "llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
    "gemma": transformers.GemmaForCausalLM, "gemma2": transformers.Gemma2ForCausalLM,
    "gemma3_text": transformers.Gemma3ForCausalLM, "olmo2": transformers.Olmo2ForCausalLM,
    "phi3": transformers.Phi3ForCausalLM,
}

# SmolLM2-135M's shape (DESIGN.md §3), random weights.
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               rope_parameters=dict(rope_type="default", rope_theta=1e5),
               rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192,
               bos_token_id=1, eos_token_id=2, pad_token_id=2)


def make_config(model_type: str, **overrides):
    kwargs = {**BASE, **overrides}
    if model_type == "gemma3_text" and "layer_types" not in kwargs:
        kwargs.setdefault("sliding_window_pattern", 2)
    return CONFIG_CLASSES[model_type](**kwargs)


def rerandomise(model, model_type: str, seed: int) -> None:
    """Every parameter re-drawn: norm weights around their identity (0 for Gemma's (1 + w), else
    1) +- 0.1, biases N(0, 0.1), matrices N(0, 1/in), embeddings N(0, 1) (Gemma: N(0, 1/D), as
    it multiplies them by sqrt(D)). Scaled so that the greedy continuations vary and the attention
    is neither uniform nor one-hot.

    A tied head scores the residual stream against the embeddings, and a random model whose
    stream is mostly its input embedding predicts its input token forever. Tied models therefore
    get sublayer outputs TIED_GAIN times larger: o_proj / down_proj times TIED_GAIN, or where a
    norm follows the sublayer (Gemma 2 / 3's post_attention / post_feedforward norms) those norms
    around TIED_GAIN instead of 1."""
    gen = torch.Generator().manual_seed(seed)
    gemma = model_type in GEMMA_NORMS
    hidden = model.config.hidden_size
    gain = TIED_GAIN if model.config.tie_word_embeddings else 1.0
    sandwich = model_type in ("gemma2", "gemma3_text")
    seen = set()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in seen:  # a tied head is the embedding
                continue
            seen.add(id(p))
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "norm" in name:
                center = gain if sandwich and re.search(r"post_(attention|feedforward)_layernorm", name) else 1.0
                p.copy_(center - (1.0 if gemma else 0.0) + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name or name == "lm_head.weight":
                p.copy_(noise / (math.sqrt(hidden) if gemma else 1.0))
            else:
                assert p.ndim == 2, name
                out = gain if not sandwich and re.search(r"(o_proj|down_proj)\.weight$", name) else 1.0
                p.copy_(out * noise / math.sqrt(p.shape[1]))


def make_model(case: str):
    """The eval-mode float32 HF model of CASES[case]."""
    model_type, overrides, seed = CASES[case]
    return build(model_type, make_config(model_type, **overrides), seed)


def build(model_type: str, config, seed: int):
    torch.manual_seed(seed)
    model = MODEL_CLASSES[model_type]._from_config(config, attn_implementation="eager",
                                                   dtype=torch.float32)
    rerandomise(model, model_type, seed)
    return model.float().eval()


def make_folder(model, folder) -> None:
    """save_pretrained (safetensors), then what released configs add: Qwen2 configs carry a
    sliding_window value while use_sliding_window is false (it must be ignored)."""
    model.save_pretrained(folder)
    cfg = read_config(folder)
    if cfg["model_type"] in ("qwen2", "qwen3") and not cfg.get("use_sliding_window"):
        cfg["sliding_window"] = WINDOW
        write_config(folder, cfg)


def read_config(folder) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def write_config(folder, cfg: dict) -> None:
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def to_v4_config(cfg: dict) -> dict:
    """A v5 config.json dict rewritten as transformers v4 wrote it: `rope_theta` (Gemma 3 also
    `rope_local_base_freq`) + `rope_scaling` with the old "type" key, no `rope_parameters`, and
    no `layer_types` (Gemma 3: `sliding_window_pattern` instead; Qwen2 then relies on
    use_sliding_window / max_window_layers; Gemma 2 on its even-layer rule)."""
    cfg = dict(cfg)
    rope = cfg.pop("rope_parameters")
    layer_types = cfg.pop("layer_types", None)
    if cfg["model_type"] == "gemma3_text":
        full, local = rope["full_attention"], rope["sliding_attention"]
        cfg["rope_theta"] = full["rope_theta"]
        cfg["rope_local_base_freq"] = local["rope_theta"]
        assert local["rope_type"] == "default", local
        scaling = {k: v for k, v in full.items() if k not in ("rope_theta", "rope_type")}
        cfg["rope_scaling"] = {"type": full["rope_type"], **scaling} if full["rope_type"] != "default" else None
        pattern = layer_types.index("full_attention") + 1
        assert layer_types == ["sliding_attention" if (i + 1) % pattern else "full_attention"
                               for i in range(len(layer_types))], layer_types
        cfg["sliding_window_pattern"] = pattern
    else:
        cfg["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
        cfg["rope_scaling"] = {"type": rope["rope_type"], **scaling} if rope["rope_type"] != "default" else None
    return cfg
