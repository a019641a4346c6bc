"""What the Slurm tests share (one node on localhost, test_slurm_localhost.py; two fake hosts,
test_multinode_slurm.py): a job's fields, the run's progress on disk, and the preemption flow both prove:
USR1 -> every rank saves -> the script requeues -> the rerun resumes at the next step and finishes.

`run(*cmd, check=True) -> stdout` runs a Slurm client command where that test's Slurm answers.
"""

import json
import time
from pathlib import Path

from conftest import wait_until


def job_field(run, job, name):
    out = run("scontrol", "-o", "show", "job", job, check=False)
    return dict(item.split("=", 1) for item in out.split() if "=" in item).get(name)


def finished(run, job) -> bool:
    return job_field(run, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED")


def iterations(save: Path) -> list[int]:
    path = save / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["iteration"] for line in path.read_text().splitlines() if line.strip()]


def latest_step(save: Path) -> int | None:
    latest = save / "latest"
    return int(latest.read_text().strip().removeprefix("global_step")) if latest.is_file() else None


def assert_dp2_checkpoint(save: Path, step: int):
    folder = save / f"global_step{step}"
    assert (folder / "mp_rank_00_model_states.pt").is_file()
    assert len(list(folder.glob("*zero_pp_rank_*optim_states.pt"))) == 2  # one ZeRO shard per DP rank


def usr1_saves_and_requeues(run, job, save: Path, total: int, timeout: float) -> int:
    """Send what --signal=USR1@120 sends before the time limit; the ranks save at the next step boundary and
    exit 0, and the script, seeing train_iters not reached, requeues the job. Returns the step saved."""
    run("scancel", "--signal=USR1", job)
    wait_until(lambda: job_field(run, job, "Restarts") == "1" and job_field(run, job, "JobState") == "PENDING",
               timeout, "the job to requeue itself")
    stopped = latest_step(save)
    assert stopped is not None and 3 <= stopped < total
    assert iterations(save) == list(range(1, stopped + 1))
    assert_dp2_checkpoint(save, stopped)
    return stopped


def rerun_now_and_wait(run, job, nodes: int, timeout: float) -> None:
    """Skip Slurm's 2-minute requeue delay once the nodes are idle and a second has passed (slurmd refuses,
    "credential revoked", a job restarted in the same second its previous run was killed); wait for the end."""
    wait_until(lambda: run("sinfo", "-h", "-N", "-o", "%T").split() == ["idle"] * nodes, 60, "the nodes to be idle")
    time.sleep(2)
    run("scontrol", "update", f"JobId={job}", "StartTime=now")
    wait_until(lambda: finished(run, job), timeout, "the rerun")


def assert_resumed_to_the_end(run, job, rerun_output: str, save: Path, stopped: int, total: int) -> None:
    """The rerun resumed from the step saved on USR1 and trained to train_iters."""
    assert job_field(run, job, "JobState") == "COMPLETED", rerun_output[-3000:]
    assert "restart 1:" in rerun_output and f"global_step{stopped} at iteration {stopped}" in rerun_output
    assert iterations(save) == list(range(1, total + 1))  # the rerun's first iteration follows the checkpoint
    assert latest_step(save) == total
    assert_dp2_checkpoint(save, total)
