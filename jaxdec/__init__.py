"""jaxdec: small, fast, correct JAX Transformer decoders."""

from jaxdec.cache import KVCache
from jaxdec.config import DecoderConfig
from jaxdec.decode import DecodeState, GenerateResult, generate
from jaxdec.model import forward, forward_checked, init_params
from jaxdec.sampling import Greedy, Temperature, TopK, TopP

__all__ = [
    "DecodeState",
    "DecoderConfig",
    "GenerateResult",
    "Greedy",
    "KVCache",
    "Temperature",
    "TopK",
    "TopP",
    "forward",
    "forward_checked",
    "generate",
    "init_params",
]
