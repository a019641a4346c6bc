"""SIGTERM saves at the next step boundary and exits 0; a process killed mid-save leaves `latest` whole."""

import os
import signal
import subprocess
import time

import pytest
import torch
import yaml

from conftest import PYTHON, REPO, read_metrics, run_training, write_train_config
from neox_fork import checkpoint

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


def test_kill_during_saves_never_leaves_latest_pointing_at_a_broken_checkpoint(tmp_path, small_corpus):
    config = write_train_config(tmp_path, small_corpus, train_iters=100_000, lr_decay_iters=1000,
                                checkpoint_factor=1, keep_last_n_checkpoints=3)
    ckpt = tmp_path / "ckpt"
    proc = start(config)
    wait_for(lambda: (checkpoint.read_latest(ckpt) or 0) >= 3, proc)
    # kill at a spread of moments: with a save every step, some land inside a save
    for delay in (0.0, 0.013, 0.029, 0.047):
        time.sleep(delay)
        proc.kill()
        proc.wait()
        step = checkpoint.read_latest(ckpt)
        folder = checkpoint.step_dir(ckpt, step)
        names = {p.name for p in folder.iterdir()}
        assert {"mp_rank_00_model_states.pt", "config.yml", "tokenizer.json"} <= names
        assert any(n.endswith("optim_states.pt") for n in names)
        checkpoint.load_merged(ckpt)  # every file of the published step reads
        keys = yaml.safe_load(config.read_text())
        keys["load"] = str(ckpt)
        config.write_text(yaml.safe_dump(keys))
        proc = start(config)
        wait_for(lambda s=step: (checkpoint.read_latest(ckpt) or 0) >= s + 2, proc)
    proc.kill()
    proc.wait()


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, small_corpus):
    config = write_train_config(tmp_path, small_corpus, train_iters=50, extra_save_iters=[0], max_nan_steps=2,
                                optimizer={"type": "Adam", "params": {"lr": 1e30}}, warmup=0.0,
                                gradient_clipping=0.0)
    run = run_training(config, check=False)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert "loss was NaN/inf for 2 steps in a row (max_nan_steps 2)" in last
    assert "last good checkpoint: step 0" in last
    assert "Traceback" not in run.stderr
    assert checkpoint.read_latest(tmp_path / "ckpt") == 0
