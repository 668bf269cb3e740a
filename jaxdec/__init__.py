"""jaxdec: small, fast, correct JAX Transformer decoders.

Shape letters, used in every einsum string, shape comment and docstring (one letter, one
meaning everywhere):

    B  batch                          N  query heads
    T  query length                   K  key/value heads (GQA/MQA: N % K == 0)
    S  key length: cache capacity,    G  query heads per key/value head (N // K)
       or the encoder's source length H  head dim
    P  prompt length (padded width)   D  model dim
    C  prefill chunk length           F  MLP hidden dim
    L  layers                         V  vocabulary
    W  beam width (beam search only)  I, O  a dense layer's input and output width

Counts without a letter are spelled out (max_new_tokens, capacity, width). Boolean masks are
True where attention is allowed. Example: `jnp.einsum("BTNH,BSNH->BNTS", q, k)`.

Public API: configs (DecoderConfig, Seq2SeqConfig, TrainConfig), `init_params`, `forward`,
`check_params`, `generate` and `beam_search` (on params, or on `decode_params(params, config)`
laid out once for many calls, with a `kv_buffer` reused across calls) with samplers (Greedy, Temperature, TopK, TopP, or
any `Sampler`), speculative decoding (`generate(..., draft=PromptLookup(...) | DraftModel(...))`), training (`create_train_state`, `train_step`, `train_step_checked`,
`eval_step`) and sharding (`make_mesh`, `shard_params`, `shard_batch`). Each model family (decoder-only `model`, encoder-decoder
`seq2seq`) is reached through `jaxdec.family.of(config)`; Hugging Face checkpoints through
`jaxdec.hf`.
"""

from jaxdec.api import check_params, forward, forward_checked, init_params
from jaxdec.beam import beam_search
from jaxdec.cache import KVBuffer, KVCache
from jaxdec.config import DecoderConfig, Seq2SeqConfig, TrainConfig
from jaxdec.decode import DecodeParams, DecodeState, GenerateResult, decode_params, generate, kv_buffer
from jaxdec.sampling import Greedy, Sampler, Temperature, TopK, TopP
from jaxdec.sharding import make_mesh, shard_batch, shard_params
from jaxdec.speculative import Draft, DraftModel, PromptLookup
from jaxdec.training import TrainState, create_train_state, eval_step, train_step, train_step_checked

__all__ = [
    "DecodeParams",
    "DecodeState",
    "DecoderConfig",
    "Draft",
    "DraftModel",
    "GenerateResult",
    "Greedy",
    "KVBuffer",
    "KVCache",
    "PromptLookup",
    "Sampler",
    "Seq2SeqConfig",
    "Temperature",
    "TopK",
    "TopP",
    "TrainConfig",
    "TrainState",
    "create_train_state",
    "beam_search",
    "check_params",
    "decode_params",
    "eval_step",
    "forward",
    "forward_checked",
    "generate",
    "init_params",
    "kv_buffer",
    "make_mesh",
    "shard_batch",
    "shard_params",
    "train_step",
    "train_step_checked",
]
