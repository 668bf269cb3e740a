"""A tiny "pretrained" Llama-style model for the fine-tuning and export tests, made here with no
download: random weights (norms and biases re-randomised too, so no mapping error can hide behind
a ones or zeros tensor) and a byte-level BPE tokenizer with no merges (every UTF-8 byte is one
token) plus SmolLM2's special tokens."""

from __future__ import annotations

import jax
import numpy as np

from jaxdec import DecoderConfig, init_params

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS = 258  # <|im_end|>, as in SmolLM2
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def config(**overrides) -> DecoderConfig:
    base = dict(vocab_size=300, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=16,
                max_len=128, position="rope", norm="rms", mlp="gated", activation="silu", use_bias=False,
                d_ff=48, tie_embeddings=True, rope_base=10000.0, layer_norm_eps=1e-5)
    return DecoderConfig(**(base | overrides))


def params(cfg: DecoderConfig, seed: int = 0) -> dict:
    p = init_params(cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.1, x.shape).astype(np.float32), p)


def tokenizer():
    """tokenizers.Tokenizer: ids 0..255 the bytes (GPT-2's byte-to-unicode alphabet), 256.. specials,
    then unused ids up to 300."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_char = dict(zip(bs, map(chr, cs)))
    vocab = {byte_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.add_tokens([f"<extra_{i}>" for i in range(300 - 259)])
    assert tok.get_vocab_size() == 300 and tok.token_to_id("<|im_end|>") == EOS
    return tok


def write_folder(folder, cfg: DecoderConfig | None = None, seed: int = 0) -> tuple[DecoderConfig, dict]:
    """A Hugging Face folder of the tiny model, written by jaxdec.hf.export."""
    from jaxdec.hf.export import export_folder

    cfg = cfg or config()
    p = params(cfg, seed)
    export_folder(folder, p, cfg, tokenizer=tokenizer(), chat_template=CHAT_TEMPLATE, eos_id=EOS, bos_id=257,
                  pad_id=256)
    return cfg, p
