"""deepy.py with a hostfile really starts ranks on two hosts (network namespaces made by
scripts/fake_cluster.sh, each with its own address, hostname and sshd, sharing this file system):

* DeepSpeed's pdsh runner over ssh: DP=2, TP=2 and two pipeline stages across node1 and node2 train exactly
  like one process (the bars of tests/test_parallel_equivalence.py), and every rank logs its host;
* killing the rank on node2 fails the whole job within seconds, with a line naming that rank and host, and
  no process stays behind on either host;
* SIGUSR1 to deepy reaches the ranks on both hosts, which save one checkpoint together and stop (exit 0);
* `launcher: openmpi` + `deepspeed_mpi: true` (Debian's Open MPI, mpirun over the same ssh) trains DP=2 across
  the hosts like one process.

Run as root (CI does); `pytest -m "not multinode"` skips this tier.
"""

import re
import subprocess
import time

import pytest

import test_parallel_equivalence as equivalence
from conftest import PYTHON, REPO, wait_until, write_train_config
from fake_cluster import clean_env, command_line, fake_cluster
from neox_fork.checkpoint import store as checkpoint
from neox_fork.launch.launcher import free_port

pytestmark = [pytest.mark.multinode, pytest.mark.slow, pytest.mark.multiproc]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with fake_cluster(tmp_path_factory.mktemp("cluster")) as hosts:
        yield hosts


@pytest.fixture(scope="module")
def single(tmp_path_factory, small_corpus):
    """The reference of tests/test_parallel_equivalence.py: one local process, global batch 4."""
    return equivalence.train(tmp_path_factory.mktemp("single"), small_corpus, "tp1", 1,
                             train_micro_batch_size_per_gpu=4)


def cluster_config(folder, corpus, tp=1, **keys):
    """The reference's config at TP=tp over two ranks (global batch 4), on a free master port."""
    folder.mkdir(exist_ok=True)
    keys = {**dict(train_iters=equivalence.STEPS, hidden_dropout=0.0, model_parallel_size=tp,
                   make_vocab_size_divisible_by=256 // tp, train_micro_batch_size_per_gpu=2 * tp,
                   optimizer=equivalence.OPTIMIZER, master_port=free_port()), **keys}
    return write_train_config(folder, corpus, **keys)


def deepy_on_node1(cluster, config, hostfile, timeout=420, **env):
    """deepy on node1. DeepSpeed's runner sends other hosts only PYTHON*-style variables and the lines of
    DS_ENV_FILE (default ~/.deepspeed_env): one thread per rank there too, as in the one-process reference."""
    env_file = config.parent / "deepspeed_env"
    env_file.write_text("OMP_NUM_THREADS=1\n")
    return cluster.run("node1", PYTHON, "deepy.py", "train.py", config, "-H", hostfile, timeout=timeout,
                       check=False, env=clean_env(DS_ENV_FILE=str(env_file), **env))


@pytest.mark.parametrize("tp", [1, 2], ids=["dp2", "tp2"])
def test_multinode_pdsh_two_hosts_train_like_one_process(cluster, tmp_path, small_corpus, single, tp):
    config = cluster_config(tmp_path / "run", small_corpus, tp=tp)
    run = deepy_on_node1(cluster, config, cluster.hostfile(slots=1))
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "pdsh -S -f 1024 -w node1,node2" in out  # DeepSpeed's runner went through pdsh and ssh
    # every rank says where it runs (pdsh prefixes a remote line with its host, the log line names it too)
    assert "rank 0/2 on host node1: local rank 0, pid" in out
    assert "node2: [" in out and "rank 1/2 on host node2: local rank 0, pid" in out
    ckpt = tmp_path / "run" / "ckpt"
    if tp == 2:
        assert checkpoint.tp_size_of(checkpoint.resolve(ckpt)) == 2
    else:
        assert len(list(checkpoint.resolve(ckpt).glob("*zero_pp_rank_*_optim_states.pt"))) == 2
    # Losses to the bar of the one-host equivalence tests. Not the weights to theirs: across hosts the sum
    # is gloo's, on one host DeepSpeed's shared-memory all-reduce, and a last-bit difference in a gradient
    # near zero moves Adam's update of that weight by up to lr (3e-3) per step.
    equivalence.assert_same_losses(ckpt, single)


def test_multinode_pdsh_two_hosts_pipeline_stages_train_like_one_process(cluster, tmp_path, small_corpus, single):
    """pipe_parallel_size 2 over the two hosts: stage 0 on node1, stage 1 on node2, so every micro-batch's
    activations and gradients cross between hosts (gloo over the namespaces' network); two micro-batches in
    flight a step. Losses to the one-process bar, as above."""
    config = cluster_config(tmp_path / "run", small_corpus, pipe_parallel_size=2, gradient_accumulation_steps=2)
    run = deepy_on_node1(cluster, config, cluster.hostfile(slots=1))
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "rank 0/2 on host node1" in out and "rank 1/2 on host node2" in out
    folder = checkpoint.resolve(tmp_path / "run" / "ckpt")
    # one model states file and one ZeRO shard per stage: each host's rank saved its own stage
    assert sorted(p.name for p in folder.glob("mp_rank_*_model_states.pt")) == ["mp_rank_00_model_states.pt",
                                                                               "mp_rank_01_model_states.pt"]
    assert len(list(folder.glob("zero_pp_rank_0_mp_rank_*_optim_states.pt"))) == 2
    equivalence.assert_same_losses(tmp_path / "run" / "ckpt", single)


