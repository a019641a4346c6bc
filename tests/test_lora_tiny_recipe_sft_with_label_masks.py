"""The tiny LoRA recipe (configs/tiny.yml + configs/tiny-sft.yml + configs/tiny-lora.yml) trains: LoRA on the
shipped chat set with its label masks and pack_until_overflow, from a base checkpoint at the tests' width. Its
loss falls below the base's on the same batches (the same chain at lr 1e-12): by about 0.45 over the last 10
of 30 steps here; the bound is 0.1."""

import os
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, read_metrics, run_cli

pytestmark = [pytest.mark.slow]

STEPS = 30


def _run(tmp, name, sft_chat_data, base, **extra):
    folder = tmp / name
    folder.mkdir()
    overlay = {  # the shipped overlays' data keys pointed at the session's chat set, at the base's width
        "vocab-file": str(Path(sft_chat_data["tokenizer"]) / "tokenizer.json"),
        "train-data-paths": [sft_chat_data["train"][0]], "train-label-data-paths": [sft_chat_data["train"][1]],
        "valid-data-paths": [sft_chat_data["valid"][0]], "valid-label-data-paths": [sft_chat_data["valid"][1]],
        "load": str(base), "save": str(folder / "ckpt"), "num-layers": 2, "hidden-size": 64, "mlp_multiple_of": 32,
        "seq-length": 64, "max-position-embeddings": 64, "train-iters": STEPS, "checkpoint-factor": STEPS,
        "eval-interval": 1000, "num-workers": 0, "log-interval": 1, **extra,
    }
    (folder / "test.yml").write_text(yaml.safe_dump(overlay))
    configs = [REPO / "configs" / f for f in ("tiny.yml", "tiny-sft.yml", "tiny-lora.yml")]
    run = run_cli("train.py", *configs, folder / "test.yml", timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    return folder / "ckpt"


def test_tiny_lora_recipe_learns_the_replies(tmp_path, sft_chat_data, trained_checkpoint):
    trained = _run(tmp_path, "lora", sft_chat_data, trained_checkpoint)
    frozen = _run(tmp_path, "frozen", sft_chat_data, trained_checkpoint, min_lr=1e-12,
                  optimizer={"type": "Adam", "params": {"lr": 1e-12}})
    ours, base = read_metrics(trained), read_metrics(frozen)
    assert abs(ours[1] - base[1]) < 1e-6  # B = 0: the base's loss on the first batch
    late = range(STEPS - 9, STEPS + 1)
    assert sum(ours[i] for i in late) / 10 < sum(base[i] for i in late) / 10 - 0.1
