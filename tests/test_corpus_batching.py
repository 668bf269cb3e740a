"""Corpora (stdlib and user text) and LM batching: splits, determinism, shapes, bad input."""

import numpy as np
import pytest

from jaxdec.data import (
    BOS_ID,
    EOS_ID,
    ByteTokenizer,
    encode_documents,
    eval_batches,
    load_stdlib_corpus,
    load_text_corpus,
    sample_batch,
    split_files,
)
from jaxdec.data.corpus import stdlib_source_files

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def stdlib():
    return load_stdlib_corpus()


# --- stdlib corpus -------------------------------------------------------------------------


def test_stdlib_split_is_disjoint_and_complete(stdlib):
    _, all_files = stdlib_source_files()
    train, held = set(stdlib.train_files), set(stdlib.held_out_files)
    assert train and held and not train & held
    assert train | held == set(all_files)
    assert all(p.endswith(".py") for p in all_files)
    assert not any("site-packages" in p or "__pycache__" in p for p in all_files)
    assert 0.02 < len(held) / len(all_files) < 0.10  # about held_out_fraction = 0.05
    assert list(stdlib.train_files) == sorted(stdlib.train_files)


def test_stdlib_split_is_deterministic(stdlib):
    _, all_files = stdlib_source_files()
    assert split_files(all_files, 0.05) == (list(stdlib.train_files), list(stdlib.held_out_files))
    # A file's side does not depend on the other files present (a stable per-path hash).
    subset = all_files[::7]
    sub_train, sub_held = split_files(subset, 0.05)
    assert set(sub_held) <= set(stdlib.held_out_files)
    assert set(sub_train) <= set(stdlib.train_files)


def test_stdlib_streams_mark_documents(stdlib):
    root, _ = stdlib_source_files()
    splits = ((stdlib.train, stdlib.train_files), (stdlib.held_out, stdlib.held_out_files))
    for stream, files in splits:
        assert stream.dtype == np.uint16 and stream.ndim == 1
        assert stream[0] == BOS_ID and stream[-1] == EOS_ID
        assert int(stream.max()) <= EOS_ID
        assert int((stream == BOS_ID).sum()) == len(files)
        assert int((stream == EOS_ID).sum()) == len(files)
    sizes = [(root / p).stat().st_size + 2 for p in stdlib.held_out_files]
    assert stdlib.held_out.size == sum(sizes)
    first = (root / stdlib.held_out_files[0]).read_bytes()
    assert stdlib.held_out[1:1 + len(first)].tolist() == list(first)


def test_stdlib_max_files():
    small = load_stdlib_corpus(max_files=10)
    assert len(small.train_files) + len(small.held_out_files) == 10
    assert small.train_files and small.held_out_files  # both sides non-empty even when tiny


@pytest.mark.parametrize("kwargs", [
    {"held_out_fraction": 0.0}, {"held_out_fraction": 1.0}, {"held_out_fraction": -0.1},
    {"max_files": 1}, {"max_files": 0}, {"max_files": 2.5},
])
def test_stdlib_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        load_stdlib_corpus(**kwargs)


def test_split_files_both_sides_nonempty():
    for fraction in (1e-9, 0.999999):
        train, held = split_files(["a.py", "b.py"], fraction)
        assert len(train) == 1 and len(held) == 1
    with pytest.raises(ValueError, match="at least 2 files"):
        split_files(["only.py"], 0.5)


def test_encode_documents():
    out = encode_documents([b"ab", b"", "가".encode()])
    assert out.dtype == np.uint16
    assert out.tolist() == [
        BOS_ID, 97, 98, EOS_ID, BOS_ID, EOS_ID, BOS_ID, 0xEA, 0xB0, 0x80, EOS_ID
    ]


# --- user text ---------------------------------------------------------------------------


