"""Whole checkpoints: special token ids and `load_checkpoint`, dispatching on model_type.

`special_ids(source)` gives the eos / pad / decoder-start ids of a folder (config.json, then
generation_config.json, as HF's generate reads them) or of a config dict. `load_checkpoint(folder)`
reads a GPT-2 or Marian folder whole: config, params, special ids and generation settings.
"""

from __future__ import annotations

import dataclasses
import re

from jaxdec.config import DecoderConfig, Seq2SeqConfig
from jaxdec.hf.files import _resolve
from jaxdec.hf.gpt2 import GPT2_DEFAULTS, from_gpt2
from jaxdec.hf.mapping import _given
from jaxdec.hf.marian import MARIAN_DEFAULTS, from_marian
from jaxdec.hf.modern import FAMILIES, first_id, from_modern

SUPPORTED = ("gpt2", "marian", *FAMILIES)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Token ids that decoding needs.

    eos_id: stop token (None: never stop). pad_id: fills finished rows (GPT-2 has none: eos is
    used, as HF's generate does). decoder_start_id: the encoder-decoder's first decoder token
    (None for a decoder-only model). bos_id: as configured (unused by decoding).
    """

    eos_id: int | None
    pad_id: int | None
    decoder_start_id: int | None = None
    bos_id: int | None = None


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: model_type (one of `SUPPORTED`), config, params, special ids, and the
    raw generation settings (config.json updated by generation_config.json). A GGUF file's
    checkpoint (`jaxdec.hf.load_gguf`) also carries its tokenizer and chat template."""

    model_type: str
    config: DecoderConfig | Seq2SeqConfig
    params: dict
    special: SpecialIds
    generation: dict
    tokenizer: object | None = None
    chat_template: str | None = None


def _single_id(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(set(value)) > 1:
            raise ValueError(f"{name}={value}: jaxdec decodes with a single eos id")
        return int(value[0]) if value else None
    return int(value)


def _special(model_type: str, settings: dict, vocab_size: int) -> SpecialIds:
    defaults = {"gpt2": GPT2_DEFAULTS, "marian": MARIAN_DEFAULTS}.get(model_type, {})
    get = lambda k: settings[k] if k in settings else defaults.get(k)  # noqa: E731
    if model_type in FAMILIES:
        eos = first_id("eos_token_id", get("eos_token_id"))
        pad = first_id("pad_token_id", get("pad_token_id"))
        special = SpecialIds(eos_id=eos, pad_id=eos if pad is None else pad,
                             bos_id=_single_id("bos_token_id", get("bos_token_id")))
        return _check_ids(special, vocab_size)
    eos = _single_id("eos_token_id", get("eos_token_id"))
    pad = _single_id("pad_token_id", get("pad_token_id"))
    if model_type == "gpt2":
        special = SpecialIds(eos_id=eos, pad_id=eos if pad is None else pad,
                             bos_id=_single_id("bos_token_id", get("bos_token_id")))
    else:
        start = _single_id("decoder_start_token_id", get("decoder_start_token_id"))
        special = SpecialIds(eos_id=eos, pad_id=pad, decoder_start_id=pad if start is None else start,
                             bos_id=_single_id("bos_token_id", get("bos_token_id")))
    return _check_ids(special, vocab_size)


def _check_ids(special: SpecialIds, vocab_size: int) -> SpecialIds:
    for name in ("eos_id", "pad_id", "decoder_start_id"):  # the ids decoding uses
        value = getattr(special, name)
        if value is not None and not 0 <= value < vocab_size:
            raise ValueError(f"{name}={value} is outside the vocabulary [0, {vocab_size}): "
                             "pass config= with the model's special token ids")
    return special


def _model_type(cfg: dict, tensors: dict) -> str:
    model_type = cfg.get("model_type")
    if model_type is None:
        names = set(tensors)
        if any(n.endswith("wte.weight") for n in names):
            return "gpt2"
        if any("encoder.layers." in n for n in names):
            return "marian"
        if any(n.startswith("model.layers.") for n in names):
            raise ValueError("config.json gives no model_type: name the Llama-style family, one of "
                             f"{sorted(FAMILIES)}")
    if model_type not in SUPPORTED:
        raise ValueError(f"model_type {model_type!r} is not supported: jaxdec imports {', '.join(SUPPORTED)}")
    return model_type


def special_ids(source, config=None) -> SpecialIds:
    """eos / pad / decoder-start ids of a checkpoint folder (config.json, then
    generation_config.json, as HF's generate reads them) or of a config dict.

    For a state dict, only the config is read (HF defaults fill the gaps: GPT-2 eos 50256 and pad
    = eos; Marian eos 0, pad = decoder start = 58100); the tensors give the vocabulary size that
    the ids are checked against.
    """
    tensors, cfg, generation = _resolve(source, config)
    model_type = _model_type(cfg, tensors)
    vocab = _given(cfg, "vocab_size")
    if vocab is None:
        embeds = [t for n, t in tensors.items() if re.search(r"(wte|shared|embed_tokens)\.weight$", n)]
        vocab = embeds[0].shape[0] if embeds else 2**31 - 1
    return _special(model_type, generation, int(vocab))


def load_gguf(path: str) -> Checkpoint:
    """A GGUF file (llama.cpp's format) of a Llama-style family as a Checkpoint, with the
    tokenizer (a `tokenizers.Tokenizer` built from the file's metadata) and chat template.

    Every tensor is dequantized to float32 (`jaxdec.hf.gguf`), then mapped as a Hugging Face
    folder of the same model type would be (`from_modern`), so a GGUF file and the folder it was
    converted from give the same params up to the quantization.
    """
    from jaxdec.hf.gguf import read_gguf

    model = read_gguf(path)
    if model.model_type not in FAMILIES:
        raise ValueError(f"{path}: model type {model.model_type!r} is not supported: jaxdec imports "
                         f"{sorted(FAMILIES)} from GGUF files")
    config, params = from_modern(model.tensors, model.config, model.model_type)
    return Checkpoint(model_type=model.model_type, config=config, params=params,
                      special=_special(model.model_type, model.config, config.vocab_size),
                      generation=dict(model.config), tokenizer=model.tokenizer,
                      chat_template=model.chat_template)


def load_checkpoint(folder: str) -> Checkpoint:
    """A local checkpoint folder, dispatched on config.json's model_type (one of `SUPPORTED`)."""
    tensors, cfg, generation = _resolve(folder, None)
    model_type = _model_type(cfg, tensors)
    if model_type in FAMILIES:
        config, params = from_modern(tensors, cfg, model_type)
    else:
        config, params = (from_gpt2 if model_type == "gpt2" else from_marian)(tensors, cfg)
    return Checkpoint(model_type=model_type, config=config, params=params,
                      special=_special(model_type, generation, config.vocab_size), generation=generation)
