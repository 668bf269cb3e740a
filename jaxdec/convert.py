"""Compatibility module: the Hugging Face interop lives in `jaxdec.hf`.

`jaxdec.convert.from_gpt2`, `from_marian`, `special_ids`, `SpecialIds`, `load_checkpoint`,
`Checkpoint` and `load_state_dict` are the same objects as in `jaxdec.hf` (see its docstring and
the mapping tables in jaxdec/hf/gpt2.py and jaxdec/hf/marian.py). New code should import
`jaxdec.hf`; the command line is `python -m jaxdec.hf`.
"""

from jaxdec.hf import (
    Checkpoint,
    SpecialIds,
    from_gpt2,
    from_marian,
    load_checkpoint,
    load_state_dict,
    special_ids,
)

__all__ = [
    "Checkpoint",
    "SpecialIds",
    "from_gpt2",
    "from_marian",
    "load_checkpoint",
    "load_state_dict",
    "special_ids",
]