def test_text_file_split_by_bytes(tmp_path):
    text = "".join(f"line {i}: 나는 학교에 간다\n" for i in range(200))
    path = tmp_path / "story.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_text_corpus(path, held_out_fraction=0.1)
    assert corpus.train[0] == BOS_ID and corpus.held_out[-1] == EOS_ID
    # The two halves are the document, in order; the cut falls on a character boundary.
    head, tail = TOK.decode(corpus.train), TOK.decode(corpus.held_out)
    assert head + tail == text
    assert "\ufffd" not in head + tail
    held_bytes = corpus.held_out.size - 1
    assert abs(held_bytes - 0.1 * len(text.encode())) <= 3
    assert corpus.train_files == corpus.held_out_files == ("story.txt",)


def test_tiny_text_file_keeps_a_byte_on_each_side(tmp_path):
    path = tmp_path / "ab.txt"
    path.write_text("ab")
    corpus = load_text_corpus(path)
    assert corpus.train.tolist() == [BOS_ID, 97]
    assert corpus.held_out.tolist() == [98, EOS_ID]


def test_text_folder_split_by_file(tmp_path):
    for i in range(40):
        sub = tmp_path / f"dir{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}.txt").write_text(f"document {i} 한국어\n" * 5, encoding="utf-8")
    (tmp_path / "image.bin").write_bytes(bytes(range(256)))  # not UTF-8: skipped
    (tmp_path / "nul.txt").write_bytes(b"abc\x00def")  # NUL: binary, skipped
    (tmp_path / "empty.txt").write_bytes(b"")  # skipped
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_text("hidden")  # hidden: skipped
    corpus = load_text_corpus(tmp_path, held_out_fraction=0.2)
    files = set(corpus.train_files) | set(corpus.held_out_files)
    assert files == {f"dir{i % 3}/f{i}.txt" for i in range(40)}
    assert not set(corpus.train_files) & set(corpus.held_out_files)
    assert corpus.held_out_files
    assert int((corpus.train == BOS_ID).sum()) == len(corpus.train_files)
    again = load_text_corpus(tmp_path, held_out_fraction=0.2)
    assert again.held_out_files == corpus.held_out_files
    np.testing.assert_array_equal(again.train, corpus.train)


def test_text_folder_with_one_file_splits_by_bytes(tmp_path):
    (tmp_path / "only.txt").write_text("hello world, " * 20)
    (tmp_path / "junk.bin").write_bytes(b"\xff\xfe\x00")
    corpus = load_text_corpus(tmp_path)
    assert corpus.train_files == corpus.held_out_files == ("only.txt",)
    assert TOK.decode(corpus.train) + TOK.decode(corpus.held_out) == "hello world, " * 20


