"""Tensor x data parallelism (with ZeRO-1) computes what one process computes.

Each run is train.py on local ranks joined by gloo (conftest.run_training): the code path NCCL takes on a cluster.

Tolerances (stated in the README). TP and DP sum the same numbers in another order, so results differ by
fp32 rounding, and the bounds below hold on any machine:

* weights: every element within `WEIGHT_TOL` = 1e-3 of one step's lr per step. Adam divides by
  sqrt(v) + eps, so with the default eps (1e-8) a gradient that is rounding-level zero on one side becomes
  a step of up to lr (main failed on a fresh machine that way). These runs use eps = 1e-5: a step is then
  Lipschitz in the gradient, a rounding difference d in a gradient moves it by at most about lr * d / eps,
  and fp32 gradients here carry d <= 1e-9 (unit roundoff 6e-8 times gradient sums below 1e-2): at most
  1e-4 of lr per step. Rounding the updated weight adds one ulp (2.4e-7 for |w| < 4, under 1e-4 of lr).
  The allowance is ten times that bound; a missing all-reduce moves weights by a good part of lr a step.
* losses: relative `LOSS_RTOL` = 1e-5 per logged step (about 170 fp32 unit roundoffs): the loss is a mean
  of per-token log-likelihoods whose sums (at most 768 terms) change order; the weights feeding them
  differ by the bound above.
"""

import pytest
import torch

from checkpoint_bytes import assert_files_hold_only_their_tensors
from conftest import read_metrics, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

STEPS = 10
LR = 3e-3
ADAM_EPS = 1e-5
WEIGHT_TOL = 1e-3 * LR * STEPS
LOSS_RTOL = 1e-5
OPTIMIZER = {"type": "Adam", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": ADAM_EPS}}


def train(tmp_path, small_corpus, name, nproc, **keys):
    """Vocabulary padding is a multiple of make_vocab_size_divisible_by x TP: keep it 768 for every TP."""
    keys.setdefault("make_vocab_size_divisible_by", 256 // keys.get("model_parallel_size", 1))
    keys.setdefault("optimizer", OPTIMIZER)
    folder = tmp_path / name
    folder.mkdir()
    config = write_train_config(folder, small_corpus, train_iters=STEPS, hidden_dropout=0.0, **keys)
    run_training(config, nproc=nproc)
    return folder / "ckpt"


def assert_same_metrics(a, b, keys, steps=STEPS, drift_per_step=0.0):
    """Each metric of `keys` logged at steps 1..steps, within LOSS_RTOL of b's (relative; absolute below 1)
    plus `drift_per_step` for each update before the step."""
    for key in keys:
        la, lb = read_metrics(a, key), read_metrics(b, key)
        assert sorted(la) == sorted(lb) == list(range(1, steps + 1)), key
        for it in la:
            bound = LOSS_RTOL * max(abs(lb[it]), 1.0) + drift_per_step * (it - 1)
            assert abs(la[it] - lb[it]) <= bound, (key, it, la[it], lb[it])


def assert_same_losses(a, b):
    assert_same_metrics(a, b, ("lm_loss",))


def assert_same_weights(a, b, tol=WEIGHT_TOL):
    wa, _, _ = checkpoint.load_merged(a)
    wb, _, _ = checkpoint.load_merged(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=tol, msg=name)


@pytest.fixture(scope="module")
def single(tmp_path_factory, small_corpus):
    """The reference: one process, global batch 4."""
    return train(tmp_path_factory.mktemp("single"), small_corpus, "tp1", 1, train_micro_batch_size_per_gpu=4)


def test_tp2_equals_one_process(tmp_path, small_corpus, single):
    tp2 = train(tmp_path, small_corpus, "tp2", 2, model_parallel_size=2, train_micro_batch_size_per_gpu=4)
    assert checkpoint.tp_size_of(checkpoint.resolve(tp2)) == 2
    assert_same_losses(tp2, single)
    assert_same_weights(tp2, single)


def test_dp2_zero1_equals_one_process_with_the_same_global_batch(tmp_path, small_corpus, single):
    dp2 = train(tmp_path, small_corpus, "dp2", 2, train_micro_batch_size_per_gpu=2)
    folder = checkpoint.resolve(dp2)
    assert len(list(folder.glob("*zero_pp_rank_*_optim_states.pt"))) == 2  # optimizer sharded over DP
    assert_files_hold_only_their_tensors(folder)  # tests/checkpoint_bytes.py
    assert_same_losses(dp2, single)
    assert_same_weights(dp2, single)


def test_tp2_by_dp2_on_four_processes_equals_one_process(tmp_path, small_corpus, single):
    both = train(tmp_path, small_corpus, "tp2dp2", 4, model_parallel_size=2, train_micro_batch_size_per_gpu=2)
    assert checkpoint.tp_size_of(checkpoint.resolve(both)) == 2
    assert_same_losses(both, single)
    assert_same_weights(both, single)
