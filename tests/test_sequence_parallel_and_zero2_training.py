"""train.py with sequence parallelism and ZeRO stage 2 trains like one process and resumes across both.

Each run is train.py on local ranks joined by gloo (DeepSpeed, the real hooks). To keep CI time small, each
launch proves several things: a run stops at step 3 and is resumed with another layout to step 6.

Tolerances: as in test_sequence_parallel.py. The runs differ from the reference only in summation order
(fp32 gradients agree to below 1e-8 absolute); with Adam's eps at 1e-4 an update moves by at most
lr * 1e-4 per step under such a difference, so every weight must agree within 1% of one step's lr and
each logged loss within 1e-5 relative.

Dropout: the residual-stream masks are the same at any TP size and with or without sequence parallelism
(model.HiddenDropout), but each data-parallel rank draws the masks of its own micro-batch, so with dropout
on a DP=2 run is compared with a TP=1 x DP=2 run; with dropout off, with one process.
"""

import pytest
import torch
import yaml

from checkpoint_bytes import assert_files_hold_only_their_tensors
from conftest import read_metrics, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint
from neox_fork.checkpoint import universal

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

STEPS, STOP = 6, 3
LR = 3e-3


def _config(folder, corpus, **keys):
    folder.mkdir(parents=True, exist_ok=True)
    keys.setdefault("make_vocab_size_divisible_by", 256 // keys.get("model_parallel_size", 1))
    keys.setdefault("hidden_dropout", 0.0)
    return write_train_config(folder, corpus, train_iters=STEPS,
                              optimizer={"type": "Adam", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-4}},
                              **keys)


def _resume(config, nproc, **changes):
    """Continue the run of `config` from its last checkpoint to STEPS with some keys changed (with
    load_universal: true, from that checkpoint converted by tools/ckpts/to_universal.py)."""
    keys = yaml.safe_load(config.read_text())
    if changes.get("load_universal"):
        universal.convert(keys["save"], workers=1)
    tp = changes.get("model_parallel_size", keys.get("model_parallel_size", 1))
    keys.update(exit_interval=None, load=keys["save"], make_vocab_size_divisible_by=256 // tp, **changes)
    config.write_text(yaml.safe_dump(keys))
    return run_training(config, nproc=nproc)


def assert_same_run(a, b):
    la, lb = read_metrics(a), read_metrics(b)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    for it in la:
        assert la[it] == pytest.approx(lb[it], rel=1e-5), it
    wa, _, _ = checkpoint.load_merged(a)
    wb, _, _ = checkpoint.load_merged(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0.01 * LR, msg=name)


def test_sp_and_zero2_on_tp2_by_dp2_match_one_process_and_reshard(tmp_path, small_corpus):
    """TP=2 + SP x DP=2 with ZeRO-2 (steps 1-3) and, through DeepSpeed's Universal Checkpointing, TP=1 x DP=2
    with ZeRO-1 and no SP (steps 4-6) take the steps one process takes (in fp32: within 1e-5, sharp enough to
    catch a wrong layout, Adam moment or learning rate after the change)."""
    single = _config(tmp_path / "single", small_corpus, train_micro_batch_size_per_gpu=4)
    run_training(single)
    run = _config(tmp_path / "run", small_corpus, model_parallel_size=2, sequence_parallel=True,
                  train_micro_batch_size_per_gpu=2, zero_optimization={"stage": 2},
                  checkpoint_activations=True, exit_interval=STOP)
    run_training(run, nproc=4)
    folder = checkpoint.resolve(tmp_path / "run" / "ckpt")
    assert len(list(folder.glob("*zero_pp_rank_*_optim_states.pt"))) == 4  # optimizer sharded over DP
    assert_files_hold_only_their_tensors(folder)  # ZeRO-2 shards and SP weights (tests/checkpoint_bytes.py)
    out = _resume(run, 2, model_parallel_size=1, sequence_parallel=False, zero_optimization={"stage": 1},
                  load_universal=True)
    assert "(saved at TP=2 x DP=2) at TP=1 x DP=2, iteration 3 (12 samples consumed)" in out.stdout
    assert_same_run(tmp_path / "run" / "ckpt", tmp_path / "single" / "ckpt")


def test_dropout_with_sp_and_zero2_resumes_exactly_across_the_switch(tmp_path, small_corpus):
    """With dropout on: TP=2 x DP=2 with ZeRO-2 stops at step 3 without SP and resumes with SP; it takes
    the steps TP=1 x DP=2 takes uninterrupted (same masks per DP rank, exact ZeRO-2 resume)."""
    keys = dict(hidden_dropout=0.1, zero_optimization={"stage": 2}, train_micro_batch_size_per_gpu=2)
    ref = _config(tmp_path / "ref", small_corpus, **keys)
    run_training(ref, nproc=2)
    run = _config(tmp_path / "run", small_corpus, model_parallel_size=2, exit_interval=STOP, **keys)
    run_training(run, nproc=4)
    out = _resume(run, 4, sequence_parallel=True)
    assert "resumed from" in out.stdout and "at iteration 3" in out.stdout
    assert_same_run(tmp_path / "run" / "ckpt", tmp_path / "ref" / "ckpt")
