"""tools/datasets/prepare_demo_data.py builds a small corpus offline, deterministically, and skips a finished build."""

import json
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

from conftest import tiny_keys
from neox_fork.config.loading import from_dict
from neox_fork.data._megatron import indexed_dataset
from neox_fork.data.datasets import DataSettings, build_batch_iterator, build_datasets
from neox_fork.data.tokenizer import build_tokenizer
from neox_fork.model.transformer import build_model
from neox_fork.training.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]


def _prepare(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "datasets" / "prepare_demo_data.py"), "--output-dir", str(out),
         "--max-bytes", "300000", "--vocab-size", "600", "--workers", "2", *extra],
        capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
def test_demo_corpus_is_built_deterministically_and_trains(tmp_path, one_process):
    first, second = tmp_path / "one", tmp_path / "two"
    done = _prepare(first)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["splits"]["train"]["tokens"] > 50_000
    assert manifest["splits"]["valid"]["documents"] >= 1
    assert _prepare(second).returncode == 0
    for name in ("tokenizer.json", "train_text_document.bin", "train_text_document.idx", "valid_text_document.bin"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    # Both code and prose are in it.
    sources = [json.loads(line)["source"] for line in (first / "train.jsonl").read_text().splitlines()]
    assert any(s.startswith("code:stdlib/") for s in sources)
    assert any(s.startswith(("docstrings:", "docs:")) for s in sources)

    tokenizer = build_tokenizer("HFTokenizer", str(first / "tokenizer.json"))
    assert tokenizer.vocab_size == 600 and tokenizer.eod == 0
    docs = indexed_dataset().IndexedDataset(str(first / "train_text_document"))
    assert int(docs[0][-1]) == tokenizer.eod  # documents end with <|endoftext|>
    text = json.loads((first / "train.jsonl").read_text().splitlines()[0])["text"]
    assert docs[0][:-1].tolist() == tokenizer.encode(text)

    train, valid, _ = build_datasets(DataSettings(
        train_data_paths=[str(first / "train_text_document")], valid_data_paths=[str(first / "valid_text_document")],
        seq_length=64, seed=1, train_samples=32, valid_samples=4, test_samples=0, cache_dir=str(tmp_path / "cache"),
    ), tokenizer)
    assert len(train) >= 32 and len(valid) >= 4
    assert int(numpy.max(train[0]["tokens"].numpy())) < tokenizer.vocab_size
    _trains(train, valid, tokenizer)

    again = _prepare(first)
    assert again.returncode == 0 and "already built" in again.stdout


def _trains(train, valid, tokenizer, steps=20):
    """20 AdamW steps of the tests' model (in this process) on the training samples lower the loss on the
    validation samples below ln(vocab) - 0.3: a model cannot beat ln(vocab) on tokens without structure
    (uniform ids), and this one starts above it (about 6.5 for 600 ids; 20 steps reach about 5.7)."""
    torch.manual_seed(0)
    config = from_dict(tiny_keys(vocab_size=tokenizer.vocab_size, seq_length=64,
                                 optimizer={"type": "Adam", "params": {"lr": 3e-3}}))
    model, batch = build_model(config), next(build_batch_iterator(
        valid, consumed_samples=0, micro_batch_size=4, data_parallel_rank=0, data_parallel_size=1))

    def valid_loss():
        with torch.no_grad():
            return model.eval()(batch["tokens"], labels=batch["labels"]).item()

    before, optimizer = valid_loss(), build_optimizer(config, model.train())
    batches = build_batch_iterator(train, consumed_samples=0, micro_batch_size=8, data_parallel_rank=0,
                                   data_parallel_size=1)
    for _, step in zip(range(steps), batches):
        model.train()(step["tokens"], labels=step["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = valid_loss()
    assert after < numpy.log(tokenizer.vocab_size) - 0.3 and after < before - 0.5, (before, after)
