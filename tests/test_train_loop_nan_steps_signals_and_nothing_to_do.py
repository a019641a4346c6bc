"""Edges of the training loop: a step whose loss is NaN still saves when a save is due and still stops on
a signal; a resume with nothing left to do says so in one line."""

import os
import signal
import subprocess
import time

import pytest
import yaml

from conftest import PYTHON, REPO, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint

pytestmark = [pytest.mark.slow]


def test_nan_steps_still_save_when_due_and_stop_on_sigterm(tmp_path, small_corpus):
    # lr 1e30: step 1 is finite and blows the weights up, every later loss is NaN (updates skipped)
    config = write_train_config(tmp_path, small_corpus, train_iters=100_000, lr_decay_iters=1000,
                                max_nan_steps=100_000, checkpoint_factor=2, warmup=0.0, gradient_clipping=0.0,
                                optimizer={"type": "Adam", "params": {"lr": 1e30}})
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([PYTHON, "train.py", str(config)], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 300
    while (checkpoint.read_latest(ckpt) or 0) < 4:  # saves due at NaN steps 2 and 4 happen
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "loss is NaN/inf on some rank; update skipped" in out
    stopped = int(out.split("stopping at step ")[1].split()[0])
    assert checkpoint.read_latest(ckpt) == stopped


def test_resume_with_nothing_left_to_do_says_so(tmp_path, small_corpus):
    config = write_train_config(tmp_path, small_corpus, train_iters=2)
    run_training(config)
    keys = yaml.safe_load(config.read_text())
    keys["load"] = keys["save"]
    config.write_text(yaml.safe_dump(keys))
    run = run_training(config)
    lines = [line for line in run.stdout.splitlines() if "nothing to do" in line]
    assert len(lines) == 1, run.stdout[-3000:]
    assert lines[0].endswith("nothing to do: the checkpoint is at iteration 2 and train_iters is 2; no step was run")
    assert checkpoint.read_latest(tmp_path / "ckpt") == 2
