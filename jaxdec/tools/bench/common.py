"""What every benchmark shares: the benchmark models and the thread setting each line reports."""

from __future__ import annotations

import os

import jaxdec

BENCH_CONFIG = jaxdec.DecoderConfig(vocab_size=512, num_layers=4, d_model=256, num_heads=4, max_len=1024)

SEQ2SEQ_CONFIG = jaxdec.Seq2SeqConfig(vocab_size=512, num_encoder_layers=4, num_decoder_layers=4,
                                      d_model=256, num_heads=4, max_len=1024)


def xla_flags() -> str:
    """XLA_FLAGS as set for this process ("default" when unset): on a small CPU the thread
    setting changes the numbers, so every line reports it."""
    return os.environ.get("XLA_FLAGS", "default")
