"""FLOPs per token against numbers worked out by hand (StableLM-3B-4E1T and the tiny config), and the
benchmark CLI on the tiny config on the CPU: the model path against transformers, the engine path (the
train.py step), and the comparisons it refuses (fields and the last line; no speed assertion)."""

import json
import re

import pytest

from conftest import REPO, run_cli
from neox_fork.perf import flops
from neox_fork.config.loading import load_config
from neox_fork.perf.summary import meta_model


def _flops(config_path, recompute, **overrides):
    config = load_config(REPO / "configs" / config_path, overrides=overrides)
    return flops.training_flops_per_token(meta_model(config, None), config.seq_length, recompute)


def test_stablelm_flops_per_token_by_hand():
    # L=32, h=2560, ffn=6912 per SwiGLU branch, vocab 50,277 padded to 50,304, s=4096, untied head.
    # one layer: qkv 3h^2 + dense h^2 + [up; gate] 2hf + down hf + two LayerNorms (weight + bias) 4h
    #   = 4*2560^2 + 3*2560*6912 + 4*2560 = 26,214,400 + 53,084,160 + 10,240 = 79,308,800
    # 32 layers = 2,537,881,600; + final norm 2*2560 = 5,120 -> N_non_embedding = 2,537,886,720
    # (all 2,795,443,200 minus the input embedding and the head, 2 * 50,304 * 2,560 = 257,556,480)
    # model: 6 * 2,537,886,720 = 15,227,320,320; 12*32*2560*4096 = 4,026,531,840; 6*50,304*2,560 = 772,669,440
    #   = 20,026,521,600 (20.03 GFLOP, not the 20.80 of 6N with N counting the input lookup)
    # full recompute: + 2 * 2,537,881,600 (layers only) + 4*32*2560*4096 = 5,075,763,200 + 1,342,177,280
    # selective: + 1,342,177,280 (q k^T and p v once more)
    full = _flops("stablelm-3b-4e1t.yml", "full")
    assert full.non_embedding_params == 2_537_886_720
    assert full.model == 20_026_521_600
    assert full.hardware == 20_026_521_600 + 6_417_940_480
    assert _flops("stablelm-3b-4e1t.yml", "selective").hardware == 20_026_521_600 + 1_342_177_280
    assert _flops("stablelm-3b-4e1t.yml", "none").hardware == 20_026_521_600
    # tied head: one embedding matrix fewer in N, the same FLOPs (the head matmul still runs once)
    tied = _flops("stablelm-3b-4e1t.yml", "none", no_weight_tying=False)
    assert tied.model == 20_026_521_600
    # the A100 anchor: 6,000 tokens/s per GPU x 20.03 GFLOP / 312 TFLOP/s = 38.5% MFU
    assert round(flops.mfu(6000, full.model, 1, flops.PEAK_FLOPS["A100"]), 3) == 0.385


def test_tiny_flops_per_token_by_hand():
    # configs/tiny.yml with vocab 8192: L=4, h=256, ffn = 64 * ceil(int(8*256/3) / 64) = 704, s=256
    # one layer: 4*256^2 + 3*256*704 + 4*256 = 262,144 + 540,672 + 1,024 = 803,840; 4 layers 3,215,360;
    # + final norm 512 -> N_non_embedding = 3,215,872
    # model: 6 * 3,215,872 + 12*4*256*256 + 6*8192*256 = 19,295,232 + 3,145,728 + 12,582,912 = 35,023,872
    # full: + 2 * 3,215,360 + 4*4*256*256 = 6,430,720 + 1,048,576 = 7,479,296; selective: + 1,048,576
    full = _flops("tiny.yml", "full", vocab_size=8192)
    assert (full.non_embedding_params, full.model, full.hardware) == (3_215_872, 35_023_872, 42_503_168)
    assert _flops("tiny.yml", "selective", vocab_size=8192).hardware == 36_072_448


