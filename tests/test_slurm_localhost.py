"""The sbatch flow under a real one-node Slurm on localhost (slurmctld + slurmd + munged, started here).

`sbatch slurm/one-node.sbatch` with 2 CPU tasks trains the tiny config at DP=2 through deepy.py -> srun;
`scancel -s USR1` makes the ranks save and the script requeue the job, which resumes at the next step;
a plain `scancel` also leaves a loadable checkpoint that a resubmitted job resumes from; a rank that
fails under srun takes the job down at once and srun names it. Needs root (CI runs as root): the
harness apt-installs Slurm when it is missing (scripts/slurm_localhost.sh install).
"""

import functools
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, wait_until
from slurm_jobs import (assert_dp2_checkpoint, assert_resumed_to_the_end, iterations, job_field, latest_step,
                        rerun_now_and_wait, usr1_saves_and_requeues)

pytestmark = [pytest.mark.slow, pytest.mark.multiproc, pytest.mark.slurm]

HARNESS = REPO / "scripts" / "slurm_localhost.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Environment (SLURM_CONF) of a one-node Slurm running for this module; stopped at its end, before the
    multi-node tests start theirs."""
    folder = tmp_path_factory.mktemp("slurm")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    subprocess.run([sys.executable, "tools/datasets/prepare_demo_data.py"], cwd=REPO, check=True, capture_output=True)
    started = subprocess.run(["bash", str(HARNESS), "start", str(folder)], env=env, capture_output=True, text=True,
                             timeout=600)
    assert started.returncode == 0, started.stderr
    env["SLURM_CONF"] = str(folder / "etc" / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(HARNESS), "stop", str(folder)], env=env, capture_output=True, timeout=60)


def sh(env, *cmd, check=True):
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, (cmd, result.stdout, result.stderr)
    return result.stdout.strip()


def client(env):
    """Slurm client commands against this module's Slurm."""
    return functools.partial(sh, env)


def submit_one_node(env, tmp_path, save, train_iters, exports="", **keys):
    """sbatch slurm/one-node.sbatch on CPU: 2 tasks on this node, the tiny config made faster; `exports` adds
    environment variables (",NAME=VALUE...")."""
    overlay = tmp_path / "fast.yml"
    overlay.write_text(json.dumps({
        "train_iters": train_iters, "train_micro_batch_size_per_gpu": 2, "seq_length": 128, "log_interval": 1,
        "eval_interval": 1000, "eval_iters": 0, "checkpoint_factor": 1000, "keep_last_n_checkpoints": None,
        **keys}))
    exports = f"ALL,CONFIGS=configs/tiny.yml {overlay},SAVE={save}{exports}"
    return sh(env, "sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1",
              f"--output={tmp_path}/slurm-%j.out", f"--export={exports}", "slurm/one-node.sbatch")


def job_output(tmp_path, job):
    return (tmp_path / f"slurm-{job}.out").read_text()


def test_slurm_rank_failure_cancels_the_job_and_srun_names_the_task(slurm, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os, sys, time\n"
                     "time.sleep(1)\n"
                     "sys.exit(3) if os.environ['SLURM_PROCID'] == '1' else time.sleep(120)\n")
    overlay = tmp_path / "srun.yml"
    overlay.write_text(json.dumps({"deepspeed_slurm": True, "num_gpus": None}))
    wrap = f"{sys.executable} deepy.py {probe} configs/tiny.yml {overlay}"
    start = time.monotonic()
    job = sh(slurm, "sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", f"--output={tmp_path}/slurm-%j.out",
             f"--wrap={wrap}")
    wait_until(lambda: job_field(client(slurm), job, "JobState") in ("FAILED", "COMPLETED", "CANCELLED"), 60, "job end")
    assert time.monotonic() - start < 45, "the surviving task (sleeping 120 s) was not killed"
    assert job_field(client(slurm), job, "JobState") == "FAILED"
    out = job_output(tmp_path, job)
    assert "srun --kill-on-bad-exit=1 --ntasks 2" in out
    assert "task 1: Exited with exit code 3" in out


def test_slurm_one_node_sbatch_saves_on_usr1_requeues_and_resumes(slurm, tmp_path):
    save, total, run = tmp_path / "ckpt", 12, client(slurm)
    job = submit_one_node(slurm, tmp_path, save, total)
    wait_until(lambda: len(iterations(save)) >= 3, 120, "3 training steps")
    stopped = usr1_saves_and_requeues(run, job, save, total, 60)
    assert "requeueing job" in job_output(tmp_path, job)
    overlay = (save / "slurm" / f"job-{job}.yml").read_text()
    assert f'"load": "{save}"' in overlay and f'"save": "{save}"' in overlay

    rerun_now_and_wait(run, job, nodes=1, timeout=150)
    assert_resumed_to_the_end(run, job, job_output(tmp_path, job), save, stopped, total)


def test_slurm_a_hung_rank_makes_the_job_requeue_once_and_finish(slurm, tmp_path):
    """Rank 1 stops (SIGSTOP) after step 3 of the first run: rank 0's step deadline (8 s) passes in the collective,
    srun ends the step, the script finds the hang in SAVE/stacks, names rank 1 and requeues; the rerun (no injected
    hang in a requeued job) resumes from step 2 and finishes."""
    save, total, run = tmp_path / "ckpt", 6, client(slurm)
    job = submit_one_node(slurm, tmp_path, save, total, exports=",NEOX_FORK_TEST_HANG=1:3:stop",
                          train_timeout_seconds=8, checkpoint_factor=2)
    wait_until(lambda: job_field(run, job, "Restarts") == "1", 240, "the hung job to requeue itself")
    out = job_output(tmp_path, job)
    assert "hang: rank 1 stopped answering (step 3" in out and f"job {job} hung: requeueing" in out, out[-3000:]
    assert "Timeout (0:00:08)!" in (save / "stacks" / "rank00000.txt").read_text()
    assert latest_step(save) == 2
    rerun_now_and_wait(run, job, nodes=1, timeout=150)
    rerun = job_output(tmp_path, job)
    assert job_field(run, job, "JobState") == "COMPLETED", rerun[-3000:]
    assert "global_step2 at iteration 2" in rerun and latest_step(save) == total


def test_slurm_scancel_leaves_a_checkpoint_a_resubmitted_job_resumes_from(slurm, tmp_path):
    save, total = tmp_path / "ckpt", 10
    first = submit_one_node(slurm, tmp_path, save, total)
    wait_until(lambda: len(iterations(save)) >= 2, 120, "2 training steps")
    sh(slurm, "scancel", first)  # TERM to every process of the job, KILL after KillWait
    wait_until(lambda: job_field(client(slurm), first, "JobState") == "CANCELLED", 60, "the cancel")
    stopped = latest_step(save)
    assert stopped is not None and 2 <= stopped < total, job_output(tmp_path, first)[-3000:]
    assert_dp2_checkpoint(save, stopped)
    assert job_field(client(slurm), first, "Restarts") == "0"  # cancelled on purpose: not requeued

    second = submit_one_node(slurm, tmp_path, save, total)
    wait_until(lambda: job_field(client(slurm), second, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 150,
               "the resubmitted job")
    out = job_output(tmp_path, second)
    assert job_field(client(slurm), second, "JobState") == "COMPLETED", out[-3000:]
    assert f"global_step{stopped} at iteration {stopped}" in out
    assert iterations(save) == list(range(1, total + 1))
    assert latest_step(save) == total
