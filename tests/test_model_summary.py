"""model_summary builds the model on the meta device and reports the published parameter count."""

import re
import subprocess

from conftest import PYTHON, REPO


def test_stablelm_config_has_2795443200_parameters_and_sizes_a_cluster():
    run = subprocess.run([PYTHON, "tools/model_summary.py", "configs/stablelm-3b-4e1t.yml", "--world-size", "256",
                          "--gpu", "A100", "--gpu-memory-gb", "40"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert re.search(r"^parameters: 2795443200$", out, re.M)
    # 6 N_non_embedding + 12 L h s + 6 V h, worked out in tests/test_benchmark_cli_and_flops.py
    assert "flops_per_token: 20026521600 " in out and "hardware_flops_per_token: 26444462080 " in out
    assert "non_embedding_parameters: 2537886720" in out
    assert "world 256 = tensor 1 x data 256" in out
    # bf16 weights and grads 2 bytes each, DeepSpeed's fp32 gradient buffer 4 bytes, per parameter:
    # 2,795,443,200 x 2 / 2^30 = 5.21 GiB, x 4 / 2^30 = 10.41 GiB
    assert re.search(r"memory_per_gpu_gib: weights 5\.21  gradients 5\.21  grad_buffer_fp32 10\.41 .* total \d+\.\d+", out)
    assert "fits in 40 GiB (90% usable): yes" in out
    assert re.search(r"without recompute: micro-batch up to \d+ fits in 40 GiB", out)


def test_largest_micro_batch_without_recompute_by_hand():
    """StableLM-3B on one 80 GB card (DP=1, bf16): weights 2 + grads 2 + fp32 grad buffer 4 + fp32 master and
    Adam 12 = 20 bytes x 2,795,443,200 = 55.9 GB before activations; 34 s b h bytes a layer x 32 layers
    = 11.4 GB per sequence of 4096, and the loss's fp32 logits chunk 2 x 4 x 4096 x 50304 = 1.65 GB:
    72 GB usable (90%) holds one sequence (69.0 GB) and not two (80.4 GB)."""
    from neox_fork import flops

    def memory_at(b):
        return flops.training_memory_bytes(2_795_443_200, num_layers=32, hidden_size=2560, seq_length=4096,
                                           micro_batch=b, tp=1, dp=1, zero_stage=1, dtype="bf16",
                                           checkpoint_activations=False, vocab_size=50304)

    assert memory_at(1)["grad_buffer_fp32"] == 4 * 2_795_443_200
    assert abs(memory_at(1)["total"] - 69.0e9) < 0.1e9 and abs(memory_at(2)["total"] - 80.4e9) < 0.1e9
    assert flops.largest_micro_batch(memory_at, 0.9 * 80e9) == 1
