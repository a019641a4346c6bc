"""Shared fixtures: paths, a tiny config, and a one-process parallel state for model tests."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
NEOX_TOKENIZER = SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
PYTHON = sys.executable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_keys(**overrides):
    """The tests' model: StableLM's architecture at a width a CPU runs in milliseconds."""
    keys = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=256, rotary_pct=0.25,
                vocab_size=1000, no_weight_tying=True, mlp_multiple_of=32)
    keys.update(overrides)
    return keys


@pytest.fixture
def one_process():
    """TP=1 process groups in this process (a private one-rank gloo group)."""
    from neox_fork import parallel

    parallel.initialize(1)
    yield
    parallel.destroy()
