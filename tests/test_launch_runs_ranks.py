"""deepy.py really starts ranks on CPU: every rank gets its RANK/LOCAL_RANK/
WORLD_SIZE/MASTER_*, the config files, --local_rank and deepy's own interpreter; a failing rank takes the
run down within seconds and is named."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = [pytest.mark.multiproc]

PROBE = """
import json, os, sys, time
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCH_NCCL_ASYNC_ERROR_HANDLING")
print("PROBE " + json.dumps({"argv": sys.argv[1:], "exe": sys.executable, **{k: os.environ.get(k) for k in keys}}),
      flush=True)
if os.environ.get("PROBE_FAIL_RANK") is not None:
    if os.environ["RANK"] == os.environ["PROBE_FAIL_RANK"]:
        time.sleep(1)
        sys.exit(3)
    time.sleep(120)
"""


def run_deepy(tmp_path, extra_env=None, timeout=120):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    overlay = tmp_path / "two.yml"
    overlay.write_text(json.dumps({"num_gpus": 2}))  # no master_port: deepy picks a free one
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(CUDA_VISIBLE_DEVICES="", **(extra_env or {}))
    cmd = [sys.executable, "deepy.py", str(probe), "configs/tiny.yml", str(overlay)]
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    # two ranks share one pipe, so their lines may interleave: decode each object where its marker starts
    decoder, probes = json.JSONDecoder(), []
    for chunk in result.stdout.split("PROBE ")[1:]:
        probes.append(decoder.raw_decode(chunk)[0])
    return result, sorted(probes, key=lambda p: p["RANK"]), time.monotonic() - start, str(overlay)


def test_launch_starts_two_cpu_ranks_with_their_environment(tmp_path):
    result, probes, _, overlay = run_deepy(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(p["RANK"], p["LOCAL_RANK"], p["WORLD_SIZE"]) for p in probes] == [("0", "0", "2"), ("1", "1", "2")]
    port = probes[0]["MASTER_PORT"]
    assert f"rendezvous 127.0.0.1:{port};" in result.stderr
    for p in probes:
        assert p["MASTER_ADDR"] == "127.0.0.1" and p["MASTER_PORT"] == port
        assert p["exe"] == sys.executable  # the interpreter (venv) deepy runs under
        assert p["argv"][:2] == ["configs/tiny.yml", overlay]
        assert p["argv"][2] == f"--local_rank={p['LOCAL_RANK']}"
        assert p["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


def test_launch_failing_rank_stops_the_run_quickly_and_is_named(tmp_path):
    result, probes, seconds, _ = run_deepy(tmp_path, {"PROBE_FAIL_RANK": "1"})
    assert len(probes) == 2
    assert result.returncode == 3
    assert "rank 1/2 (local rank 1 on" in result.stderr and "exited with code 3" in result.stderr
    assert seconds < 60, f"the surviving rank (sleeping 120 s) was not stopped: {seconds:.0f} s"
