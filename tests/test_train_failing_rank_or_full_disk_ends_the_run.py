"""A rank that fails ends the run within seconds, through deepy, with data-loader workers running (they ignore
SIGTERM, and a failing rank used to wait for them forever): a full disk during a save is one line naming the
save folder, the checkpoint size and the free space, with `latest` and the folder as before the save; an
exception on one rank of two ends both ranks and deepy, whose line names that rank and its cause.

Bound: from the failure's first line in the output to the moment every process of the run has closed the
output pipe (deepy, the ranks, their workers) at most END_SECONDS. Start-up (DeepSpeed's set-up on a busy
machine) is not part of it; the hang this guards against was endless."""

import os
import shutil
import subprocess
import threading
import time

import psutil
import pytest

from conftest import PYTHON, REPO, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

END_SECONDS = 20  # deepy's own SIGKILL of the other ranks comes at 10 s (supervisor.FAILURE_GRACE_SECONDS)


def run_deepy(config, marker, extra_env=None, timeout=300):
    """deepy on `config`; returns (exit status, output, seconds from the first line holding `marker` to the
    output's end)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **(extra_env or {}))
    proc = subprocess.Popen([PYTHON, "deepy.py", "train.py", str(config)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watchdog = threading.Timer(timeout, lambda: [p.kill() for p in _run_processes(config)])
    watchdog.start()
    lines, seen = [], None
    try:
        for line in proc.stdout:  # ends when the last process holding the pipe (a worker, say) is gone
            lines.append(line)
            if seen is None and marker in line:
                seen = time.monotonic()
        ended = time.monotonic()
        proc.wait()
    finally:
        watchdog.cancel()
    out = "".join(lines)
    assert seen is not None, f"'{marker}' never appeared ({proc.returncode}):\n{out[-4000:]}"
    return proc.returncode, out, ended - seen


def _run_processes(config):
    """Live processes (not zombies) started for this run: their command line names its config."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if str(config) in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def test_a_full_disk_during_a_save_is_one_line_ends_the_run_and_latest_resumes_elsewhere(tmp_path, small_corpus,
                                                                                        small_tmpfs):
    # one checkpoint of this model is 3.1 MB: step 2's fits in 5 MB, step 4's does not
    ckpt = small_tmpfs("5m") / "ckpt"
    keys = dict(train_iters=4, checkpoint_factor=2, num_workers=2)
    config = write_train_config(tmp_path, small_corpus, save=str(ckpt), **keys)
    status, out, seconds = run_deepy(config, "the filesystem is full")
    assert status == 2, out[-4000:]
    assert seconds < END_SECONDS, f"the run took {seconds:.0f} s to end after the failed save:\n{out[-4000:]}"
    assert "Traceback" not in out, out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out[-4000:]
    assert errors[0].startswith(f"error: {ckpt}: the filesystem is full (no space left on device); one checkpoint "
                                "(as global_step2) needs about 3.1 MB, ")
    assert "'latest' still names global_step2" in errors[0]
    assert f"deepy: rank 0 failed with status 2: {ckpt}: the filesystem is full" in out
    assert not _run_processes(config)
    # the save folder as after step 2's save: no partial step 4, `latest` on the complete step 2
    assert checkpoint.read_latest(ckpt) == 2
    assert sorted(p.name for p in ckpt.iterdir()) == ["global_step2", "latest", "metrics.jsonl", "stacks",
                                                      "zero_to_fp32.py", "zero_to_torch.py"]  # stacks: hang watchdog
    assert checkpoint.step_is_intact(ckpt / "global_step2")

    roomy = tmp_path / "roomy"
    shutil.copytree(ckpt, roomy)
    resumed = tmp_path / "resume"
    resumed.mkdir()
    run_training(write_train_config(resumed, small_corpus, save=str(roomy), load=str(roomy), **keys))
    assert checkpoint.read_latest(roomy) == 4


@pytest.mark.parametrize("rank, where, cause", [
    (1, "step", "RuntimeError: injected failure in step at step 3 on rank 1 (NEOX_FORK_TEST_FAIL, for tests)"),
    # in a data-loader worker: the batch of step 3 starts at sample 2 steps x 2 ranks x 2 sequences
    (0, "data", "RuntimeError: injected failure in data at sample 8 (for tests) (in a data-loader worker)"),
])
def test_an_exception_on_one_rank_of_two_ends_both_ranks_and_deepy_which_names_it(tmp_path, small_corpus, rank,
                                                                                   where, cause):
    config = write_train_config(tmp_path, small_corpus, train_iters=8, num_workers=2, num_gpus=2)
    status, out, seconds = run_deepy(config, "injected failure", {"NEOX_FORK_TEST_FAIL": f"{rank}:3:{where}"})
    assert status == 1, out[-4000:]  # the failing rank's: a Python exception
    assert seconds < END_SECONDS, f"the run took {seconds:.0f} s to end after rank {rank} failed:\n{out[-4000:]}"
    # the other rank may have ended already (its collective with the failed rank broke): deepy still names
    # the rank that failed first
    assert f"deepy: rank {rank} failed with status 1: {cause}" in out, out[-4000:]
    assert "step 4/8" not in out  # rank 0 may finish step 3 with rank 1 before its next collective breaks
    assert not _run_processes(config)
