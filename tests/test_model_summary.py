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
    # 6N + 12*L*h*T = 6 * 2795443200 + 12 * 32 * 2560 * 4096, checked by hand
    assert f"flops_per_token: {6 * 2795443200 + 12 * 32 * 2560 * 4096} " in out
    assert "world 256 = tensor 1 x data 256" in out
    assert re.search(r"memory_per_gpu_gib: weights 5\.21 .* total \d+\.\d+", out)
    assert "fits in 40 GiB (90% usable): yes" in out
