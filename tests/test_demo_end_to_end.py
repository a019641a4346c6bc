"""README command 1's chain on configs/tiny.yml: deepy train -> checkpoint -> HF export -> transformers sample."""

import pytest
import yaml

from conftest import run_cli

pytestmark = [pytest.mark.slow]


def run(*args):
    done = run_cli(*args, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_tiny_config_trains_exports_and_samples_through_transformers(tmp_path, small_corpus):
    overlay = tmp_path / "overlay.yml"
    overlay.write_text(yaml.safe_dump({
        "train-data-paths": [str(small_corpus / "train_text_document")],
        "valid-data-paths": [str(small_corpus / "valid_text_document")],
        "vocab-file": str(small_corpus / "tokenizer.json"),
        "train-iters": 6, "eval-interval": 3, "eval-iters": 1, "log-interval": 1, "checkpoint-factor": 3,
        "train_micro_batch_size_per_gpu": 2, "save": str(tmp_path / "ckpt"), "load": str(tmp_path / "ckpt"),
    }))
    out = run("deepy.py", "train.py", "configs/tiny.yml", overlay)
    assert "step 6/6" in out and "saved checkpoint" in out
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step6"
    run("tools/convert_to_hf.py", "--input-dir", tmp_path / "ckpt", "--output-dir", tmp_path / "hf")
    sample = run("tools/sample_hf.py", tmp_path / "hf", "--prompt", "import os", "--max-new-tokens", "8")
    assert sample.startswith(f"StableLmForCausalLM from {tmp_path / 'hf'}:\nimport os")
