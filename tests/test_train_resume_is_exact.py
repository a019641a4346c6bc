"""Stopping at N and resuming to 2N gives the same losses as 2N uninterrupted steps."""

import json

import pytest
import yaml

from conftest import read_metrics, run_training, write_train_config

pytestmark = [pytest.mark.slow]


def test_resume_continues_bit_for_bit(tmp_path, small_corpus):
    (tmp_path / "full").mkdir()
    (tmp_path / "half").mkdir()
    full = write_train_config(tmp_path / "full", small_corpus, train_iters=10)
    run_training(full)
    expected = read_metrics(tmp_path / "full" / "ckpt")

    half = write_train_config(tmp_path / "half", small_corpus, train_iters=10, exit_interval=5)
    run_training(half)
    assert (tmp_path / "half" / "ckpt" / "latest").read_text() == "global_step5"
    keys = yaml.safe_load(half.read_text())
    keys.update(exit_interval=None, load=keys["save"])
    half.write_text(yaml.safe_dump(keys))
    run = run_training(half)
    assert "resumed from" in run.stdout and "at iteration 5" in run.stdout
    resumed = read_metrics(tmp_path / "half" / "ckpt")
    assert sorted(resumed) == list(range(1, 11))
    for it in range(1, 11):
        assert resumed[it] == expected[it], (it, resumed[it], expected[it])
    # the loss falls over a short run, and every logged row has the documented fields
    assert expected[10] < expected[1]
    rows = [json.loads(line) for line in (tmp_path / "full" / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if "lm_loss" in row:
            assert {"iteration", "lm_loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= row.keys()
    assert (tmp_path / "full" / "ckpt" / "latest").read_text() == "global_step10"