def start_deepy(cluster, config, log_path):
    """deepy on node1 in the background, its output in log_path; returns once step 2 is logged."""
    with open(log_path, "w") as log:
        job = subprocess.Popen(cluster.on("node1", PYTHON, "deepy.py", "train.py", config, "-H",
                                          cluster.hostfile(slots=1)),
                               cwd=REPO, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
    wait_until(lambda: "step 2/10000" in log_path.read_text() or job.poll() is not None, 300, "2 steps")
    assert job.poll() is None, log_path.read_text()[-3000:]
    return job


def test_multinode_killing_one_hosts_rank_fails_the_job_naming_rank_and_host(cluster, tmp_path, small_corpus):
    config = cluster_config(tmp_path / "run", small_corpus, train_iters=10_000, checkpoint_factor=100_000)
    daemons = {host: cluster.pids(host) for host in cluster.hosts}  # sshd on each host
    log_path = tmp_path / "deepy.log"
    job = start_deepy(cluster, config, log_path)
    try:
        # the training process of rank 1: `python -u train.py ...` under our rank watcher, on node2
        ranks = [p for p in cluster.pids("node2") - daemons["node2"]
                 if " train.py " in command_line(p) and "neox_fork.launch" not in command_line(p)]
        assert len(ranks) == 1, [command_line(p) for p in cluster.pids("node2")]
        killed = time.monotonic()
        subprocess.run(["kill", "-KILL", str(ranks[0])], check=True)
        code = job.wait(timeout=120)
        seconds = time.monotonic() - killed
    finally:
        if job.poll() is None:
            job.kill()
    out = log_path.read_text()
    assert code != 0, out[-3000:]
    assert seconds < 60, f"the job took {seconds:.0f} s to notice a dead rank"
    assert "[neox_fork.launch] rank 1/2 (local rank 0 on node2) was killed by SIGKILL" in out
    # ... and nothing stays behind on any host: only each host's sshd is left running
    for host in cluster.hosts:
        wait_until(lambda: cluster.pids(host) == daemons[host], 30, f"{host}'s processes to end")


def test_multinode_usr1_to_deepy_makes_every_rank_on_every_host_save_and_stop(cluster, tmp_path, small_corpus):
    """What a batch system's preemption signal to the launching process must do (DeepSpeed's runner alone
    would die of USR1 and leave the ranks training, unsaved)."""
    config = cluster_config(tmp_path / "run", small_corpus, train_iters=10_000, checkpoint_factor=100_000)
    daemons = {host: cluster.pids(host) for host in cluster.hosts}
    log_path = tmp_path / "deepy.log"
    job = start_deepy(cluster, config, log_path)
    try:
        deepy = [p for p in cluster.pids("node1") if "deepy.py" in command_line(p)]
        assert len(deepy) == 1, [command_line(p) for p in cluster.pids("node1")]
        subprocess.run(["kill", "-USR1", str(deepy[0])], check=True)
        code = job.wait(timeout=180)
    finally:
        if job.poll() is None:
            job.kill()
    out = log_path.read_text()
    assert code == 0, out[-3000:]
    assert "deepy: SIGUSR1: passing it to every rank on node1,node2" in out
    # each host's copy of the signal arrives when ssh gets there: the first stops both ranks at one step (a
    # later copy finds its rank saved and is ignored, so the order does not matter)
    assert re.search(r"rank [01] node[12]\] received SIGUSR1", out)
    steps = re.findall(r"rank (\d) (node\d)\] stopping at step (\d+) on signal", out)
    assert sorted(steps) == [("0", "node1", steps[0][2]), ("1", "node2", steps[0][2])], steps
    ckpt = tmp_path / "run" / "ckpt"
    step = checkpoint.read_latest(ckpt)
    assert step is not None and step >= 2
    assert len(list((ckpt / f"global_step{step}").glob("*zero_pp_rank_*_optim_states.pt"))) == 2  # both hosts
    for host in cluster.hosts:
        wait_until(lambda: cluster.pids(host) == daemons[host], 30, f"{host}'s processes to end")


def test_multinode_openmpi_deepspeed_mpi_two_hosts_train_like_one_process(cluster, tmp_path, small_corpus, single):
    config = cluster_config(tmp_path / "run", small_corpus, launcher="openmpi", deepspeed_mpi=True)
    # Open MPI refuses root unless told twice; CI and the fake hosts run as root
    run = deepy_on_node1(cluster, config, cluster.hostfile(slots=1), OMPI_ALLOW_RUN_AS_ROOT="1",
                         OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "mpirun -n 2 -hostfile" in out and "-x MASTER_ADDR=node1" in out
    assert "rank 0/2 on host node1" in out and "rank 1/2 on host node2" in out
    equivalence.assert_same_losses(tmp_path / "run" / "ckpt", single)
