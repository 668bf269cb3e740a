"""Data for jaxdec: a byte tokenizer, embedded and user corpora, LM batching, the dates task.

The dates task lives in its own namespace (`jaxdec.data.dates`) because its `sample_batch`
returns encoder-decoder arrays, unlike the language-model `sample_batch` exported here.
"""

from jaxdec.data import dates
from jaxdec.data.batching import eval_batches, sample_batch
from jaxdec.data.corpus import (
    STREAM_DTYPE,
    Corpus,
    DocumentSplit,
    Part,
    encode_documents,
    encode_split,
    load_stdlib_corpus,
    load_text_corpus,
    read_stdlib_documents,
    read_text_documents,
    split_files,
    stream_dtype,
)
from jaxdec.data.packing import Packed, pack_documents, packed_eval_batches, sample_packed_batch
from jaxdec.data.dates import DATE_FORMATS, format_date, max_source_bytes
from jaxdec.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer

__all__ = [
    "BOS_ID",
    "Corpus",
    "ByteTokenizer",
    "DocumentSplit",
    "Packed",
    "Part",
    "DATE_FORMATS",
    "EOS_ID",
    "PAD_ID",
    "STREAM_DTYPE",
    "VOCAB_SIZE",
    "dates",
    "encode_documents",
    "encode_split",
    "eval_batches",
    "format_date",
    "load_stdlib_corpus",
    "load_text_corpus",
    "max_source_bytes",
    "pack_documents",
    "packed_eval_batches",
    "read_stdlib_documents",
    "read_text_documents",
    "sample_batch",
    "sample_packed_batch",
    "split_files",
    "stream_dtype",
]
