"""Token files (jaxdec.data.tokens): the same tokens, the same batches as the in-memory corpus for
the same (seed, step), and a batch reads only its windows, never the whole file."""

import json
import pathlib
import sys

import numpy as np
import pytest

from jaxdec.data import eval_batches, load_text_corpus, sample_batch
from jaxdec.data import tokens as token_files


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "docs"
    (data / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "한국어", "x = 1", "\n", "    ", "é"]
    for i in range(12):
        text = " ".join(rng.choice(words, size=int(rng.integers(20, 200))))
        (data / ("sub" if i % 3 else "") / f"f{i}.py").write_text(text, encoding="utf-8")
    (data / "binary.bin").write_bytes(b"\x00\x01")  # skipped by both paths
    return data


def test_token_file_holds_the_in_memory_corpus_and_gives_the_same_batches(folder, tmp_path):
    corpus = load_text_corpus(folder, held_out_fraction=0.2)
    out = tmp_path / "train.bin"
    assert token_files.main(["write", "--data", str(folder), "--held-out-fraction", "0.2", str(out)]) == 0
    tf = token_files.open_token_file(out)
    assert isinstance(tf.tokens, np.memmap) and tf.tokens.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(tf.train, corpus.train)
    np.testing.assert_array_equal(tf.held_out, corpus.held_out)
    assert tf.tokenizer == "bytes" and tf.meta["documents"] == [len(corpus.train_files), len(corpus.held_out_files)]
    for seed, step in [(0, 0), (0, 1), (3, 17), (7, 1000)]:
        a = sample_batch(tf.train, batch_size=4, seq_len=16, seed=seed, step=step)
        b = sample_batch(corpus.train, batch_size=4, seq_len=16, seed=seed, step=step)
        assert a["tokens"].dtype == np.int32
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    for a, b in zip(eval_batches(tf.held_out, batch_size=3, seq_len=8, max_batches=None),
                    eval_batches(corpus.held_out, batch_size=3, seq_len=8, max_batches=None), strict=True):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])


def _rss_bytes() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident set size from /proc")
def test_batches_read_only_their_windows_of_a_file_larger_than_memory_would_allow(tmp_path):
    """A 4 GiB token file (sparse: it takes no disk) streams batches while the process's resident
    memory grows by less than 64 MiB, with the map still open; reading it whole would add 4 GiB."""
    out = tmp_path / "big.bin"
    n = 2**31  # uint16 tokens: 4 GiB
    with open(out, "wb") as f:
        f.truncate(2 * n)
    with open(out, "r+b") as f:  # a few real ids at known places
        f.seek(2 * 1000)
        f.write(np.arange(1, 65, dtype="<u2").tobytes())
    token_files.sidecar(out).write_text(json.dumps({"dtype": "uint16", "held_out_start": n - 2**20}))
    before = _rss_bytes()
    tf = token_files.open_token_file(out)
    for step in range(20):
        batch = sample_batch(tf.train, batch_size=16, seq_len=256, seed=0, step=step)
        assert batch["tokens"].shape == (16, 257)
    held = eval_batches(tf.held_out, batch_size=8, seq_len=256, max_batches=2)
    assert len(held) == 2
    np.testing.assert_array_equal(tf.tokens[1000:1064], np.arange(1, 65))
    assert _rss_bytes() - before < 64 * 2**20
    del tf


@pytest.mark.parametrize("meta, size, match", [
    (None, 8, "no sidecar"),
    ({"dtype": "int8", "held_out_start": 2}, 8, "dtype"),
    ({"dtype": "uint16", "held_out_start": 2}, 7, "whole number"),
    ({"dtype": "uint16", "held_out_start": 2, "tokens": 5}, 8, "tokens=5"),
    ({"dtype": "uint32", "held_out_start": 2}, 8, "held_out_start"),
    ({"dtype": "uint16"}, 8, "held_out_start"),
])
def test_bad_token_files_are_refused_naming_the_problem(tmp_path, meta, size, match):
    out = tmp_path / "x.bin"
    out.write_bytes(b"\x01" * size)
    if meta is not None:
        token_files.sidecar(out).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        token_files.open_token_file(out)
