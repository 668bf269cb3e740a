"""Hugging Face Marian (opus-mt) weights as a jaxdec Seq2SeqConfig and params: `from_marian`.

Marian mapping (nn.Linear weights are stored [out, in]: transposed to our [in, out]). Post-LN,
sinusoidal positions (sines in the first half, cosines in the second, no position offset),
LayerNorm eps 1e-5, embeddings scaled by sqrt(D) iff scale_embedding. "S.l.i." is
"encoder.layers.i." or "decoder.layers.i." (prefix "model." optional) into
layer i of params[encoder|decoder]["layers"] (stacked: index i of every leaf):

| HF name                                             | jaxdec                      | transform                |
|-----------------------------------------------------|-----------------------------|--------------------------|
| encoder/decoder.embed_tokens.weight [V, D], else shared.weight | embed [V, D] when shared, else encoder.embed / decoder.embed | - |
| S.l.i.self_attn.{q,k,v}_proj.weight [D, D]          | attn.qkv [D, 3D]            | transpose each, concat q,k,v |
| S.l.i.self_attn.{q,k,v}_proj.bias                   | attn.qkv_bias [3D]          | concat q, k, v           |
| S.l.i.self_attn.out_proj.weight / .bias             | attn.out / out_bias         | transpose / -            |
| S.l.i.self_attn_layer_norm.weight / .bias           | attn_norm.scale / .bias     | -                        |
| decoder...encoder_attn.q_proj.weight / .bias        | cross.q / q_bias            | transpose / -            |
| decoder...encoder_attn.{k,v}_proj.weight / .bias    | cross.kv [D, 2D] / kv_bias  | transpose each, concat k,v |
| decoder...encoder_attn.out_proj.weight / .bias      | cross.out / out_bias        | transpose / -            |
| decoder...encoder_attn_layer_norm.weight / .bias    | cross_norm.scale / .bias    | -                        |
| S.l.i.fc1.weight [F, D] / .bias                     | mlp.w_in [D, F] / b_in      | transpose / -            |
| S.l.i.fc2.weight [D, F] / .bias                     | mlp.w_out [F, D] / b_out    | transpose / -            |
| S.l.i.final_layer_norm.weight / .bias               | mlp_norm.scale / .bias      | -                        |
| final_logits_bias [1, V] (no prefix; zeros if absent, as in HF) | decoder.logits_bias [V] | flatten          |
| lm_head.weight [V, D] (no prefix)                   | tied to the decoder embed, or decoder.head [D, V] | transpose if untied |
| encoder/decoder.embed_positions.weight              | (none: static table)        | checked vs sinusoidal    |

Config: Seq2SeqConfig(vocab_size, num_encoder_layers=encoder_layers,
num_decoder_layers=decoder_layers, d_model, num_heads=encoder_attention_heads,
max_len=max_position_embeddings, d_ff=encoder_ffn_dim, position="sinusoidal",
norm_position="post", activation=ACTIVATIONS[activation_function], embed_scale=scale_embedding,
share_embeddings=share_encoder_decoder_embeddings (and the two stacks' embeddings equal: transformers
5 unties shared, encoder and decoder embeddings when tie_word_embeddings=False),
tie_embeddings=tie_word_embeddings (when absent: lm_head.weight absent or equal to the decoder
embedding), logits_bias=True). Refused: encoder/decoder heads or FFN widths that differ, decoder_vocab_size !=
vocab_size, and the legacy BART-style flags HF's Marian does not run (normalize_before,
normalize_embedding / layernorm_embedding, add_final_layer_norm, static_position_embeddings=False).
Special ids: eos_token_id (HF default 0), pad_token_id, decoder_start_token_id (= pad_token_id in
opus-mt): decoding starts from [decoder_start_id].
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdec import layers
from jaxdec.config import Seq2SeqConfig
from jaxdec.hf.files import _resolve
from jaxdec.hf.mapping import (
    Rule,
    _activation,
    _build,
    _cat,
    _cat_t,
    _check_filled,
    _count_layers,
    _expected_tree,
    _flat,
    _given,
    _heads,
    _same,
    _stack_layers,
    _strip,
    _t,
)

# Defaults of HF's MarianConfig for the fields used here (a bare state dict without a config
# falls back to them, as HF would).
MARIAN_DEFAULTS = {
    "activation_function": "gelu", "scale_embedding": False, "max_position_embeddings": 1024,
    "share_encoder_decoder_embeddings": True, "tie_word_embeddings": True,
    "eos_token_id": 0, "pad_token_id": 58100, "decoder_start_token_id": 58100, "bos_token_id": None,
}

_MARIAN_POSITIONS = ("encoder.embed_positions.weight", "decoder.embed_positions.weight")


_MARIAN_REFUSED = [
    ("normalize_before", True, "pre-LN blocks"),
    ("normalize_embedding", True, "a LayerNorm on the embeddings (layernorm_embedding)"),
    ("add_final_layer_norm", True, "a final LayerNorm after each stack"),
    ("static_position_embeddings", False, "learned positions"),
    ("add_bias_logits", True, "a logits bias Marian does not use"),
]


def _marian_config(tensors: dict, cfg: dict) -> Seq2SeqConfig:
    for key, bad, why in _MARIAN_REFUSED:
        if cfg.get(key) is bad:
            raise ValueError(f"Marian config {key}={bad} ({why}) is not what HF's MarianMTModel runs, "
                             "and jaxdec cannot express it")
    enc_name, dec_name, share, tie = _marian_embeddings(tensors, cfg)
    V, D = tensors[enc_name].shape
    vocab = int(_given(cfg, "vocab_size") or V)
    dec_vocab = int(_given(cfg, "decoder_vocab_size") or vocab)
    if dec_vocab != vocab:
        raise ValueError(f"decoder_vocab_size={dec_vocab} differs from vocab_size={vocab}: "
                         "jaxdec's Seq2SeqConfig has one vocabulary")
    heads = _heads(cfg, "encoder_attention_heads", "num_attention_heads")
    if int(cfg.get("decoder_attention_heads") or heads) != heads:
        raise ValueError(f"encoder_attention_heads={heads} and decoder_attention_heads="
                         f"{cfg['decoder_attention_heads']} differ: jaxdec uses one num_heads")
    enc_ff = _given(cfg, "encoder_ffn_dim")
    if enc_ff is None and "encoder.layers.0.fc1.weight" in tensors:
        enc_ff = tensors["encoder.layers.0.fc1.weight"].shape[0]
    dec_ff = _given(cfg, "decoder_ffn_dim")
    if dec_ff is None and "decoder.layers.0.fc1.weight" in tensors:
        dec_ff = tensors["decoder.layers.0.fc1.weight"].shape[0]
    if enc_ff is not None and dec_ff is not None and int(enc_ff) != int(dec_ff):
        raise ValueError(f"encoder_ffn_dim={enc_ff} and decoder_ffn_dim={dec_ff} differ: jaxdec uses one d_ff")
    max_len = _given(cfg, "max_position_embeddings")
    if max_len is None:
        tables = [tensors[n].shape[0] for n in _MARIAN_POSITIONS if n in tensors]
        max_len = tables[0] if tables else MARIAN_DEFAULTS["max_position_embeddings"]
    d_model = int(_given(cfg, "d_model") or D)
    return Seq2SeqConfig(
        vocab_size=vocab,
        num_encoder_layers=int(_given(cfg, "encoder_layers") or _count_layers(tensors, r"encoder\.layers\.(\d+)\.")),
        num_decoder_layers=int(_given(cfg, "decoder_layers") or _count_layers(tensors, r"decoder\.layers\.(\d+)\.")),
        d_model=d_model,
        num_heads=heads,
        max_len=int(max_len),
        d_ff=int(enc_ff if enc_ff is not None else (dec_ff if dec_ff is not None else 4 * d_model)),
        position="sinusoidal",
        norm_position="post",
        activation=_activation(cfg.get("activation_function", MARIAN_DEFAULTS["activation_function"])),
        use_bias=True,
        share_embeddings=bool(share),
        tie_embeddings=bool(tie),
        logits_bias=True,
        layer_norm_eps=1e-5,  # HF's Marian uses nn.LayerNorm's default
        embed_scale=bool(cfg.get("scale_embedding", MARIAN_DEFAULTS["scale_embedding"])),
    )


def _marian_layer_rules(stack: str, i: int, cross: bool) -> dict[tuple, Rule]:
    """One encoder or decoder layer's rows of the Marian mapping table."""
    hf = f"{stack}.layers.{i}."
    me = (stack, "layers", i)
    a = hf + "self_attn."
    rules: dict[tuple, Rule] = {
        (*me, "attn", "qkv"): ((a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), _cat_t),
        (*me, "attn", "qkv_bias"): ((a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"), _cat),
        (*me, "attn", "out"): ((a + "out_proj.weight",), _t),
        (*me, "attn", "out_bias"): ((a + "out_proj.bias",), _same),
        (*me, "attn_norm", "scale"): ((hf + "self_attn_layer_norm.weight",), _same),
        (*me, "attn_norm", "bias"): ((hf + "self_attn_layer_norm.bias",), _same),
        (*me, "mlp", "w_in"): ((hf + "fc1.weight",), _t),
        (*me, "mlp", "b_in"): ((hf + "fc1.bias",), _same),
        (*me, "mlp", "w_out"): ((hf + "fc2.weight",), _t),
        (*me, "mlp", "b_out"): ((hf + "fc2.bias",), _same),
        (*me, "mlp_norm", "scale"): ((hf + "final_layer_norm.weight",), _same),
        (*me, "mlp_norm", "bias"): ((hf + "final_layer_norm.bias",), _same),
    }
    if cross:
        c = hf + "encoder_attn."
        rules |= {
            (*me, "cross", "q"): ((c + "q_proj.weight",), _t),
            (*me, "cross", "q_bias"): ((c + "q_proj.bias",), _same),
            (*me, "cross", "kv"): ((c + "k_proj.weight", c + "v_proj.weight"), _cat_t),
            (*me, "cross", "kv_bias"): ((c + "k_proj.bias", c + "v_proj.bias"), _cat),
            (*me, "cross", "out"): ((c + "out_proj.weight",), _t),
            (*me, "cross", "out_bias"): ((c + "out_proj.bias",), _same),
            (*me, "cross_norm", "scale"): ((hf + "encoder_attn_layer_norm.weight",), _same),
            (*me, "cross_norm", "bias"): ((hf + "encoder_attn_layer_norm.bias",), _same),
        }
    return rules


def _marian_embeddings(tensors: dict, cfg: dict) -> tuple[str, str, bool, bool]:
    """Which tensors embed the encoder's and the decoder's tokens; whether they are one
    (shared) and whether the output head is tied to the decoder's.

    HF's Marian embeds each stack with its own embed_tokens, tied to "shared" when
    share_encoder_decoder_embeddings (transformers 5 unties everything, shared included, when
    tie_word_embeddings=False, so the copies can then differ). A stack's embed_tokens is used
    when present, else shared.weight; the two are one jaxdec "embed" when configured shared and
    equal. The head is tied per tie_word_embeddings, or, when the config does not say, iff
    lm_head.weight is absent or equals the decoder embedding.
    """
    share_flag = cfg.get("share_encoder_decoder_embeddings", MARIAN_DEFAULTS["share_encoder_decoder_embeddings"])

    def stack_embed(stack: str) -> str:
        for name in (f"{stack}.embed_tokens.weight", *(["shared.weight"] if share_flag else [])):
            if name in tensors:
                return name
        raise ValueError(f"missing tensors: {stack}.embed_tokens.weight"
                         + (" (or shared.weight)" if share_flag else ""))

    enc, dec = stack_embed("encoder"), stack_embed("decoder")
    share = bool(share_flag) and _equal(tensors[enc], tensors[dec])
    tie = cfg.get("tie_word_embeddings")
    head = tensors.get("lm_head.weight")
    if tie is None:
        tie = head is None or _equal(head, tensors[dec])
    elif tie and head is not None and not _equal(head, tensors[dec]):
        raise ValueError(f"lm_head.weight differs from {dec}, but the config ties them")
    return enc, dec, share, bool(tie)


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b)


def _marian_rules(config: Seq2SeqConfig, tensors: dict, enc: str, dec: str) -> dict[tuple, Rule]:
    """The Marian mapping table (module docstring)."""
    rules: dict[tuple, Rule] = {}
    if config.share_embeddings:
        rules[("embed",)] = ((enc,), _same)
    else:
        rules[("encoder", "embed")] = ((enc,), _same)
        rules[("decoder", "embed")] = ((dec,), _same)
    if not config.tie_embeddings:
        rules[("decoder", "head")] = (("lm_head.weight",), _t)
    rules[("decoder", "logits_bias")] = (("final_logits_bias",), _flat)
    for i in range(config.num_encoder_layers):
        rules |= _marian_layer_rules("encoder", i, cross=False)
    for i in range(config.num_decoder_layers):
        rules |= _marian_layer_rules("decoder", i, cross=True)
    return rules


def _check_positions(tensors: dict, d_model: int) -> None:
    """Marian's stored static tables must be our sinusoidal table (sines first, no offset)."""
    for name in _MARIAN_POSITIONS:
        if name not in tensors:
            continue
        table = tensors[name]
        if table.ndim != 2 or table.shape[1] != d_model:
            raise ValueError(f"{name} has shape {table.shape}, expected [positions, {d_model}]")
        ours = np.asarray(layers.sinusoidal(jnp.arange(table.shape[0])[None, :], d_model))[0]
        # HF builds the table in float64; ours is float32 (angle error ~1e-4 at position 1000).
        err = float(np.max(np.abs(table - ours))) if table.size else 0.0
        if err > 1e-3:
            raise ValueError(f"{name} is not the sinusoidal table jaxdec computes (max difference {err:.3g}): "
                             "positions would not match")


def from_marian(source, config=None) -> tuple[Seq2SeqConfig, dict]:
    """An HF Marian model (MarianMTModel or MarianModel weights, e.g. opus-mt) as a jaxdec
    Seq2SeqConfig and params.

    Args:
      source: a state dict {name: torch tensor or numpy array} (with or without "model."), or a
        local checkpoint folder (config.json + model.safetensors or pytorch_model.bin).
      config: the HF config (dict, MarianConfig or config.json path); for a folder it replaces
        config.json. For a bare state dict it must give encoder_attention_heads; other fields
        default to the shapes, then to MarianConfig's defaults (module docstring).

    Returns:
      (Seq2SeqConfig, params) laid out as `jaxdec.init_params(config, key)`.

    Raises:
      ValueError naming missing, unknown or misshapen tensors, a stored position table that is
      not ours, or a config jaxdec cannot express. ImportError for a .bin without torch.
    """
    tensors, cfg, _ = _resolve(source, config)
    tensors = _strip(tensors, "model.")
    model_type = cfg.get("model_type")
    if model_type not in (None, "marian"):
        raise ValueError(f"config model_type is {model_type!r}, expected 'marian' (use from_gpt2 for 'gpt2')")
    sconfig = _marian_config(tensors, cfg)
    _check_positions(tensors, sconfig.d_model)
    enc, dec, _, _ = _marian_embeddings(tensors, cfg)
    rules = _marian_rules(sconfig, tensors, enc, dec)
    # Embedding copies the model does not read: tied copies (checked equal above) and, when
    # each stack has its own embed_tokens, the unused "shared".
    copies = {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
              *(["lm_head.weight"] if sconfig.tie_embeddings else [])}
    used = {n for names, _ in rules.values() for n in names}
    V = sconfig.vocab_size
    params = _build(rules, tensors, _expected_tree(sconfig),
                    ignored=lambda n: n in _MARIAN_POSITIONS or (n in copies and n not in used),
                    optional={"final_logits_bias": np.zeros((1, V), np.float32)})
    _check_filled(params)
    return sconfig, _stack_layers(params)
