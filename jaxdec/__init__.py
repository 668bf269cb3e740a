"""jaxdec: small, fast, correct JAX Transformer decoders."""

from jaxdec.api import forward, forward_checked, init_params
from jaxdec.beam import beam_search
from jaxdec.cache import KVCache
from jaxdec.config import DecoderConfig, Seq2SeqConfig, TrainConfig
from jaxdec.decode import DecodeState, GenerateResult, generate
from jaxdec.sampling import Greedy, Temperature, TopK, TopP
from jaxdec.sharding import make_mesh, shard_batch, shard_params
from jaxdec.training import TrainState, create_train_state, eval_step, train_step

__all__ = [
    "DecodeState",
    "DecoderConfig",
    "GenerateResult",
    "Greedy",
    "KVCache",
    "Seq2SeqConfig",
    "Temperature",
    "TopK",
    "TopP",
    "TrainConfig",
    "TrainState",
    "create_train_state",
    "beam_search",
    "eval_step",
    "forward",
    "forward_checked",
    "generate",
    "init_params",
    "make_mesh",
    "shard_batch",
    "shard_params",
    "train_step",
]
