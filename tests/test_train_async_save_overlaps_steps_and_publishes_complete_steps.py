"""async_save: training goes on while a save is written, the files are exactly a synchronous save's, and a step
folder becomes `latest` only when every rank has written it: a job killed mid-save resumes exactly from the step
before.

NEOX_FORK_TEST_SLOW_ASYNC_SAVE (training/state.py) makes each writer thread wait before writing, so a save is
still in flight for a known time.
"""

import os
import signal
import subprocess
import time

import psutil
import pytest
import torch

from conftest import PYTHON, REPO, read_metrics, run_cli, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint

pytestmark = [pytest.mark.slow]

KEYS = dict(train_iters=6, checkpoint_factor=2, hidden_dropout=0.1, keep_last_n_checkpoints=None)


def tensors(node, prefix=""):
    """{path in the object: tensor} of everything a checkpoint file holds."""
    if isinstance(node, torch.Tensor):
        return {prefix: node}
    out = {}
    if isinstance(node, dict):
        for key, value in node.items():
            out.update(tensors(value, f"{prefix}/{key}"))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            out.update(tensors(value, f"{prefix}/{i}"))
    return out


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory, small_corpus):
    folder = tmp_path_factory.mktemp("sync")
    run_training(write_train_config(folder, small_corpus, **KEYS), nproc=2)
    return folder / "ckpt"


@pytest.mark.multiproc
def test_an_async_save_writes_exactly_the_tensors_of_a_synchronous_one_and_overlaps_the_next_steps(
        sync_run, tmp_path, small_corpus):
    config = write_train_config(tmp_path, small_corpus, async_save=True, **KEYS)
    run = run_cli("train.py", config, nproc=2, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                        NEOX_FORK_TEST_SLOW_ASYNC_SAVE="3"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    started = next(i for i, line in enumerate(lines) if "global_step2 in the background" in line)
    published = next(i for i, line in enumerate(lines) if line.endswith("saved checkpoint " + str(
        tmp_path / "ckpt" / "global_step2")))
    step3 = next(i for i, line in enumerate(lines) if "step 3/6" in line)
    assert started < step3 < published  # step 3 ran while step 2's files were still being written
    ours = tmp_path / "ckpt"
    assert checkpoint.saved_steps(ours) == checkpoint.saved_steps(sync_run) == [2, 4, 6]
    assert read_metrics(ours) == read_metrics(sync_run)
    for step in (2, 4, 6):
        a, b = checkpoint.step_dir(ours, step), checkpoint.step_dir(sync_run, step)
        files = sorted(p.name for p in b.glob("*.pt"))
        assert sorted(p.name for p in a.glob("*.pt")) == files and len(files) >= 4
        for name in files:
            ta, tb = tensors(checkpoint.read_file(a / name)), tensors(checkpoint.read_file(b / name))
            assert ta.keys() == tb.keys(), name
            for key in ta:
                assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), (name, key)


@pytest.mark.multiproc
def test_a_job_killed_mid_save_keeps_latest_on_the_step_before_and_resumes_exactly(sync_run, tmp_path, small_corpus):
    config = write_train_config(tmp_path, small_corpus, async_save=True, num_gpus=2, load=str(tmp_path / "ckpt"),
                                **KEYS)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", NEOX_FORK_TEST_SLOW_ASYNC_SAVE="20")
    proc = subprocess.Popen([PYTHON, "deepy.py", "train.py", str(config)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen = []
    try:
        deadline = time.monotonic() + 300
        while not any("global_step4 in the background" in line for line in seen):
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(seen)[-3000:]
            seen.append(line)
    finally:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    ckpt = tmp_path / "ckpt"
    assert checkpoint.read_latest(ckpt) == 2  # step 4's files were still being written: not published
    assert checkpoint.step_is_intact(checkpoint.resolve(ckpt))
    resumed = run_training(config, nproc=2)  # load == save: from global_step2, no slow writer this time
    assert "resumed from" in resumed.stdout and "at iteration 2" in resumed.stdout
    assert not list(ckpt.glob("*.partial"))
    want, got = read_metrics(sync_run), read_metrics(ckpt)
    assert [got[i] for i in range(3, 7)] == [want[i] for i in range(3, 7)]  # dropout on: the RNG came back too
