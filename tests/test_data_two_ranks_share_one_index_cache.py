"""Under torch.distributed (2 gloo ranks) rank 0 writes the index caches and both ranks see the same samples."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy
import pytest

from neox_fork.data._megatron import indexed_dataset

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, types
    import numpy
    import torch.distributed as dist
    sys.path.insert(0, {repo!r})
    saved = []  # every index file this rank writes (megatron-core saves each with numpy.save)
    numpy_save = numpy.save
    def counting_save(path, *args, **kwargs):
        saved.append(os.path.basename(str(path)))
        return numpy_save(path, *args, **kwargs)
    numpy.save = counting_save
    from neox_fork.data.datasets import DataSettings, build_datasets
    dist.init_process_group("gloo")
    tokenizer = types.SimpleNamespace(eod=0, vocab_size=1000)
    train, _, _ = build_datasets(DataSettings(train_data_paths={paths!r}, train_data_weights=[1, 3], seq_length=16,
                                              seed=3, train_samples=200, cache_dir={cache!r}), tokenizer)
    rows = [train[i]["tokens"].tolist() for i in range(50)]
    with open({out!r} + str(dist.get_rank()), "w") as f:
        json.dump(dict(rows=rows, saved=saved), f)
    dist.destroy_process_group()
    """
)


def test_two_ranks_build_identical_samples_from_one_cache(tmp_path):
    module = indexed_dataset()
    paths = []
    for n, (low, high) in enumerate([(10, 100), (200, 300)]):
        prefix = str(tmp_path / f"d{n}")
        builder = module.IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
        rng = numpy.random.default_rng(n)
        for _ in range(60):
            doc = numpy.append(rng.integers(low, high, size=int(rng.integers(3, 40))), 0)
            builder.add_document(doc, [len(doc)])
        builder.finalize(prefix + ".idx")
        paths.append(prefix)
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT.format(repo=str(REPO), paths=paths, cache=str(tmp_path / "cache"), out=str(tmp_path / "rows")))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rows0").read_text())
    rank1 = json.loads((tmp_path / "rows1").read_text())
    assert rank0["rows"] == rank1["rows"]
    # Only rank 0 built and wrote the indices, each once; rank 1 read them (a rank that built its own, even
    # into the same names, would be seen here)
    npy = sorted(p.name for p in (tmp_path / "cache").glob("*.npy"))
    assert rank1["saved"] == [] and sorted(rank0["saved"]) == npy
    cached = sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache").iterdir())
    # One set of GPTDataset indices per source, and the blend's own index (cached under a process group).
    assert cached.count("GPTDataset-train-shuffle_index.npy") == 2
    assert "BlendedDataset-train-dataset_index.npy" in cached
