"""Training samples: weighted blends, seeded order, resumable and data-parallel batch order, and the
checks that run before training."""

import os
import types
from pathlib import Path

import numpy
import pytest
import torch

from neox_fork.data._megatron import indexed_dataset
from neox_fork.data.datasets import DataSettings, build_batch_iterator, build_datasets, validate_data_paths
from neox_fork.errors import UserError

SEQ = 32
VOCAB = 1000
TOKENIZER = types.SimpleNamespace(eod=0, vocab_size=VOCAB, vocab_file="fake/tokenizer.json")


def _write_dataset(prefix: Path, low: int, high: int, documents: int = 200, seed: int = 0) -> str:
    """Documents of random ids in [low, high) ending with eod 0, so each sample shows its source."""
    rng = numpy.random.default_rng(seed)
    module = indexed_dataset()
    builder = module.IndexedDatasetBuilder(str(prefix) + ".bin", dtype=numpy.uint16)
    for _ in range(documents):
        doc = rng.integers(low, high, size=int(rng.integers(5, 80))).tolist() + [0]
        builder.add_document(numpy.array(doc), [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


@pytest.fixture
def sources(tmp_path):
    return [
        _write_dataset(tmp_path / "a", 100, 200, seed=1),
        _write_dataset(tmp_path / "b", 300, 400, seed=2),
        _write_dataset(tmp_path / "c", 500, 600, documents=50, seed=3),
    ]


def _source_of(tokens: torch.Tensor) -> int:
    ids = tokens[tokens != 0]
    return int(ids[0]) // 200  # 100s -> 0, 300s -> 1, 500s -> 2


def _build(paths, weights, tmp_path, samples=3000, seed=1234, **kw):
    train, valid, test = build_datasets(DataSettings(
        train_data_paths=paths, train_data_weights=weights, seq_length=SEQ, seed=seed,
        train_samples=samples, valid_samples=0, test_samples=0, cache_dir=str(tmp_path / "cache"), **kw,
    ), TOKENIZER)
    assert valid is None and test is None
    return train


def test_blend_shares_match_weights_within_one_percent(sources, tmp_path):
    weights = [0.5, 0.3, 0.2]
    train = _build(sources, weights, tmp_path, samples=5000)
    assert len(train) >= 5000
    counts = numpy.bincount([int(train[i]["dataset_id"]) for i in range(5000)], minlength=3)
    assert numpy.allclose(counts / 5000, weights, atol=0.01), counts
    # dataset_id tells the truth: the tokens come from that source (packing never mixes sources).
    for i in range(0, 5000, 97):
        item = train[i]
        assert _source_of(item["tokens"]) == int(item["dataset_id"])
    # source c (50 documents) is far smaller than its 20% share: it is repeated for more epochs.


def test_items_are_packed_next_token_pairs_with_a_loss_mask(sources, tmp_path):
    train = _build(sources[:1], None, tmp_path, samples=100)
    item = train[0]
    assert item["tokens"].shape == item["labels"].shape == item["loss_mask"].shape == (SEQ,)
    assert item["tokens"].dtype == item["labels"].dtype == torch.int64
    assert item["loss_mask"].dtype == torch.float32 and bool((item["loss_mask"] == 1).all())
    assert torch.equal(item["tokens"][1:], item["labels"][:-1])
    assert any(int((train[i]["tokens"] == 0).sum()) > 0 for i in range(20))  # samples span documents
    masked = _build(sources[:1], None, tmp_path / "m", samples=100, eod_mask_loss=True)[0]
    assert torch.equal(masked["loss_mask"], (masked["tokens"] != 0).float())


def test_same_seed_same_order_other_seed_other_order(sources, tmp_path):
    first = _build(sources, [1, 1, 1], tmp_path / "1", seed=7)
    again = _build(sources, [1, 1, 1], tmp_path / "2", seed=7)
    other = _build(sources, [1, 1, 1], tmp_path / "3", seed=8)
    tokens = lambda ds: torch.stack([ds[i]["tokens"] for i in range(200)])  # noqa: E731
    assert torch.equal(tokens(first), tokens(again))
    assert not torch.equal(tokens(first), tokens(other))


def test_index_cache_is_written_once_then_reused(sources, tmp_path):
    first = _build(sources[:1], None, tmp_path, samples=500)
    cache = tmp_path / "cache"
    files = sorted(cache.iterdir())
    assert any(f.name.endswith("shuffle_index.npy") for f in files)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    second = _build(sources[:1], None, tmp_path, samples=500)
    assert sorted(cache.iterdir()) == files
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert torch.equal(first[123]["tokens"], second[123]["tokens"])


def _all_batches(iterator):
    return [batch for batch in iterator]


def test_resuming_at_consumed_samples_equals_skipping_ahead(sources, tmp_path):
    train = _build(sources, [2, 1, 1], tmp_path, samples=400)
    full = _all_batches(build_batch_iterator(train, consumed_samples=0, micro_batch_size=4,
                                             data_parallel_rank=0, data_parallel_size=1))
    assert len(full) == len(train) // 4
    resumed = _all_batches(build_batch_iterator(train, consumed_samples=40, micro_batch_size=4,
                                                data_parallel_rank=0, data_parallel_size=1))
    assert len(resumed) == len(full) - 10
    for a, b in zip(full[10:], resumed):
        assert set(a) == set(b) == {"tokens", "labels", "loss_mask"}
        assert all(torch.equal(a[k], b[k]) for k in a)
    with_workers = _all_batches(build_batch_iterator(train, consumed_samples=40, micro_batch_size=4,
                                                     data_parallel_rank=0, data_parallel_size=1, num_workers=2))
    assert len(with_workers) == len(resumed)  # zip below would stop at the shorter one
    for a, b in zip(resumed, with_workers):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_two_data_parallel_ranks_split_each_global_batch_of_one_rank(sources, tmp_path):
    train = _build(sources, None, tmp_path, samples=300)
    single = build_batch_iterator(train, consumed_samples=16, micro_batch_size=8,
                                  data_parallel_rank=0, data_parallel_size=1)
    rank0 = build_batch_iterator(train, consumed_samples=16, micro_batch_size=4,
                                 data_parallel_rank=0, data_parallel_size=2)
    rank1 = build_batch_iterator(train, consumed_samples=16, micro_batch_size=4,
                                 data_parallel_rank=1, data_parallel_size=2)
    steps = 0
    for whole, first, second in zip(single, rank0, rank1):
        for key in whole:
            assert torch.equal(whole[key], torch.cat([first[key], second[key]]))
        steps += 1
    assert steps == (len(train) - 16) // 8


def test_consumed_samples_beyond_the_dataset_is_a_user_error(sources, tmp_path):
    train = _build(sources[:1], None, tmp_path, samples=50)
    with pytest.raises(UserError, match=f"consumed samples {len(train) + 1} lies outside the dataset's {len(train)} samples"):
        build_batch_iterator(train, consumed_samples=len(train) + 1, micro_batch_size=1,
                             data_parallel_rank=0, data_parallel_size=1)


def test_data_path_is_cut_into_train_valid_test_by_split(tmp_path):
    # Document d (0..199) holds only the id d + 1, so every token names the document it came from.
    module = indexed_dataset()
    prefix = str(tmp_path / "numbered")
    builder = module.IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    lengths = numpy.random.default_rng(4).integers(5, 80, size=200)
    for d, length in enumerate(lengths):
        builder.add_document(numpy.array([d + 1] * int(length) + [0]), [int(length) + 1])
    builder.finalize(prefix + ".idx")
    train, valid, test = build_datasets(DataSettings(
        data_path=prefix, split="80,20,0", seq_length=SEQ, seed=1, train_samples=100, valid_samples=10,
        test_samples=0, cache_dir=str(tmp_path / "cache"),
    ), TOKENIZER)
    assert len(train) >= 100 and len(valid) >= 10 and test is None

    def documents(split):
        return {int(t) - 1 for i in range(len(split)) for t in split[i]["tokens"].unique() if t != 0}

    # 80,20,0 of 200 documents: train holds documents 0-159, valid 160-199, none in both.
    in_train, in_valid = documents(train), documents(valid)
    assert in_train <= set(range(160)) and in_valid <= set(range(160, 200))
    # Each split is one shuffled epoch of its documents; only the tail after the last whole sample
    # (under SEQ + 1 = 33 tokens, so at most 6 documents of >= 6 tokens) may be left out.
    assert len(in_train) >= 160 - 6 and len(in_valid) >= 40 - 6


# --- validation before training -------------------------------------------------------------


def _validate(**kw):
    args = dict(seq_length=SEQ, train_samples=10, valid_samples=0, test_samples=0, tokenizer=TOKENIZER)
    args.update(kw)
    tokenizer = args.pop("tokenizer")
    return validate_data_paths(DataSettings(**args), tokenizer)


def test_missing_files_are_named(sources, tmp_path):
    with pytest.raises(UserError, match=f"data path {tmp_path}/nope: {tmp_path}/nope.idx does not exist"):
        _validate(train_data_paths=[str(tmp_path / "nope")])
    os.unlink(sources[1] + ".bin")
    with pytest.raises(UserError, match=f"data path {sources[1]}: {sources[1]}.bin does not exist"):
        _validate(train_data_paths=[sources[0], sources[1]])


def test_truncated_bin_and_idx_are_detected(sources):
    with open(sources[0] + ".bin", "r+b") as stream:
        stream.truncate(os.path.getsize(sources[0] + ".bin") - 2)
    with pytest.raises(UserError, match=rf"data path {sources[0]}: {sources[0]}.bin is truncated or does not belong to its .idx"):
        _validate(data_path=sources[0])
    with open(sources[1] + ".idx", "r+b") as stream:
        stream.truncate(100)
    with pytest.raises(UserError, match=rf"data path {sources[1]}: {sources[1]}.idx is truncated or corrupt"):
        _validate(data_path=sources[1])
    Path(sources[2] + ".idx").write_bytes(b"garbage")
    with pytest.raises(UserError, match=rf"{sources[2]}.idx is not a Megatron mmap index"):
        _validate(data_path=sources[2])


def test_token_ids_beyond_the_vocabulary_are_detected(sources):
    small = types.SimpleNamespace(eod=0, vocab_size=550, vocab_file="small/tokenizer.json")
    _validate(train_data_paths=sources[:2], tokenizer=small)  # ids < 400 fit
    with pytest.raises(UserError, match=rf"data path {sources[2]}: holds token id 599 but the tokenizer of "
                                        r"vocab-file small/tokenizer.json has only 550 ids"):
        _validate(train_data_paths=sources, tokenizer=small)


def test_weights_must_match_paths(sources):
    with pytest.raises(UserError, match=r"train-data-weights: 2 weights for 3 paths .*give one weight per path"):
        _validate(train_data_paths=sources, train_data_weights=[1, 2])
    with pytest.raises(UserError, match=r"valid-data-weights: \[1, 0\] must all be positive"):
        _validate(train_data_paths=sources, valid_data_paths=sources[:2], valid_data_weights=[1, 0])


def test_data_too_small_for_one_sample_is_an_error(tmp_path, sources):
    tiny = _write_dataset(tmp_path / "tiny", 100, 200, documents=1)
    with pytest.raises(UserError, match=rf"train-data-paths {tiny}: holds \d+ tokens, fewer than one sample "
                                        rf"of seq_length \+ 1 = 1001"):
        _validate(train_data_paths=[tiny], seq_length=1000)
    with pytest.raises(UserError, match=rf"data-path {sources[2]}: split '99,1,0' gives the valid split 0 documents "
                                        r"with 0 tokens"):
        _validate(data_path=sources[2], split="99,1,0", valid_samples=5)


def test_data_settings_must_name_training_data_once(sources):
    with pytest.raises(UserError, match="no training data: set data-path or train-data-paths"):
        _validate()
    with pytest.raises(UserError, match="set either data-path .* or train-data-paths, not both"):
        _validate(data_path=sources[0], train_data_paths=sources[:1])
    with pytest.raises(UserError, match="split 'abc': expected up to three"):
        _validate(data_path=sources[0], split="abc")
