"""model_summary builds the model on the meta device and reports the published parameter count."""

import contextlib
import io
import re

import pytest

from conftest import REPO, run_cli


@pytest.mark.slow
def test_stablelm_config_has_2795443200_parameters_and_sizes_a_cluster():
    run = run_cli("tools/model_summary.py", "configs/stablelm-3b-4e1t.yml", "--world-size", "256",
                  "--gpu", "A100", "--gpu-memory-gb", "40")
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



def test_a_short_run_is_counted_in_billions_of_tokens_and_hours(capsys):
    """The 16k recipe's 400 steps x 64 sequences x 16,384 tokens = 419,430,400 tokens (0.42B, not "0.00T"), and its
    time is 400 x the printed seconds per step (not "0.0 days")."""
    from neox_fork.perf.summary import print_summary

    print_summary([str(REPO / "configs" / "stablelm-3b-4e1t.yml"), str(REPO / "configs" / "stablelm-3b-4e1t-16k.yml")],
                  8, gpu="H100 SXM")
    out = capsys.readouterr().out
    step = float(re.search(r"([\d.]+) s per step", out)[1])
    hours = float(re.search(r"^train_iters 400: 0\.42B tokens, about ([\d.]+) hours$", out, re.M)[1])
    assert hours == pytest.approx(400 * step / 3600, abs=0.06)  # both printed rounded: 0.05 h, 0.005 s a step


def test_largest_micro_batch_without_recompute_by_hand():
    """StableLM-3B on one 80 GB card (DP=1, bf16): weights 2 + grads 2 + fp32 grad buffer 4 + fp32 master and
    Adam 12 = 20 bytes x 2,795,443,200 = 55.9 GB before activations; 34 s b h bytes a layer x 32 layers
    = 11.4 GB per sequence of 4096, and the loss's fp32 logits chunk 2 x 4 x 4096 x 50304 = 1.65 GB:
    72 GB usable (90%) holds one sequence (69.0 GB) and not two (80.4 GB)."""
    from neox_fork.perf import flops

    def memory_at(b):
        return flops.training_memory_bytes(2_795_443_200, num_layers=32, hidden_size=2560, seq_length=4096,
                                           micro_batch=b, tp=1, dp=1, zero_stage=1, dtype="bf16",
                                           checkpoint_activations=False, vocab_size=50304)

    assert memory_at(1)["grad_buffer_fp32"] == 4 * 2_795_443_200
    assert abs(memory_at(1)["total"] - 69.0e9) < 0.1e9 and abs(memory_at(2)["total"] - 80.4e9) < 0.1e9
    assert flops.largest_micro_batch(memory_at, 0.9 * 80e9) == 1


LLAMA2_13B = """{
  "pipe_parallel_size": 1,
  "model_parallel_size": 2,
  "make_vocab_size_divisible_by": 1,
  "num_layers": 40,
  "hidden_size": 5120,
  "intermediate_size": 41472,
  "num_attention_heads": 40,
  "seq_length": 4096,
  "max_position_embeddings": 4096,
  "pos_emb": "rotary",
  "rotary_pct": 1,
  "no_weight_tying": true,
  "gpt_j_residual": false,
  "output_layer_parallelism": "column",
  "norm": "rmsnorm",
  "rms_norm_epsilon": 1.0e-5,
  "scaled_upper_triang_masked_softmax_fusion": true,
  "bias_gelu_fusion": false,
  "use_bias_in_norms": false,
  "use_bias_in_attn_linear": false,
  "activation": "swiglu",
  "mlp_multiple_of": 256,
}
"""


def test_a_tensor_parallel_config_is_sized_on_the_smallest_world_it_needs(tmp_path):
    """An upstream-style llama2 13B config (model_parallel_size 2, no num_gpus) sizes without flags on
    2 GPUs = tensor 2 x pipe 1 x data 1, and says so. With Llama-2's 32,000 ids it is Llama-2-13B
    (40 x (4 x 5120^2 + 3 x 5120 x 13824 + 2 x 5120) + 2 x 32000 x 5120 + 5120 = 13,015,864,320) plus the MLP
    biases upstream's default use_bias_in_mlp keeps, 40 x (2 x 13824 + 5120) = 1,310,720: 13,017,175,040."""
    from neox_fork.config.loading import load_config
    from neox_fork.perf.summary import print_summary, sizing_world

    config = tmp_path / "neoxkeys_13B.yml"
    config.write_text(LLAMA2_13B)
    vocab = tmp_path / "neoxkeys_vocab.yml"
    vocab.write_text("vocab_size: 32000\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # what tools/model_summary.py runs without --world-size
        print_summary([str(config), str(vocab)], None)
    assert re.search(r"^parameters: 13017175040$", out.getvalue(), re.M)
    assert ("parallelism: world 2 = tensor 2 x data 1 (the smallest world this config needs: model_parallel_size 2 "
            "x pipe_parallel_size 1 x data 1; --world-size sizes another)") in out.getvalue()
    batch = tmp_path / "neoxkeys_batch.yml"  # a train_batch_size fixes the data-parallel size: 32 / (4 x 2) = 4
    batch.write_text("train_batch_size: 32\ntrain_micro_batch_size_per_gpu: 4\ngradient_accumulation_steps: 2\n")
    assert sizing_world(load_config(config, vocab, batch))[0] == 8
    assert sizing_world(load_config(config, vocab), 16) == (16, "--world-size")
    gpus = tmp_path / "neoxkeys_gpus.yml"
    gpus.write_text("num_gpus: 4\nnum_nodes: 3\n")
    assert sizing_world(load_config(config, vocab, gpus))[0] == 12


def test_gpt_neox_20b_config_loads_has_20554567680_parameters_and_sizes_its_pipeline():
    """Upstream's configs/20B.yml (pipe 4 x tensor 2): 44 x (12 x 6144^2 + 13 x 6144) + 2 x 50432 x 6144
    + 2 x 6144 = 20,554,567,680 with the vocabulary padded to a multiple of 128 x TP 2 (50432 rows). Its
    stages hold every parameter once (no tied embedding), and 32 micro-batches over 4 stages leave
    3 / 35 = 8.6 % of a step idle."""
    run = run_cli("tools/model_summary.py", "configs/20B.yml")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert 44 * (12 * 6144**2 + 13 * 6144) + 2 * 50432 * 6144 + 2 * 6144 == 20554567680
    assert re.search(r"^parameters: 20554567680$", out, re.M)
    assert "world 8 = pipe 4 x tensor 2 x data 1" in out
    assert "bubble (P - 1) / (m + P - 1) = 8.6% of each step idle" in out
    stages = re.findall(r"^  stage (\d): entries (\d+)-(\d+) \((\d+) transformer layers\), (\d+) parameters", out, re.M)
    assert [int(s[0]) for s in stages] == [0, 1, 2, 3]
    assert sum(int(s[4]) for s in stages) == 20554567680
    assert sum(int(s[3]) for s in stages) == 44
    assert int(stages[0][1]) == 0 and int(stages[-1][2]) == 44 + 4  # the whole layer list, in order
    assert all(int(a[2]) + 1 == int(b[1]) for a, b in zip(stages, stages[1:]))
