"""Packing, length buckets, deterministic shuffling and exact resume."""

import numpy as np
import pytest

from jpeft.train.data import BatchIterator, BatchPlan, Example, collate, default_buckets, pack_plan


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = rng.integers(4, 100, size=n)
        mask = np.zeros(n, dtype=np.int32)
        mask[max(1, n // 2) :] = 1  # second half is the "response"
        out.append(Example(ids, mask, source=f"ex{i}"))
    return out


LENGTHS = [3, 7, 5, 12, 2, 9, 16, 4, 6, 11, 8, 3, 5, 14, 7, 2, 10, 6, 9, 13]


def _segments(batch, r):
    """(start, end) of each segment of row r, in order."""
    seg = batch["segment_ids"][r]
    ids = sorted(set(seg.tolist()) - {0})
    return [(int(np.argmax(seg == k)), int(len(seg) - np.argmax(seg[::-1] == k))) for k in ids]


def test_packed_rows_keep_examples_apart():
    examples = _examples(LENGTHS)
    it = BatchIterator(examples, batch_size=3, seq_len=16, seed=1, pad_id=0)
    seen = []
    for batch in it.epoch_batches(0):
        assert set(batch) == {
            "input_ids",
            "attention_mask",
            "loss_mask",
            "segment_ids",
            "position_ids",
        }
        assert all(v.dtype == np.int32 and v.shape == (3, 16) for v in batch.values())
        seg, pos = batch["segment_ids"], batch["position_ids"]
        np.testing.assert_array_equal(batch["attention_mask"], seg > 0)
        for r in range(3):
            spans = _segments(batch, r)
            n_real = sum(e - s for s, e in spans)
            # segments are 1..k, contiguous, in order, then padding only
            assert seg[r].tolist() == [
                k for k, (s, e) in enumerate(spans, 1) for _ in range(e - s)
            ] + [0] * (16 - n_real)
            for s, e in spans:
                np.testing.assert_array_equal(pos[r, s:e], np.arange(e - s))
                match = [
                    i
                    for i, ex in enumerate(examples)
                    if np.array_equal(ex.input_ids, batch["input_ids"][r, s:e])
                ]
                assert match, "a segment is not exactly one example"
                np.testing.assert_array_equal(
                    batch["loss_mask"][r, s:e], examples[match[0]].loss_mask
                )
                seen.append(match[0])
                # a target never looks across a segment start: its predecessor is in its segment
                assert batch["loss_mask"][r, s] == 0
            assert not batch["loss_mask"][r, n_real:].any() and not pos[r, n_real:].any()
    assert sorted(seen) == list(range(len(examples)))  # each example exactly once per epoch


def test_pack_plan_next_fit_and_filler_rows():
    plans = pack_plan([3, 4, 5, 8, 1], order=[0, 1, 2, 3, 4], batch_size=2, seq_len=8)
    assert plans == [
        BatchPlan(8, ((0, 1), (2,))),
        BatchPlan(8, ((3,), (4,))),
    ]
    plans = pack_plan([3, 4, 5], order=[2, 1, 0], batch_size=3, seq_len=8)
    assert plans == [BatchPlan(8, ((2,), (1, 0), ()))]
    batch = collate(_examples([3, 4, 5]), plans[0])
    assert not batch["attention_mask"][2].any() and not batch["loss_mask"][2].any()


def test_padding_mode_buckets_lengths():
    examples = _examples(LENGTHS)
    it = BatchIterator(examples, batch_size=4, seq_len=16, packing=False, buckets=(4, 8), seed=0)
    assert it.buckets == (4, 8, 16)
    seen = []
    for batch in it.epoch_batches(0):
        assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}
        T = batch["input_ids"].shape[1]
        lengths = batch["attention_mask"].sum(1)
        real = lengths[lengths > 0]
        assert T in (4, 8, 16) and real.max() <= T
        assert T == 4 or real.max() > {8: 4, 16: 8}[T]  # shortest bucket that holds the longest
        for r, n in enumerate(lengths):
            assert batch["attention_mask"][r, :n].all() and not batch["attention_mask"][r, n:].any()
            seen += [
                i
                for i, ex in enumerate(examples)
                if n and np.array_equal(ex.input_ids, batch["input_ids"][r, :n])
            ]
    assert sorted(seen) == list(range(len(examples)))
    assert default_buckets(256) == (16, 32, 64, 128, 256)


@pytest.mark.parametrize("packing", [True, False])
def test_shuffle_is_deterministic_by_seed_and_epoch(packing):
    examples = _examples(LENGTHS * 3)

    def firsts(seed, epoch):
        it = BatchIterator(examples, batch_size=2, seq_len=16, packing=packing, seed=seed)
        return [b["input_ids"].tolist() for b in it.epoch_batches(epoch)]

    assert firsts(0, 0) == firsts(0, 0)
    assert firsts(0, 0) != firsts(1, 0)
    assert firsts(0, 0) != firsts(0, 1)
    it = BatchIterator(examples, batch_size=2, seq_len=16, packing=packing, shuffle=False)
    assert [b["input_ids"].tolist() for b in it.epoch_batches(0)] == [
        b["input_ids"].tolist() for b in it.epoch_batches(5)
    ]


@pytest.mark.parametrize("packing", [True, False])
def test_resume_continues_exactly(packing):
    examples = _examples(LENGTHS)
    kwargs = dict(batch_size=3, seq_len=16, packing=packing, seed=7, drop_remainder=packing)
    reference = BatchIterator(examples, **kwargs)
    per_epoch = len(reference.plan(0))
    stream = [next(reference) for _ in range(3 * per_epoch + 2)]
    assert reference.state["epoch"] == 3
    for stop in (1, per_epoch, per_epoch + 1, 2 * per_epoch + 2):
        it = BatchIterator(examples, **kwargs)
        for _ in range(stop):
            next(it)
        saved = dict(it.state)
        resumed = BatchIterator(examples, **kwargs, state=saved)
        for want in stream[stop : stop + per_epoch]:
            got = next(resumed)
            assert all(np.array_equal(got[k], want[k]) for k in want)


def test_bad_state_and_sizes_are_rejected():
    examples = _examples(LENGTHS)
    with pytest.raises(ValueError, match="keys 'epoch' and 'index'"):
        BatchIterator(examples, batch_size=2, seq_len=16, state={"step": 3})
    with pytest.raises(ValueError, match="past the"):
        BatchIterator(examples, batch_size=2, seq_len=16, state={"epoch": 0, "index": 10_000})
    with pytest.raises(
        ValueError, match=r"example 6 \(ex6\) has 16 tokens, more than the maximum of 15"
    ):
        BatchIterator(examples, batch_size=2, seq_len=15)
    with pytest.raises(ValueError, match="no full batch"):
        BatchIterator(examples[:3], batch_size=8, seq_len=16, packing=False, drop_remainder=True)


def test_packed_logits_equal_unpacked_through_the_model():
    """The model fed a packed batch gives each example the logits it gets alone."""
    import jax

    from jpeft.models.config import LlamaConfig
    from jpeft.models.llama import forward, init_params

    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    params = init_params(jax.random.key(0), cfg)
    examples = _examples([5, 7, 3, 9, 4, 6])
    batch = next(BatchIterator(examples, batch_size=2, seq_len=16, seed=0))
    packed = forward(
        params,
        cfg,
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        segment_ids=batch["segment_ids"],
    )
    checked = 0
    for r in range(2):
        for s, e in _segments(batch, r):
            alone = forward(params, cfg, batch["input_ids"][r : r + 1, s:e])
            np.testing.assert_allclose(packed[r, s:e], alone[0], rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked >= 3
