"""The benchmark CLI runs on the tiny config on the CPU against transformers (fields and the last line;
no speed assertion), and the FLOPs formula gives the hand-checked StableLM-3B-4E1T numbers."""

import json
import re
import subprocess

from conftest import PYTHON, REPO
from neox_fork import flops
from neox_fork.config import load_config
from neox_fork.model import ModelShape, count_parameters

STABLELM_PARAMS = 2_795_443_200


def test_stablelm_flops_per_token_by_hand():
    shape = ModelShape.from_config(load_config(REPO / "configs" / "stablelm-3b-4e1t.yml"))
    n = count_parameters(shape)
    assert n == STABLELM_PARAMS
    attention = 12 * 32 * 2560 * 4096
    assert flops.model_flops_per_token(n, 32, 2560, 4096) == STABLELM_PARAMS * 6 + attention
    assert STABLELM_PARAMS * 6 + attention == 20_799_191_040  # 16.77 + 4.03 GFLOP, as in the anchors
    recompute = flops.hardware_flops_per_token(n, 32, 2560, 4096, recompute=True)
    assert recompute == 8 * STABLELM_PARAMS + 16 * 32 * 2560 * 4096
    assert flops.hardware_flops_per_token(n, 32, 2560, 4096, recompute=False) == STABLELM_PARAMS * 6 + attention
    # the A100 anchor: about 6,000 tokens/s per GPU is about 40% MFU
    assert 0.39 < flops.mfu(6000, STABLELM_PARAMS * 6 + attention, 1, flops.PEAK_FLOPS["A100"]) < 0.41


def test_benchmark_tiny_against_transformers_json():
    cmd = [PYTHON, "tools/benchmark.py", "--config", "configs/tiny.yml", "--steps", "2", "--warmup", "1",
           "--micro-batch", "2", "--seq-length", "64", "--vocab-size", "1000", "--compare", "hf", "--json"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert re.fullmatch(r"ratio_vs_hf: \d+\.\d{3}", lines[-1]), lines[-1]
    result = json.loads(lines[-2])
    assert result["micro_batch"] == 2 and result["seq_length"] == 64 and result["vocab_size"] == 1024
    assert result["dtype"] == "fp32" and result["steps"] == 2 and result["threads"] >= 1
    assert result["model_flops_per_token"] == 6 * result["parameters"] + 12 * 4 * 256 * 64
    for name in ("ours", "hf"):
        r = result[name]
        assert len(r["step_seconds"]) == 2 and r["tokens_per_sec"] > 0 and (r["peak_memory_bytes"] or 0) >= 0
        assert r["mfu"] is None and r["hfu"] is None  # no peak FLOP/s for a CPU
        assert 0 < r["loss"] < 20
    assert abs(result["ratio_vs_hf"] - result["ours"]["tokens_per_sec"] / result["hf"]["tokens_per_sec"]) < 1e-9
    assert float(lines[-1].split()[1]) == round(result["ratio_vs_hf"], 3)


def test_benchmark_text_output_ends_with_ratio(tmp_path):
    from neox_fork.benchmark import format_text

    step = {"tokens_per_sec": 1000.0, "step_seconds_median": 0.5, "step_seconds": [0.5], "mfu": 0.41,
            "hfu": 0.55, "peak_memory_bytes": 2**30, "loss": 9.0}
    text = format_text({"device": "NVIDIA H100 80GB HBM3", "threads": 16, "load_average_1min": 0.1,
                        "torch": "2", "dtype": "bf16", "parameters": 10, "micro_batch": 4, "seq_length": 4096,
                        "vocab_size": 50304, "checkpoint_activations": True, "torch_compile": False,
                        "model_flops_per_token": 1.0, "hardware_flops_per_token": 1.3, "steps": 1,
                        "memory_kind": "cuda_max_allocated", "ours": step, "hf": step, "ratio_vs_hf": 1.0})
    assert "MFU 41.0%" in text and "HFU 55.0%" in text
    assert text.splitlines()[-1] == "ratio_vs_hf: 1.000"
