"""A corrupt or foreign megatron-core index cache (`*_index.npy`) is one line naming the file and how to rebuild it,
never a numpy traceback, and a pickle there is never unpickled; deleting the file rebuilds the same samples."""

import pickle
import types

import numpy
import pytest
import torch

from neox_fork.data import index_cache
from neox_fork.data.datasets import DataSettings, build_datasets
from neox_fork.errors import UserError
from test_data_datasets_blend_order_resume_and_validation import _write_dataset

TOKENIZER = types.SimpleNamespace(eod=0, vocab_size=1000, vocab_file="fake/tokenizer.json")


class _Marker:
    """Unpickling this runs `open(path, "w")`: the marker file appears if anything unpickles the payload."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def _build(tmp_path):
    train, _, _ = build_datasets(DataSettings(seq_length=32, train_samples=40, split="100,0,0",
                                              data_path=str(tmp_path / "docs"), cache_dir=str(tmp_path / "cache")),
                                 TOKENIZER)
    return [train[i]["tokens"] for i in range(len(train))]


@pytest.fixture
def built(tmp_path):
    _write_dataset(tmp_path / "docs", 100, 200)
    samples = _build(tmp_path)
    files = sorted((tmp_path / "cache").glob("*_index.npy"))
    assert [f.name.split("-")[-1] for f in files] == ["document_index.npy", "sample_index.npy", "shuffle_index.npy"]
    return tmp_path, samples, files


def _pickle(path, tmp_path):
    path.write_bytes(pickle.dumps(_Marker(tmp_path / "unpickled")))


def _object_array(path, tmp_path):
    numpy.save(path, numpy.array([_Marker(tmp_path / "unpickled")], dtype=object), allow_pickle=True)


def _truncated(path, tmp_path):
    path.write_bytes(path.read_bytes()[:-8])


def _cut_header(path, tmp_path):
    path.write_bytes(path.read_bytes()[:9])


def _floats(path, tmp_path):
    numpy.save(path, numpy.zeros(4, dtype=numpy.float32))


@pytest.mark.parametrize("damage, problem", [
    (_pickle, "not a numpy array file (a pickle, or another format)"),
    (_object_array, "holds Python objects (a pickle inside a numpy file), not the integer index megatron-core "
                    "writes"),
    (_truncated, "truncated: "),
    (_cut_header, "truncated: 9 bytes, its numpy header cut short"),
    (_floats, "holds float32 values, not the integer index megatron-core writes"),
])
def test_damaged_index_is_one_line_and_deleting_it_rebuilds(built, damage, problem):
    tmp_path, samples, files = built
    victim = files[1]
    damage(victim, tmp_path)
    with pytest.raises(UserError) as err:
        _build(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"index cache {victim}: {problem}"), message
    assert message.endswith("; delete it and the run rebuilds its dataset's index files (rank 0 writes them again "
                            "where one is missing)")
    assert not (tmp_path / "unpickled").exists()  # the pickle was never loaded
    victim.unlink()
    rebuilt = _build(tmp_path)
    assert len(rebuilt) == len(samples) and all(torch.equal(a, b) for a, b in zip(rebuilt, samples))


def test_megatron_index_files_pass_the_check(built):
    _, _, files = built
    assert [index_cache.index_file_problem(f) for f in files] == [None, None, None]
