"""A real two-node Slurm on two fake hosts (scripts/fake_cluster.sh: network namespaces node1 and node2,
slurmctld on node1, one slurmd per host with NodeAddr its own address, one munged on the shared file system).

The project's multi-node sbatch script, submitted with --nodes=2, trains the tiny config with one rank per
host through deepy.py -> srun; `scancel -s USR1` makes both ranks save, the script requeues the job, and
the rerun resumes on the two hosts at the next step. Run as root (CI does); `pytest -m "not multinode"`
skips this tier. It shares nothing with tests/test_slurm_localhost.py: its daemons, ports and munge socket
live in the hosts' own namespaces and folder.
"""

import functools
import json
import sys
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, wait_until
from fake_cluster import fake_cluster
from slurm_jobs import (assert_resumed_to_the_end, finished, iterations, job_field, rerun_now_and_wait,
                        usr1_saves_and_requeues)

pytestmark = [pytest.mark.multinode, pytest.mark.slow, pytest.mark.multiproc]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import subprocess

    subprocess.run([PYTHON, "tools/datasets/prepare_demo_data.py"], cwd=REPO, check=True, capture_output=True)
    with fake_cluster(tmp_path_factory.mktemp("cluster"), slurm=True) as hosts:
        yield hosts


def slurm(cluster, *cmd, check=True) -> str:
    """A Slurm client command, run on node1 (the login node)."""
    return cluster.run("node1", *cmd, check=check, timeout=60).stdout.strip()


def test_multinode_slurm_two_node_sbatch_trains_across_hosts_and_requeues_on_usr1(cluster, tmp_path):
    save, total = tmp_path / "ckpt", 12
    run = functools.partial(slurm, cluster)
    overlay = tmp_path / "fast.yml"
    overlay.write_text(json.dumps({
        "train_iters": total, "train_micro_batch_size_per_gpu": 2, "seq_length": 128, "log_interval": 1,
        "eval_interval": 1000, "eval_iters": 0, "checkpoint_factor": 1000, "keep_last_n_checkpoints": None}))
    venv = Path(sys.executable).parent.parent
    job = run("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
              f"--output={tmp_path}/slurm-%j.out",
              f"--export=ALL,CONFIGS=configs/tiny.yml {overlay},SAVE={save},VENV={venv}",
              "slurm/stablelm-3b-4e1t.sbatch")
    output = tmp_path / f"slurm-{job}.out"
    wait_until(lambda: len(iterations(save)) >= 3 or finished(run, job), 300, "3 training steps")
    assert not finished(run, job), output.read_text()[-3000:]
    assert job_field(run, job, "NodeList") == "node[1-2]"
    stopped = usr1_saves_and_requeues(run, job, save, total, 90)  # one ZeRO shard from the rank on each host
    first = output.read_text()
    assert "srun --kill-on-bad-exit=1 --ntasks 2 --nodes 2 --ntasks-per-node 1" in first
    assert "rank 0/2 on host node1" in first and "rank 1/2 on host node2" in first
    assert "received SIGUSR1" in first and "requeueing job" in first

    rerun_now_and_wait(run, job, nodes=2, timeout=300)
    rerun = output.read_text()[len(first):]
    assert_resumed_to_the_end(run, job, rerun, save, stopped, total)
    assert "rank 0/2 on host node1" in rerun and "rank 1/2 on host node2" in rerun
