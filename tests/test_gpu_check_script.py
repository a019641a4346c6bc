"""scripts/gpu_check.sh as far as a CPU goes: --dry-run prints every step in order and runs none,
--rehearse swaps the 3B shape for the tiny one and drops the CUDA check, a wrong argument is one line; the
table it ends with (tools/benchmark.py --table) from --json results."""

import json
import subprocess

from conftest import PYTHON, REPO


def test_dry_run_prints_every_step_and_runs_nothing(tmp_path):
    out = tmp_path / "results"
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHON": "py3"})
    assert run.returncode == 0, run.stderr
    text = run.stdout
    steps = [line.split("] ", 1)[1] for line in text.splitlines() if line.startswith("== [")]
    assert steps == ["1. device", "2. install from wheels/gpu", "3. GPU tier", "4. 3B engine, published config",
                     "5. 3B model vs transformers, eager", "6a. 3B engine, no recompute",
                     "6b. 3B engine, selective recompute", "6c. MoE engine, grouped GEMM experts",
                     "6d. MoE engine, sequential experts", "6e. 3B engine, compiled layers", "7. table", "done"]
    assert "py3 -m pip install -q --no-index --no-deps" in text and "wheels/gpu/*.whl" in text
    assert "py3 -m pytest -m gpu" in text
    bench = "py3 tools/benchmark.py --config configs/stablelm-3b-4e1t.yml --steps 6 --warmup 2 --json"
    assert f"{bench} --path engine > {out}/engine_full_mb4.json" in text
    assert f"{bench} --path model --compare hf > {out}/model_vs_hf.json" in text
    assert "--checkpoint-activations false --micro-batch 1" in text and "--torch-compile true" in text
    moe = f"py3 tools/benchmark.py --config configs/stablelm-3b-4e1t.yml {out}/moe.yml"
    assert f"{moe} --steps 6 --warmup 2 --json --path engine --micro-batch 1 > {out}/moe_grouped_mb1.json" in text
    assert f"{moe} {out}/moe_sequential.yml --steps 6" in text
    assert "tools/benchmark.py --table" in text
    assert not out.exists()  # nothing ran


def test_rehearsal_runs_the_same_steps_on_the_tiny_config_without_cuda(tmp_path):
    out = tmp_path / "results"
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--rehearse", "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHON": "py3"})
    assert run.returncode == 0, run.stderr
    text = run.stdout
    steps = [line.split("] ", 1)[1] for line in text.splitlines() if line.startswith("== [")]
    assert len(steps) == 12 and steps[3] == "4. 3B engine, published config"  # the same steps, in order
    bench = "py3 tools/benchmark.py --config configs/tiny.yml --micro-batch 2 --seq-length 64 --steps 2 --warmup 1 --json"
    assert f"{bench} --path engine > {out}/engine_full_mb4.json" in text
    assert f"{bench} --path model --compare hf > {out}/model_vs_hf.json" in text
    assert "stablelm-3b" not in text and "nvidia-smi" not in text and "assert torch.cuda" not in text
    assert "wheels/gpu/*.whl" in text and "py3 -m pytest -m gpu" in text
    assert not out.exists()


def test_wrong_argument_is_one_line():
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--steps", "3"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.strip() == \
        "error: unknown argument '--steps'; valid: --dry-run, --rehearse, --out DIR, --wheels DIR"


def _result(path, **extra):
    step = {"tokens_per_sec": 25000.0, "step_seconds_median": 0.66, "step_seconds": [0.66], "mfu": 0.5062,
            "hfu": 0.6684, "peak_memory_bytes": 60 * 2**30, "loss": 10.9}
    return {"path": path, "device": "NVIDIA H100 80GB HBM3", "recompute": "full", "micro_batch": 4,
            "torch_compile": False, "ours": step, **extra}


def test_table_from_json_results(tmp_path):
    engine, model = tmp_path / "engine_full_mb4.json", tmp_path / "model_vs_hf.json"
    engine.write_text(json.dumps(_result("engine")) + "\n")
    hf = {**_result("model")["ours"], "tokens_per_sec": 20000.0}
    model.write_text(json.dumps(_result("model", hf=hf, ratio_vs_hf=1.25)) + "\nratio_vs_hf: 1.250\n")
    run = subprocess.run([PYTHON, "tools/benchmark.py", "--table", str(engine), str(model)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[2] == "| engine_full_mb4 | engine | full | 4 | False | ours | 25,000 | 50.6% | 66.8% | 60.00 GiB |  |"
    assert lines[3].startswith("| model_vs_hf | model | full | 4 | False | ours | 25,000 |") and lines[3].endswith("| 1.250 |")
    assert "| transformers | 20,000 |" in lines[4] and lines[-1] == "device: NVIDIA H100 80GB HBM3"


def test_table_of_a_file_that_is_not_a_result(tmp_path):
    bad = tmp_path / "engine.json"
    bad.write_text("Traceback (most recent call last):\n")
    run = subprocess.run([PYTHON, "tools/benchmark.py", "--table", str(bad)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "not the output of tools/benchmark.py --json" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
