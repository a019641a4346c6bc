"""Through deepy.py on one machine: a stop signal (SIGUSR1, SIGTERM, SIGINT) reaches every rank, each saves
at its next step and deepy exits 0 with no process left, even when the save takes longer than the 30 s
DeepSpeed's launcher allowed; past signal_grace_seconds the ranks are killed; two runs started at once
take different free ports."""

import os
import re
import signal
import subprocess
import time

import psutil
import pytest

from conftest import PYTHON, REPO, read_metrics, write_train_config
from neox_fork.checkpoint import store as checkpoint

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def start_deepy(config):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen([PYTHON, "deepy.py", "train.py", str(config)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(predicate, proc, timeout=300, poll=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"deepy ended early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        time.sleep(poll)
    proc.kill()
    raise AssertionError(f"timed out:\n{proc.stdout.read()[-3000:]}")


def logged_steps(ckpt):
    metrics = ckpt / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def ranks_of(proc):
    ranks = psutil.Process(proc.pid).children()
    assert len(ranks) == 2, ranks
    return ranks


def assert_complete_checkpoint(ckpt, out):
    step = checkpoint.read_latest(ckpt)
    assert step is not None and step == max(read_metrics(ckpt)), out[-3000:]
    folder = checkpoint.step_dir(ckpt, step)
    assert len(list(folder.glob("*zero_pp_rank_*_optim_states.pt"))) == 2  # both ranks' shards
    checkpoint.load_merged(ckpt)  # every file of the published step reads
    assert not list(ckpt.glob("*.partial")), list(ckpt.iterdir())
    return step


def assert_gone(pids):
    left = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind: {left}"


def test_usr1_to_deepy_saves_on_every_rank_even_when_the_save_outlasts_30_seconds(tmp_path, small_corpus):
    """The ranks are frozen (SIGSTOP) for 35 s while the checkpoint is being written, as a slow filesystem
    would hold them; DeepSpeed's launch.py would have SIGKILLed them at 30 s."""
    config = write_train_config(tmp_path, small_corpus, train_iters=100_000, lr_decay_iters=1000, num_gpus=2,
                                hidden_size=256, num_layers=4)
    ckpt = tmp_path / "ckpt"
    proc = start_deepy(config)
    wait_for(lambda: logged_steps(ckpt) >= 2, proc)
    ranks = ranks_of(proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: any(ckpt.glob("global_step*.partial")), proc, poll=0.002)
    for rank in ranks:
        rank.suspend()
    assert any(ckpt.glob("global_step*.partial")), "the ranks were not stopped inside the save"
    time.sleep(35)
    for rank in ranks:
        rank.resume()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert time.monotonic() - sent > 35
    assert "received SIGUSR1: passing it to 2 rank(s)" in out
    assert "all 2 rank(s) saved and stopped on SIGUSR1" in out and "stopping at step" in out
    assert_complete_checkpoint(ckpt, out)
    assert_gone([proc.pid] + [r.pid for r in ranks])


def test_int_to_deepy_saves_and_exits_zero(tmp_path, small_corpus):
    """Ctrl-C (SIGTERM takes the same path: see the grace test below and train.py's own SIGTERM test)."""
    sig = signal.SIGINT
    config = write_train_config(tmp_path, small_corpus, train_iters=100_000, lr_decay_iters=1000, num_gpus=2)
    ckpt = tmp_path / "ckpt"
    proc = start_deepy(config)
    wait_for(lambda: logged_steps(ckpt) >= 2, proc)
    ranks = ranks_of(proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert f"all 2 rank(s) saved and stopped on {sig.name}" in out
    assert assert_complete_checkpoint(ckpt, out) >= 2
    assert_gone([r.pid for r in ranks])


def test_ranks_still_running_after_the_grace_period_are_killed(tmp_path, small_corpus):
    config = write_train_config(tmp_path, small_corpus, train_iters=100_000, lr_decay_iters=1000, num_gpus=2,
                                signal_grace_seconds=3)
    ckpt = tmp_path / "ckpt"
    proc = start_deepy(config)
    wait_for(lambda: logged_steps(ckpt) >= 1, proc)
    ranks = ranks_of(proc)
    for rank in ranks:  # hung ranks: they can neither save nor exit
        rank.suspend()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGKILL, out[-3000:]
    assert "ranks still running in 3 s are killed" in out and "still running: SIGKILL" in out
    assert checkpoint.read_latest(ckpt) is None
    assert_gone([r.pid for r in ranks])


def test_two_trainings_at_once_on_one_machine_take_different_free_ports(tmp_path, small_corpus):
    procs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        # one rank each: its process group still listens on the master port
        procs.append(start_deepy(write_train_config(tmp_path / name, small_corpus, train_iters=3, num_gpus=1)))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    ports = []
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-3000:]
        ports.append(re.search(r"rendezvous 127\.0\.0\.1:(\d+);", out).group(1))
    assert ports[0] != ports[1]
    for name in ("a", "b"):
        assert checkpoint.read_latest(tmp_path / name / "ckpt") == 3


def test_a_free_port_is_drawn_below_the_kernels_source_ports():
    """deepy's rendezvous port is bound by rank 0 seconds after deepy picks it; a port of the kernel's ephemeral
    range could meanwhile become the source port of any outgoing connection (EADDRINUSE, seen once in the suite)."""
    from pathlib import Path

    from neox_fork.launch.launcher import free_port

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= p < low for p in ports), (low, sorted(ports))
    assert len(ports) > 1  # drawn, not one fixed port
