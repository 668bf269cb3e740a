"""A pretrained model's tokenizer for training data, and the model it belongs to.

`TextTokenizer` wraps the `tokenizers.Tokenizer` that `jaxdec.hf` loads (a folder's
tokenizer.json or a GGUF file's vocabulary) with the model's special ids, and encodes corpus
documents for `jaxdec.data.encode_split`: each document is its text's ids (no BOS, no other
special token added) followed by the model's EOS, so documents are separated by EOS.
`load_pretrained(path)` loads a folder or a .gguf file: checkpoint, tokenizer, chat template.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

from jaxdec.hf.loading import Checkpoint


def _stream_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


@dataclasses.dataclass(frozen=True, eq=False)
class TextTokenizer:
    """A `tokenizers.Tokenizer` with the model's special ids.

    Attributes:
      tok: the tokenizer.
      vocab_size: the model's vocabulary (ids are checked against it).
      eos_id: ends every document; decoding stops at it.
      pad_id: fills padding (eos when the model has no pad token).
      bos_id: as configured (not added to documents).
    """

    tok: object
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None = None

    @property
    def fingerprint(self) -> str:
        """"sha256:<16 hex digits>" of the tokenizer's JSON: what a token file records."""
        return "sha256:" + hashlib.sha256(self.tok.to_str().encode("utf-8")).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of ids up to the first EOS, special tokens skipped."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tok.decode(ids, skip_special_tokens=True)

    def byte_lengths(self) -> np.ndarray:
        """int64 [vocab_size]: the UTF-8 bytes each id stands for (0 for special and unused ids),
        read through the byte-level alphabet (GPT-2's byte-to-unicode map) that byte-level BPE
        vocabularies are written in; a token outside it counts its characters' UTF-8 bytes."""
        from tokenizers.pre_tokenizers import ByteLevel

        alphabet = set(ByteLevel.alphabet())
        special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        out = np.zeros(self.vocab_size, np.int64)
        for token, i in self.tok.get_vocab(with_added_tokens=True).items():
            if i >= self.vocab_size or token in special:
                continue
            out[i] = len(token) if set(token) <= alphabet else len(token.encode("utf-8"))
        return out

    def encode_parts(self, parts) -> list[np.ndarray]:
        """`jaxdec.data.Part`s -> ids (+ EOS where a part closes its document), uint16 or uint32.

        Bytes that are not UTF-8 are replaced (U+FFFD) before encoding; the parts are encoded as
        one batch (the tokenizer's own threads).
        """
        texts = [p.data.decode("utf-8", errors="replace") for p in parts]
        dtype = _stream_dtype(self.vocab_size)
        out = []
        for part, enc in zip(parts, self.tok.encode_batch(texts, add_special_tokens=False)):
            ids = np.empty(len(enc.ids) + part.closes, dtype)
            ids[: len(enc.ids)] = enc.ids
            if part.closes:
                ids[-1] = self.eos_id
            out.append(ids)
        return out


def text_tokenizer(ckpt: Checkpoint, tok) -> TextTokenizer:
    """The TextTokenizer of a loaded checkpoint and its tokenizers.Tokenizer."""
    eos = ckpt.special.eos_id
    if eos is None:
        raise ValueError("the model has no eos_token_id: training data needs it to separate documents")
    pad = ckpt.special.pad_id if ckpt.special.pad_id is not None else eos
    return TextTokenizer(tok=tok, vocab_size=ckpt.config.vocab_size, eos_id=eos, pad_id=pad,
                         bos_id=ckpt.special.bos_id)


def load_pretrained(path: str) -> tuple[Checkpoint, TextTokenizer, str | None]:
    """(Checkpoint, TextTokenizer, chat template) of a Llama-style or GPT-2 folder or a GGUF file
    (a path ending in .gguf)."""
    from jaxdec.hf import cli

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"--init {path!r} does not exist: give a Hugging Face folder or a .gguf file")
    is_gguf = os.path.isfile(path) and path.endswith(".gguf")
    if os.path.isfile(path) and not is_gguf:
        raise ValueError(f"--init {path!r} is a file but not a .gguf file: give a Hugging Face folder or a .gguf file")
    ckpt, tok, template = cli.load(gguf=path) if is_gguf else cli.load(checkpoint=path)
    if ckpt.model_type == "marian":
        raise ValueError(f"--init {path!r} is an encoder-decoder (marian): train.py fine-tunes decoder-only models")
    return ckpt, text_tokenizer(ckpt, tok.tok), template
