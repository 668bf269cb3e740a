"""Packed documents (jaxdec.data.packing): every document comes back whole from its rows, segment
ids restart per row, padding is 0, and the padding fractions equal a hand count."""

import numpy as np
import pytest

from jaxdec.data import ByteTokenizer, load_text_corpus
from jaxdec.data.packing import (documents_of, pack_documents, packed_eval_batches,
                                 sample_packed_batch, split_pieces)

PAD = 99


def _docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 90, n).astype(np.uint16) for n in lengths]


def _reassemble(packed, n_docs):
    """Each document from its pieces, read back out of the rows by the pieces table."""
    parts = [[] for _ in range(n_docs)]
    for doc, start, n, row, col in packed.pieces:
        parts[doc].append((start, packed.tokens[row, col:col + n]))
    return [np.concatenate([p for _, p in sorted(ps, key=lambda x: x[0])]) for ps in parts]


@pytest.mark.parametrize("lengths", [[3, 5, 9, 1, 1, 2, 7], [20, 4, 33, 9, 9, 9, 1], list(range(1, 40))])
def test_rows_give_back_every_document_and_segments_restart_per_row(lengths):
    row_len = 9
    docs = _docs(lengths)
    packed = pack_documents(docs, row_len, PAD)
    assert packed.tokens.shape[1] == row_len and packed.tokens.dtype == np.int32
    for got, want in zip(_reassemble(packed, len(docs)), docs):
        np.testing.assert_array_equal(got, want)
    # Independently of the pieces table: each row's segments, read left to right, are runs of
    # ids 1, 2, ..., k, then padding (id 0, token PAD); their multiset equals the pieces cut by hand.
    seen = []
    for tokens, segs in zip(packed.tokens, packed.segment_ids):
        real = segs > 0
        k = int(real.sum())
        assert real[:k].all() and not real[k:].any()  # pieces first, padding after
        assert (tokens[~real] == PAD).all()
        ids = segs[:k]
        assert ids[0] == 1 and set(np.diff(ids)) <= {0, 1}  # restart at 1, count up by one
        for s in range(1, int(ids.max()) + 1):
            seen.append(tuple(tokens[:k][ids == s]))
    by_hand = [tuple(d[i:i + row_len]) for d in docs for i in range(0, len(d), row_len)]
    assert sorted(seen) == sorted(by_hand)


def test_padding_fractions_equal_a_hand_count():
    # Rows of 10. Pieces by hand: 10 | 7 | 10, 6 (from 16) | 3 | 3 | 10, 2 (from 12): 8 pieces,
    # 51 tokens. Best fit decreasing: [10] [10] [10] [7 3] [6 3 .] [2 ........]: 6 rows.
    lengths = [10, 7, 16, 3, 3, 12]
    packed = pack_documents(_docs(lengths), 10, PAD)
    assert len(packed.tokens) == 6 and len(packed.pieces) == 8
    assert packed.padding_fraction == pytest.approx((60 - 51) / 60)
    assert packed.unpacked_padding_fraction == pytest.approx((80 - 51) / 80)
    np.testing.assert_array_equal((packed.segment_ids == 0).sum(axis=1), [0, 0, 0, 0, 1, 8])


def test_best_fit_fills_rows():
    # Pieces 6, 4, 5, 5, 3, 7 in rows of 10: best fit decreasing gives [7 3] [6 4] [5 5]: no padding.
    packed = pack_documents(_docs([6, 4, 5, 5, 3, 7]), 10, PAD)
    assert len(packed.tokens) == 3 and packed.padding_fraction == 0.0
    assert packed.unpacked_padding_fraction == pytest.approx(30 / 60)


def test_pieces_of_long_documents_are_row_sized():
    np.testing.assert_array_equal(split_pieces([25, 10, 3], 10),
                                  [[0, 0, 10], [0, 10, 10], [0, 20, 5], [1, 0, 10], [2, 0, 3]])


def test_packing_is_deterministic_and_batches_are_a_function_of_seed_and_step():
    docs = _docs([5, 17, 3, 8, 8, 2, 30, 1])
    a, b = pack_documents(docs, 8, PAD), pack_documents(docs, 8, PAD)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.segment_ids, b.segment_ids)
    x = sample_packed_batch(a, batch_size=4, seed=1, step=7)
    y = sample_packed_batch(b, batch_size=4, seed=1, step=7)
    assert set(x) == {"tokens", "segment_ids"}
    assert x["tokens"].shape == x["segment_ids"].shape == (4, 8) and x["segment_ids"].dtype == np.int32
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
    z = sample_packed_batch(a, batch_size=4, seed=1, step=8)
    assert not np.array_equal(x["tokens"], z["tokens"])
    batches = packed_eval_batches(a, batch_size=3, max_batches=None)
    np.testing.assert_array_equal(np.concatenate([q["tokens"] for q in batches]), a.tokens)


def test_a_corpus_packs_its_documents(tmp_path):
    for i, text in enumerate(["alpha " * 30, "b", "gamma delta\n" * 5, "é" * 40]):
        (tmp_path / f"f{i}.txt").write_text(text, encoding="utf-8")
    corpus = load_text_corpus(tmp_path, held_out_fraction=0.3)
    docs = documents_of(corpus.train, corpus.train_offsets)
    assert len(docs) == len(corpus.train_files)
    tok = ByteTokenizer()
    assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in docs)
    packed = pack_documents(docs, 33, tok.pad_id)
    for got, want in zip(_reassemble(packed, len(docs)), docs):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bad, match", [
    (dict(row_len=1), "row_len"),
    (dict(documents=[]), "at least one"),
    (dict(documents=[np.zeros(0, np.int32)]), "document 0"),
    (dict(documents=[np.zeros(3, np.float32)]), "document 0"),
])
def test_bad_input_is_refused(bad, match):
    args = dict(documents=_docs([3]), row_len=4, pad_id=PAD) | bad
    with pytest.raises(ValueError, match=match):
        pack_documents(**args)


def test_a_packed_run_feeds_train_step_its_segment_ids(tmp_path):
    """The run's packed batches are what train_step checks and accepts (tokens and segment_ids)."""
    import dataclasses

    from jaxdec.tools.run import PRESETS, LMTask
    from jaxdec.training import check_batch

    for i in range(6):
        (tmp_path / f"f{i}.txt").write_text(f"document {i} " * (20 + 15 * i), encoding="utf-8")
    cfg = dataclasses.replace(PRESETS["tiny"], data=str(tmp_path), pack=True, batch_size=3, seq_len=64,
                              eval_batches=1)
    task = LMTask(cfg)
    batch = task.train_batch(0)
    assert set(batch) == {"tokens", "segment_ids"} and batch["segment_ids"].shape == (3, 65)
    check_batch(batch, cfg.model, check_values=True)
    assert task.packed.padding_fraction <= task.packed.unpacked_padding_fraction
    assert set(task.eval_data[0]) == {"tokens", "segment_ids"}
