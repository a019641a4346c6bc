"""SIGTERM saves at the next step boundary and exits 0; a crash at any stage of a save leaves `latest` on a
complete checkpoint (failures injected at each stage), and files and folders reach the disk before `latest` moves."""

import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from conftest import PYTHON, REPO, read_metrics, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint

pytestmark = [pytest.mark.slow]


def start(config):
    return subprocess.Popen([PYTHON, "train.py", str(config)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path, small_corpus):
    config = write_train_config(tmp_path, small_corpus, train_iters=100_000, lr_decay_iters=1000)
    metrics = tmp_path / "ckpt" / "metrics.jsonl"
    proc = start(config)
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stopping at step" in out
    step = checkpoint.read_latest(tmp_path / "ckpt")
    assert step == max(read_metrics(tmp_path / "ckpt")) >= 3
    state, _, _ = checkpoint.load_merged(tmp_path / "ckpt")
    assert all(torch.isfinite(t).all() for t in state.values())


class Crash(BaseException):
    """The process dies here (nothing after it runs, no cleanup)."""


def crash_at(stage):
    def fault(reached):
        if reached == stage:
            raise Crash(stage)
    return fault


def written_step(ckpt, src_step, step):
    """Step `step` completely written under its temporary name, holding step `src_step`'s files."""
    tmp = checkpoint.start_partial(ckpt, step)
    for f in checkpoint.step_dir(ckpt, src_step).iterdir():
        if f.is_dir():  # configs/: the run's config files as given
            shutil.copytree(f, tmp / f.name)
        else:
            shutil.copyfile(f, tmp / f.name)
    return tmp


def step_folders(ckpt):
    return sorted(p.name for p in ckpt.iterdir() if p.name.startswith("global_step"))


@pytest.mark.parametrize("stage, step", [("before_rename", 3), ("before_latest", 3), ("replacing", 2)])
def test_a_crash_at_each_stage_of_a_save_leaves_latest_on_a_complete_checkpoint(trained_checkpoint, tmp_path,
                                                                                stage, step):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_checkpoint, ckpt)
    before, _, _ = checkpoint.load_merged(ckpt)  # step 2; the new folder holds step 1's different weights
    with pytest.raises(Crash):
        checkpoint.publish(written_step(ckpt, 1, step), ckpt, step, fault=crash_at(stage))
    assert checkpoint.read_latest(ckpt) == 2
    folder = checkpoint.resolve(ckpt)
    assert checkpoint.step_is_intact(folder)
    for f in folder.glob("*.pt"):
        checkpoint.read_file(f)
    state, _, _ = checkpoint.load_merged(ckpt)
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
    # the next save recovers what the crash left and publishes
    checkpoint.publish(written_step(ckpt, 1, step), ckpt, step)
    assert checkpoint.read_latest(ckpt) == step
    assert step_folders(ckpt) == sorted({"global_step1", "global_step2", f"global_step{step}"})
    after, _, _ = checkpoint.load_merged(ckpt)
    assert not all(torch.equal(after[k], before[k]) for k in before)


def test_training_resumes_after_a_crash_while_replacing_a_step_folder(trained_checkpoint, small_corpus, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_checkpoint, ckpt)
    with pytest.raises(Crash):
        checkpoint.publish(written_step(ckpt, 1, 2), ckpt, 2, fault=crash_at("replacing"))
    assert not checkpoint.step_dir(ckpt, 2).exists()  # only its .old copy is left
    config = write_train_config(tmp_path, small_corpus, train_iters=3, load=str(ckpt), override_lr_scheduler=True)
    run = run_training(config)
    assert "resumed from" in run.stdout and "global_step2.old at iteration 2" in run.stdout
    assert checkpoint.read_latest(ckpt) == 3
    assert step_folders(ckpt) == ["global_step1", "global_step2", "global_step3"]


def test_publish_flushes_every_file_and_folder_before_latest_moves(trained_checkpoint, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_checkpoint, ckpt)
    tmp = written_step(ckpt, 2, 3)
    names = [f.name for f in tmp.iterdir()]
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpoint.publish(tmp, ckpt, 3)
    latest = events.index(("replace", str(ckpt / "latest")))
    moved = events.index(("replace", str(checkpoint.step_dir(ckpt, 3))))
    synced_before_move = {path for kind, path in events[:moved] if kind == "fsync"}
    assert {str(tmp / n) for n in names} | {str(tmp)} <= synced_before_move
    assert ("fsync", str(ckpt)) in events[moved:latest]  # the rename itself is on disk
    assert any(kind == "fsync" and path.startswith(str(ckpt / "latest.tmp")) for kind, path in events[moved:latest])
    assert events[latest + 1:] and events[-1] == ("fsync", str(ckpt))  # and so is the new `latest`


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, small_corpus):
    config = write_train_config(tmp_path, small_corpus, train_iters=50, extra_save_iters=[0], max_nan_steps=2,
                                optimizer={"type": "Adam", "params": {"lr": 1e30}}, warmup=0.0,
                                gradient_clipping=0.0)
    run = run_training(config, check=False)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert "2 updates in a row skipped (max_nan_steps 2)" in last
    assert "the last because loss is NaN/inf on some rank" in last
    assert "last good checkpoint: step 0" in last
    assert "Traceback" not in run.stderr
    assert checkpoint.read_latest(tmp_path / "ckpt") == 0
