"""A rank that stops answering ends the run with evidence: through deepy.py in real processes, the job ends within
train_timeout_seconds plus a bound, deepy's one line names that rank, every rank's Python stacks are on disk (the
stuck frame of the rank that stopped, the collective its peer waited in), `latest` is the last complete step and a
resume from it computes the steps after it as the run that hung did; a save slower than the step limit does not trip the detector.

Injected with NEOX_FORK_TEST_HANG (training/watchdog.py): `stop` is a SIGSTOP (the process is frozen: its own
deadline cannot fire, so deepy must find it alive and wake it for its stacks), `gil` a regular expression that
holds the GIL for hours (only faulthandler's C thread can still act).

Time bound: start-up of two ranks (under a minute on 2 loaded cores, INIT is 300 s), three steps, the step limit
STEP_LIMIT, deepy's settle time (15 s) and stacks wait (3 s): END_BOUND = 240 s after start is generous and still
far below "never" (without the watchdog the peer waits the 10-minute collective timeout, and a stopped rank
forever).
"""

import json
import os
import subprocess
import time

import psutil
import pytest

from conftest import PYTHON, REPO, write_train_config
from neox_fork.checkpoint import store as checkpoint
from neox_fork.launch.hangs import HANG_STATUS, stacks_file

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

STEP_LIMIT = 8
END_BOUND = 240


def run_deepy(config, hang):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", NEOX_FORK_TEST_HANG=hang)
    start = time.monotonic()
    proc = subprocess.Popen([PYTHON, "deepy.py", "train.py", str(config)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=END_BOUND)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        raise AssertionError(f"the hung run did not end within {END_BOUND} s:\n{proc.communicate()[0][-3000:]}")
    leftovers = [p for p in psutil.process_iter(["environ"]) if (p.info["environ"] or {}).get(
        "NEOX_FORK_TEST_HANG") == hang and p.pid != os.getpid()]
    assert not leftovers, leftovers
    return proc.returncode, out, time.monotonic() - start


def config_for(tmp_path, small_corpus, **keys):
    return write_train_config(tmp_path, small_corpus, train_iters=6, checkpoint_factor=2, num_gpus=2,
                              train_timeout_seconds=STEP_LIMIT, init_timeout_seconds=300, save_timeout_seconds=120,
                              hidden_dropout=0.0, **keys)


def losses(ckpt):
    return {row["iteration"]: row["lm_loss"] for row in map(json.loads, (ckpt / "metrics.jsonl").read_text().split(
        "\n")[:-1]) if "lm_loss" in row}


def test_a_stopped_rank_in_a_data_parallel_run_is_named_and_the_run_resumes(tmp_path, small_corpus):
    config = config_for(tmp_path, small_corpus, train_micro_batch_size_per_gpu=1)
    status, out, _ = run_deepy(config, "1:4:stop")  # after step 4's update, before its metrics and save
    assert status == HANG_STATUS, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("deepy: hang:")]
    assert len(lines) == 1 and lines[0].startswith("deepy: hang: rank 1 stopped answering (step 4"), out[-3000:]
    stacks = tmp_path / "ckpt" / "stacks"
    assert str(stacks) in lines[0]
    assert "in hang_if_asked" in stacks_file(stacks, 1).read_text()  # its stuck frame, dumped once woken
    waiting = stacks_file(stacks, 0).read_text()
    assert "Timeout (0:00:08)!" in waiting and "torch/distributed" in waiting  # the peer waited in a collective
    ckpt = tmp_path / "ckpt"
    assert checkpoint.read_latest(ckpt) == 2 and checkpoint.step_is_intact(checkpoint.resolve(ckpt))
    before = losses(ckpt)
    resumed = subprocess.run([PYTHON, "deepy.py", "train.py", str(config), str(write_load(tmp_path, ckpt))],
                             cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""),
                             capture_output=True, text=True, timeout=END_BOUND)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = losses(ckpt)
    assert sorted(after) == list(range(1, 7))
    assert sorted(before) == [1, 2, 3] and after[3] == before[3]  # resumed at 2, step 3 is the hung run's step 3


def write_load(tmp_path, ckpt):
    path = tmp_path / "load.yml"
    path.write_text(f"load: {ckpt}\n")
    return path


def test_a_rank_holding_the_gil_in_a_tensor_parallel_run_is_named_and_a_slow_save_is_not_a_hang(
        tmp_path, small_corpus):
    config = config_for(tmp_path, small_corpus, model_parallel_size=2, make_vocab_size_divisible_by=128)
    # rank 0 spends 12 s (more than the step limit) in the save at step 2; then rank 1 holds the GIL after step 3
    status, out, _ = run_deepy(config, "0:2:slowsave:12,1:3:gil")
    assert status == HANG_STATUS, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("deepy: hang:")]
    assert len(lines) == 1 and lines[0].startswith("deepy: hang: rank 1 stopped answering (step 3"), out[-3000:]
    stacks = tmp_path / "ckpt" / "stacks"
    stuck = stacks_file(stacks, 1).read_text()
    assert "Timeout (0:00:08)!" in stuck and "in hang_if_asked" in stuck and "torch/distributed" not in stuck
    assert "torch/distributed" in stacks_file(stacks, 0).read_text()
    assert checkpoint.read_latest(tmp_path / "ckpt") == 2  # the slow save completed and was not taken for a hang
