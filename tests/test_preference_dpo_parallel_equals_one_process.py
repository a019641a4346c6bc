"""DPO at TP=2 (with sequence parallelism) and at DP=2 (ZeRO-1) computes what one process computes: the same
objective and rewards every step and the same weights after, with the frozen reference sharded like the policy.
Tolerances and their bounds: tests/test_parallel_equivalence.py (the summed log-probabilities change their
order of addition only; beta = 0.1 scales their rounding down)."""

import pytest

from conftest import run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint
from test_parallel_equivalence import OPTIMIZER, assert_same_metrics, assert_same_weights
from test_preference_dpo_trains_exports_and_resumes import dpo_keys

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]
STEPS = 10


def _train(folder, small_corpus, pairs, start, nproc, **keys):
    tp = keys.get("model_parallel_size", 1)
    config = write_train_config(folder, small_corpus, **dpo_keys(
        pairs, load=str(start), train_iters=STEPS, checkpoint_factor=None, optimizer=OPTIMIZER,
        make_vocab_size_divisible_by=128 // tp, **keys))
    run_training(config, nproc=nproc)
    return folder / "ckpt"


def _same(a, b):
    assert_same_metrics(a, b, ("lm_loss", "chosen_rewards", "margins", "ref_pos", "chosen_neg"), STEPS)
    assert_same_weights(a, b)


def test_dpo_tp2_with_sequence_parallel_and_dp2_equal_one_process(tmp_path, small_corpus, preference_pairs,
                                                                  trained_checkpoint):
    pairs = preference_pairs
    folders = {name: tmp_path / name for name in ("one", "tp2", "dp2")}
    for f in folders.values():
        f.mkdir()
    one = _train(folders["one"], small_corpus, pairs, trained_checkpoint, 1)
    tp2 = _train(folders["tp2"], small_corpus, pairs, trained_checkpoint, 2, model_parallel_size=2,
                 sequence_parallel=True)
    dp2 = _train(folders["dp2"], small_corpus, pairs, trained_checkpoint, 2, train_micro_batch_size_per_gpu=2)
    assert checkpoint.tp_size_of(checkpoint.resolve(tp2)) == 2
    assert checkpoint.tp_size_of(checkpoint.resolve(tp2) / "reference") == 2
    _same(tp2, one)
    _same(dp2, one)