def test_flops_count_a_tensor_parallel_shard_as_the_whole_model(one_process):
    """A TP=2 rank holds half of each sharded matrix and all of each norm: counted back to the whole."""
    from conftest import tiny_keys
    from neox_fork.config.loading import from_dict
    from neox_fork.model.transformer import build_model

    config = from_dict(tiny_keys())
    whole = flops.training_flops_per_token(build_model(config), config.seq_length, "full")
    model = build_model(config)
    for p in model.parameters():  # the numel of one TP=2 shard, with megatron-core's marker
        if getattr(p, "tensor_model_parallel", False):
            p.data = p.data.new_empty(p.shape[0] // 2, *p.shape[1:]) if p.dim() else p.data
    half = flops.training_flops_per_token(model, config.seq_length, "full", tp_size=2)
    assert half == whole


@pytest.mark.slow
def test_benchmark_tiny_against_transformers_json():
    run = run_cli("tools/benchmark.py", "--config", "configs/tiny.yml", "--steps", "2", "--warmup", "1",
                  "--micro-batch", "2", "--seq-length", "64", "--vocab-size", "1000", "--compare", "hf", "--json",
                  timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()  # the JSON object, then the ratio line; nothing else
    assert len(lines) == 2 and re.fullmatch(r"ratio_vs_hf: \d+\.\d{3}", lines[1]), run.stdout[:2000]
    result = json.loads(lines[0])
    assert result["micro_batch"] == 2 and result["seq_length"] == 64 and result["vocab_size"] == 1024
    assert result["dtype"] == "fp32" and result["steps"] == 2 and result["threads"] >= 1
    assert result["path"] == "model" and result["recompute"] == "none"
    # vocab 1000 -> 1024; N_non_embedding 3,215,872 (see test_tiny_flops_per_token_by_hand):
    # 6 * 3,215,872 + 12*4*256*64 + 6*1024*256 = 19,295,232 + 786,432 + 1,572,864
    assert result["model_flops_per_token"] == result["hardware_flops_per_token"] == 21_654_528
    for name in ("ours", "hf"):
        r = result[name]
        assert len(r["step_seconds"]) == 2 and r["tokens_per_sec"] > 0
        # the resident-set peak (Linux VmHWM) grew by at least the fp32 weights built after the mark
        assert r["peak_memory_bytes"] >= 4 * result["parameters"], (name, r["peak_memory_bytes"])
        assert r["mfu"] is None and r["hfu"] is None  # no peak FLOP/s for a CPU
        assert 0 < r["loss"] < 20
    assert abs(result["ratio_vs_hf"] - result["ours"]["tokens_per_sec"] / result["hf"]["tokens_per_sec"]) < 1e-9
    assert float(lines[-1].split()[1]) == round(result["ratio_vs_hf"], 3)


@pytest.mark.slow
def test_benchmark_engine_path_runs_the_training_step(tmp_path):
    """--path engine: DeepSpeed engine with ZeRO-1 and clipping, two micro-batches per step (accumulation).
    Its --json stdout is the JSON alone (DeepSpeed logs to stdout; those lines go to stderr), so the file
    scripts/gpu_check.sh redirects it into is what --table reads."""
    overlay = tmp_path / "accumulate.yml"
    overlay.write_text("gradient_accumulation_steps: 2\n")
    run = run_cli("tools/benchmark.py", "--config", "configs/tiny.yml", overlay, "--path", "engine", "--steps", "2",
                  "--warmup", "1", "--micro-batch", "2", "--seq-length", "64", "--vocab-size", "1000",
                  "--checkpoint-activations", "selective", "--json", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(run.stdout.splitlines()) == 1, run.stdout[:2000]
    result = json.loads(run.stdout)
    assert result["path"] == "engine" and result["zero_stage"] == 1 and "hf" not in result
    assert result["recompute"] == "selective"
    assert result["hardware_flops_per_token"] - result["model_flops_per_token"] == 4 * 4 * 256 * 64
    r = result["ours"]
    assert len(r["step_seconds"]) == 2 and 0 < r["loss"] < 20
    assert result["gradient_accumulation_steps"] == 2
    assert r["tokens_per_sec"] == pytest.approx(2 * 2 * 64 / r["step_seconds_median"])

    saved = tmp_path / "engine_selective.json"
    saved.write_text(run.stdout)
    table = run_cli("tools/benchmark.py", "--table", saved, timeout=120)
    assert table.returncode == 0, table.stderr[-2000:]
    row = f"| engine_selective | engine | selective | 2 | False | ours | {r['tokens_per_sec']:,.0f} |"
    assert row in table.stdout, table.stdout


@pytest.mark.slow
@pytest.mark.multiproc
def test_benchmark_engine_path_runs_a_two_stage_pipeline(tmp_path):
    """--path engine with pipe_parallel_size 2 on two ranks (one process per stage): it reports the whole
    model (the same parameters and FLOPs as one process: configs/tiny.yml at vocabulary 1024 has 3,740,160),
    the step's tokens over both micro-batches, and a finite loss; rank 1 prints nothing."""
    overlay = tmp_path / "pp2.yml"
    overlay.write_text("pipe_parallel_size: 2\ngradient_accumulation_steps: 2\nnum_gpus: 2\n")
    run = run_cli("tools/benchmark.py", "--config", "configs/tiny.yml", overlay, "--path", "engine", "--steps", "2",
                  "--warmup", "1", "--micro-batch", "1", "--seq-length", "64", "--vocab-size", "1000", "--json",
                  nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[0])
    assert len(run.stdout.splitlines()) == 1
    assert result["pipe_parallel_size"] == 2 and result["gradient_accumulation_steps"] == 2
    config = load_config("configs/tiny.yml", overrides={"vocab_size": 1000, "seq_length": 64,
                                                        "max_position_embeddings": 64})
    whole = meta_model(config, None)
    assert result["parameters"] == sum(p.numel() for p in whole.parameters()) == 3740160
    r = result["ours"]
    assert 0 < r["loss"] < 20
    assert r["tokens_per_sec"] == pytest.approx(2 * 1 * 64 / r["step_seconds_median"])


@pytest.mark.parametrize("flags, message", [
    (["--path", "engine", "--compare", "hf"], "--compare hf needs --path model"),
    (["--compare", "hf", "--checkpoint-activations", "selective"], "transformers has no selective recompute"),
])
@pytest.mark.slow
def test_benchmark_refuses_unlike_comparisons(flags, message):
    run = run_cli("tools/benchmark.py", "--config", "configs/tiny.yml", *flags, timeout=120)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]


def test_benchmark_text_output_ends_with_ratio(tmp_path):
    from neox_fork.perf.benchmark import format_text

    step = {"tokens_per_sec": 1000.0, "step_seconds_median": 0.5, "step_seconds": [0.5], "mfu": 0.41,
            "hfu": 0.55, "peak_memory_bytes": 2**30, "loss": 9.0}
    text = format_text({"path": "model", "device": "NVIDIA H100 80GB HBM3", "threads": 16,
                        "load_average_1min": 0.1, "torch": "2", "dtype": "bf16", "parameters": 10,
                        "micro_batch": 4, "seq_length": 4096, "vocab_size": 50304, "recompute": "full",
                        "torch_compile": False, "model_flops_per_token": 1.0, "hardware_flops_per_token": 1.3,
                        "steps": 1, "memory_kind": "cuda_max_allocated", "ours": step, "hf": step,
                        "ratio_vs_hf": 1.0})
    assert "MFU 41.0%" in text and "HFU 55.0%" in text
    assert text.splitlines()[-1] == "ratio_vs_hf: 1.000"


def test_timed_pairs_alternate_which_model_goes_first(one_process, monkeypatch):
    """After each model's warm-up, pair i runs ours then transformers for even i and the reverse for odd i,
    so drift and what one step leaves in the caches hit both alike (the real builders, recorded)."""
    from neox_fork.perf import benchmark

    order = []

    def recorded(name, build):
        def built(*args):
            model, step = build(*args)
            return model, lambda *batch: (order.append(name), step(*batch))[1]
        return built

    monkeypatch.setattr(benchmark, "build_ours", recorded("ours", benchmark.build_ours))
    monkeypatch.setattr(benchmark, "build_hf", recorded("hf", benchmark.build_hf))
    config = load_config(REPO / "configs" / "tiny.yml", overrides={  # the order is what counts: narrowest shape
        "train_micro_batch_size_per_gpu": 1, "seq_length": 32, "max_position_embeddings": 32, "vocab_size": 1000,
        "num_layers": 1, "hidden_size": 64})
    result = benchmark.run(config, steps=4, warmup=1, compare_hf=True)
    assert order == ["ours", "hf"] + ["ours", "hf", "hf", "ours", "ours", "hf", "hf", "ours"]
    assert len(result["ours"]["step_seconds"]) == len(result["hf"]["step_seconds"]) == 4