def test_text_bad_input(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_text_corpus(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_text_corpus(empty)
    one = tmp_path / "one.txt"
    one.write_text("x")
    with pytest.raises(ValueError, match="at least 2"):
        load_text_corpus(one)
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\xff\xfe\xfd")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_text_corpus(binary)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ValueError, match="no usable text"):
        load_text_corpus(folder)
    (folder / "b.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="no usable text"):
        load_text_corpus(folder)
    (folder / "a.txt").write_text("fine text")
    with pytest.raises(ValueError, match="held_out_fraction"):
        load_text_corpus(folder, held_out_fraction=1.5)


# --- batching ----------------------------------------------------------------------------

STREAM = np.arange(5000, dtype=np.int64)  # position == value, so windows are easy to check


def test_sample_batch_shapes_and_windows():
    batch = sample_batch(STREAM, batch_size=8, seq_len=32, seed=0, step=0)
    assert set(batch) == {"tokens"}
    tokens = batch["tokens"]
    assert tokens.shape == (8, 33) and tokens.dtype == np.int32
    # Every row is a contiguous window of the stream.
    np.testing.assert_array_equal(tokens - tokens[:, :1], np.broadcast_to(np.arange(33), (8, 33)))
    assert tokens.min() >= 0 and tokens.max() < STREAM.size


def test_sample_batch_depends_only_on_seed_and_step(stdlib):
    a = sample_batch(stdlib.train, batch_size=4, seq_len=64, seed=3, step=7)["tokens"]
    sample_batch(stdlib.train, batch_size=4, seq_len=64, seed=3, step=8)  # unrelated call between
    b = sample_batch(stdlib.train, batch_size=4, seq_len=64, seed=3, step=7)["tokens"]
    np.testing.assert_array_equal(a, b)
    other_step = sample_batch(stdlib.train, batch_size=4, seq_len=64, seed=3, step=8)["tokens"]
    other_seed = sample_batch(stdlib.train, batch_size=4, seq_len=64, seed=4, step=7)["tokens"]
    assert not np.array_equal(a, other_step)
    assert not np.array_equal(a, other_seed)
    assert a.max() <= EOS_ID


def test_sample_batch_reaches_both_ends():
    stream = np.arange(12)
    starts = {int(sample_batch(stream, batch_size=16, seq_len=4, seed=0, step=s)["tokens"][i, 0])
              for s in range(20) for i in range(16)}
    assert starts == set(range(12 - 4))  # every start 0 .. N - T - 1, nothing past the end


def test_sample_batch_exact_fit():
    stream = np.arange(9, dtype=np.uint16)
    tokens = sample_batch(stream, batch_size=3, seq_len=8, seed=1, step=2)["tokens"]
    np.testing.assert_array_equal(tokens, np.tile(np.arange(9), (3, 1)))


def test_sample_batch_bad_input():
    with pytest.raises(ValueError, match=r"too large for the data.*10 tokens.*11"):
        sample_batch(np.arange(10), batch_size=2, seq_len=10, seed=0, step=0)
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match="batch_size"):
            sample_batch(STREAM, batch_size=bad, seq_len=4, seed=0, step=0)
        with pytest.raises(ValueError, match="seq_len"):
            sample_batch(STREAM, batch_size=2, seq_len=bad, seed=0, step=0)
    with pytest.raises(ValueError, match="step"):
        sample_batch(STREAM, batch_size=2, seq_len=4, seed=0, step=-1)
    with pytest.raises(ValueError, match="1-D"):
        sample_batch(STREAM.reshape(50, 100), batch_size=2, seq_len=4, seed=0, step=0)
    with pytest.raises(ValueError, match="integer"):
        sample_batch(STREAM.astype(np.float32), batch_size=2, seq_len=4, seed=0, step=0)


def test_eval_batches_cover_targets_once():
    stream = np.arange(103)
    batches = eval_batches(stream, batch_size=4, seq_len=10, max_batches=None)
    # (103 - 1) // 10 = 10 windows: batches of 4, 4, 2.
    assert [b["tokens"].shape for b in batches] == [(4, 11), (4, 11), (2, 11)]
    assert all(b["tokens"].dtype == np.int32 for b in batches)
    tokens = np.concatenate([b["tokens"] for b in batches])
    np.testing.assert_array_equal(tokens[:, 0], np.arange(10) * 10)
    targets = tokens[:, 1:].ravel()
    np.testing.assert_array_equal(targets, np.arange(1, 101))  # each target exactly once, in order
    again = eval_batches(stream, batch_size=4, seq_len=10, max_batches=None)
    for x, y in zip(batches, again):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])


def test_eval_batches_max_batches_and_short_streams(stdlib):
    batches = eval_batches(stdlib.held_out, batch_size=8, seq_len=128, max_batches=3)
    assert len(batches) == 3 and all(b["tokens"].shape == (8, 129) for b in batches)
    np.testing.assert_array_equal(batches[0]["tokens"][0], stdlib.held_out[:129])
    one = eval_batches(np.arange(11), batch_size=8, seq_len=10, max_batches=5)
    assert len(one) == 1 and one[0]["tokens"].tolist() == [list(range(11))]
    with pytest.raises(ValueError, match="too large for the data"):
        eval_batches(np.arange(10), batch_size=8, seq_len=10, max_batches=5)
    with pytest.raises(ValueError, match="max_batches"):
        eval_batches(np.arange(100), batch_size=8, seq_len=10, max_batches=0)
