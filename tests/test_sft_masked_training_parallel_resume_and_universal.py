"""Masked fine-tuning on the shipped chat set (labels from the chat tool, pack_impl pack_until_overflow, so the
micro-batches hold different numbers of trained tokens) trains alike however the global batch is split.

One 4-rank launch, TP=2 with sequence parallelism x DP=2, one sample per micro-batch and 2 accumulation steps,
stops at step 3; it resumes from DeepSpeed's universal checkpoint at TP=1 x DP=2 to step 6 and has taken, loss for
loss and weight for weight, the steps one process with one micro-batch of 4 takes uninterrupted: the loss is the
global batch's mean over trained tokens (a per-micro-batch mean would differ), and the data order continues
mid-epoch. A one-process run stopped at step 3 and resumed is bit-for-bit the uninterrupted one.

Tolerances as tests/test_sequence_parallel_and_zero2_training.py (the runs differ in summation order only):
losses within 1e-5 relative, weights within 1% of one step's lr with Adam's eps at 1e-4; the validation loss
(masked the same way, over the same samples) within 1e-5 relative.
"""

import pytest
import yaml

from conftest import read_metrics, run_training, write_train_config
from test_sequence_parallel_and_zero2_training import LR, STEPS, STOP, _resume, assert_same_run

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def _config(folder, corpus, data, **keys):
    folder.mkdir(parents=True, exist_ok=True)
    keys.setdefault("make_vocab_size_divisible_by", 256 // keys.get("model_parallel_size", 1))
    return write_train_config(
        folder, corpus, train_iters=STEPS, hidden_dropout=0.0, seq_length=128, pack_impl="pack_until_overflow",
        train_data_paths=[data["train"][0]], train_label_data_paths=[data["train"][1]],
        valid_data_paths=[data["valid"][0]], valid_label_data_paths=[data["valid"][1]], eval_interval=STOP,
        optimizer={"type": "Adam", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-4}}, **keys)


@pytest.fixture(scope="module")
def single(tmp_path_factory, small_corpus, sft_chat_data):
    folder = tmp_path_factory.mktemp("sftmask_single")
    run_training(_config(folder, small_corpus, sft_chat_data, train_micro_batch_size_per_gpu=4))
    return folder / "ckpt"


def test_tp2_sp_by_dp2_with_accumulation_then_universal_resume_equals_one_process(tmp_path, small_corpus,
                                                                                   sft_chat_data, single):
    run = _config(tmp_path / "run", small_corpus, sft_chat_data, model_parallel_size=2, sequence_parallel=True,
                  train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=2, exit_interval=STOP)
    run_training(run, nproc=4)
    out = _resume(run, 2, model_parallel_size=1, sequence_parallel=False, train_micro_batch_size_per_gpu=2,
                  gradient_accumulation_steps=1, load_universal=True)
    assert "at TP=1 x DP=2, iteration 3 (12 samples consumed)" in out.stdout
    assert_same_run(tmp_path / "run" / "ckpt", single)
    # validation reads eval_iters x micro-batch x DP samples: at step 6 the same 8 as one process (at step 3,
    # with micro-batches of 1, only 4 of them)
    evals, want = read_metrics(tmp_path / "run" / "ckpt", "eval_lm_loss"), read_metrics(single, "eval_lm_loss")
    assert sorted(evals) == sorted(want) == [STOP, STEPS]
    assert evals[STEPS] == pytest.approx(want[STEPS], rel=1e-5)


def test_one_process_resumes_mid_epoch_bit_for_bit(tmp_path, small_corpus, sft_chat_data, single):
    half = _config(tmp_path / "half", small_corpus, sft_chat_data, train_micro_batch_size_per_gpu=4,
                   exit_interval=STOP)
    run_training(half)
    keys = yaml.safe_load(half.read_text())
    keys.update(exit_interval=None, load=keys["save"])
    half.write_text(yaml.safe_dump(keys))
    out = run_training(half)
    assert "resumed from" in out.stdout and "at iteration 3" in out.stdout
    assert read_metrics(tmp_path / "half" / "ckpt") == read_metrics(single)
    assert read_metrics(tmp_path / "half" / "ckpt", "eval_lm_loss") == read_metrics(single, "eval_lm_loss")
