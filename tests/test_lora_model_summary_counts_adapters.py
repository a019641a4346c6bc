"""tools/model_summary.py sizes a LoRA config: its trainable parameters (the adapters, by hand) and per-GPU memory
in which only the adapters have gradients and optimizer states; the recipe overlay loads."""

import re

import pytest

from conftest import run_cli

LORA_3B = ["configs/stablelm-3b-4e1t.yml", "configs/stablelm-3b-4e1t-sft.yml", "configs/stablelm-3b-4e1t-lora-sft.yml"]


@pytest.mark.slow
def test_stablelm_lora_recipe_trains_21102592_adapter_parameters():
    """r = 16 on each linear of 32 layers: r x (in + out) = 16 x ((2560 + 7680) QKV + (2560 + 2560) dense
    + (2560 + 13824) gated linear1 + (6912 + 2560) linear2) = 659,456 a layer, 21,102,592 in all. Memory
    (bf16, ZeRO-1, one GPU): the 2,795,443,200 base weights and the adapters 2 bytes each (5.25 GiB), gradients
    2 bytes and DeepSpeed's fp32 gradient buffer 4 bytes per adapter parameter only (0.04 and 0.08 GiB), Adam and
    the fp32 master 12 (0.24 GiB); a checkpoint 14 bytes per adapter parameter (0.3 GB)."""
    run = run_cli("tools/model_summary.py", *LORA_3B, "--world-size", "1")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert re.search(r"^parameters: 2795443200$", out, re.M)
    assert re.search(r"^trainable_parameters: 21102592 \(0\.755% ", out, re.M)
    assert re.search(r"memory_per_gpu_gib: weights 5\.25  gradients 0\.04  grad_buffer_fp32 0\.08  optimizer 0\.24 ",
                     out)
    assert "checkpoint: 0.3 GB per save (14 bytes per adapter parameter" in out
