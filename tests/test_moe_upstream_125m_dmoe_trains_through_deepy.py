"""Upstream's configs/125M-dmoe.yml, unchanged, trains through deepy.py with a local_setup.yml (data, tokenizer,
save) and an overlay that shrinks it to a CPU shape: 8 experts, sinkhorn top-1, ungated gelu experts, bf16,
activation checkpointing (the MoE layers recompute inside it), ZeRO-1. Its `hostfile: /mock_path` is a
placeholder upstream's own tests replace too: the overlay unsets it."""

import json
import math
import os
import subprocess

import pytest

from conftest import PYTHON, REPO

pytestmark = [pytest.mark.slow]

DMOE = REPO / "tests" / "upstream_configs" / "125M-dmoe.yml"


def test_125m_dmoe_trains_through_deepy_at_a_tiny_shape(tmp_path, small_corpus):
    (tmp_path / "125M-dmoe.yml").write_bytes(DMOE.read_bytes())
    (tmp_path / "local_setup.yml").write_text(json.dumps(dict(
        train_data_paths=[str(small_corpus / "train_text_document")],
        valid_data_paths=[str(small_corpus / "valid_text_document")],
        tokenizer_type="HFTokenizer", vocab_file=str(small_corpus / "tokenizer.json"),
        save=str(tmp_path / "checkpoints"), distributed_backend="gloo", num_workers=0)))
    (tmp_path / "tiny.yml").write_text(json.dumps(dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64, max_position_embeddings=64,
        train_iters=2, lr_decay_iters=2, train_micro_batch_size_per_gpu=2, log_interval=1, eval_interval=1000,
        eval_iters=1, checkpoint_factor=2, hostfile=None)))
    done = subprocess.run([PYTHON, "deepy.py", "train.py", "-d", str(tmp_path), "125M-dmoe.yml", "local_setup.yml",
                           "tiny.yml"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    rows = [json.loads(line) for line in (tmp_path / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "lm_loss" in r]
    assert [r["iteration"] for r in steps] == [1, 2] and all(math.isfinite(r["lm_loss"]) for r in steps)
    # sinkhorn has no load-balancing loss; every layer (interval 1) routes each of the 2 x 64 tokens to 1 expert
    assert "moe_lbl" not in steps[0]
    for layer in (0, 1):
        assert sum(steps[0][f"moe_tokens/layer{layer}/expert{e}"] for e in range(8)) == 2 * 64
    assert "moe_max_load" in done.stdout + done.stderr
    # one line: no Hugging Face class routes by Sinkhorn (Mixtral's router is topk renormalised)
    from neox_fork.checkpoint.hf import export_folder
    from neox_fork.errors import UserError

    with pytest.raises(UserError, match="moe_router_type 'sinkhorn': no HF class routes by Sinkhorn"):
        export_folder(tmp_path / "checkpoints", tmp_path / "hf")
