"""Context parallelism (context_parallel_size 2, DeepSpeed-Ulysses) trains as one process does on the same data.

Runs are train.py on local ranks joined by gloo (conftest.run_training). The reference is one process with the
whole sequences (global batch 4 x 64 tokens, ZeRO-1, hidden dropout 0.1: under context parallelism each rank
keeps its positions of the whole dropout mask, so the masks are the same). Against it, loss for loss and weight
for weight after every step (and the validation loss at the last):

* CP=2 (2 ranks, each holds 32 of the 64 positions of every sample, ZeRO-1 over the two context ranks);
* CP=2 x TP=2 (4 ranks, with ZeRO-2 and full activation recompute) and CP=2 x DP=2 (4 ranks, ZeRO-1 over data x context, micro-batch 2 each; against a
  reference without dropout, as data-parallel ranks draw the same masks for different samples);
* the CP=2 run's step-2 checkpoint resumed at CP=1 through its universal checkpoint (steps 3 and 4);
* the CP=2 run's step-2 checkpoint resumed at CP=2 gives its steps 3 and 4 bit for bit (dropout on: the RNG
  streams come back).

Tolerances are those of tests/test_parallel_equivalence.py (the same sums in another order): losses within 1e-5
relative, weights within 1e-3 of one step's lr per step with Adam's eps at 1e-5.
"""

import pytest

from conftest import read_metrics, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint
from test_parallel_equivalence import LOSS_RTOL, LR, OPTIMIZER, assert_same_metrics, assert_same_weights

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

STEPS = 4
WEIGHT_TOL = 1e-3 * LR * STEPS


def train(folder, corpus, nproc, **keys):
    """Vocabulary padded to 768 at any TP size; checkpoints at steps 2 and 4."""
    keys.setdefault("make_vocab_size_divisible_by", 256 // keys.get("model_parallel_size", 1))
    keys.setdefault("train_micro_batch_size_per_gpu", 4)
    folder.mkdir(parents=True)
    config = write_train_config(folder, corpus, train_iters=STEPS, optimizer=OPTIMIZER, checkpoint_factor=2,
                                eval_interval=STEPS, **keys)
    run_training(config, nproc=nproc)
    return folder / "ckpt"


@pytest.fixture(scope="module")
def single(tmp_path_factory, small_corpus):
    return train(tmp_path_factory.mktemp("context_parallel") / "single", small_corpus, 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_corpus, single):
    return {"single": single,
            "cp2": train(tmp_path_factory.mktemp("context_parallel") / "cp2", small_corpus, 2, context_parallel_size=2)}


def test_cp2_equals_one_process(runs):
    assert checkpoint.dp_size_of(checkpoint.resolve(runs["cp2"])) == 2  # ZeRO partitions over the context ranks
    assert_same_metrics(runs["cp2"], runs["single"], ("lm_loss",), steps=STEPS)
    assert_same_weights(runs["cp2"], runs["single"], tol=WEIGHT_TOL)
    # validation at the last step: each CP rank's part of the mean, summed over the group
    evals, want = read_metrics(runs["cp2"], "eval_lm_loss"), read_metrics(runs["single"], "eval_lm_loss")
    assert list(evals) == list(want) == [STEPS] and evals[STEPS] == pytest.approx(want[STEPS], rel=LOSS_RTOL)


def test_cp2_checkpoint_resumes_at_cp1_through_universal(tmp_path, small_corpus, runs):
    from neox_fork.checkpoint import universal

    saved = tmp_path / "saved"
    import shutil

    shutil.copytree(runs["cp2"], saved)
    (saved / "latest").write_text("global_step2")
    universal.convert(saved, step=2, workers=1)
    folder = tmp_path / "cp1"
    folder.mkdir()
    config = write_train_config(folder, small_corpus, train_iters=STEPS, optimizer=OPTIMIZER,
                                make_vocab_size_divisible_by=256, train_micro_batch_size_per_gpu=4,
                                load=str(saved), load_universal=True)
    run_training(config)
    resumed, want = read_metrics(folder / "ckpt"), read_metrics(runs["single"])
    assert sorted(resumed) == [3, 4]
    for it in resumed:
        assert resumed[it] == pytest.approx(want[it], rel=LOSS_RTOL), (it, resumed, want)
    assert_same_weights(folder / "ckpt", runs["single"], tol=WEIGHT_TOL)


def test_cp2_resume_is_exact(tmp_path, small_corpus, runs):
    """From the step-2 checkpoint at CP=2 again: steps 3 and 4 give the uninterrupted run's losses exactly."""
    import shutil

    saved = tmp_path / "saved"
    shutil.copytree(runs["cp2"], saved)
    (saved / "latest").write_text("global_step2")
    for late in saved.glob("global_step4*"):
        shutil.rmtree(late)
    folder = tmp_path / "again"
    folder.mkdir()
    config = write_train_config(folder, small_corpus, train_iters=STEPS, optimizer=OPTIMIZER,
                                make_vocab_size_divisible_by=256, train_micro_batch_size_per_gpu=4,
                                context_parallel_size=2, load=str(saved))
    run_training(config, nproc=2)
    resumed, want = read_metrics(folder / "ckpt"), read_metrics(runs["cp2"])
    assert sorted(resumed) == [3, 4] and all(resumed[it] == want[it] for it in resumed), (resumed, want)
    assert_same_weights(folder / "ckpt", runs["cp2"], tol=0.0)


def test_cp2_tp2_zero2_recompute_equals_one_process(tmp_path, small_corpus, single):
    """Also ZeRO-2 and full activation recompute (the all-to-alls run again in the backward, the dropout masks are
    drawn again from the replayed generator): the same steps as one process at ZeRO-1 without recompute."""
    run = train(tmp_path / "cp2tp2", small_corpus, 4, context_parallel_size=2, model_parallel_size=2,
                zero_optimization={"stage": 2}, checkpoint_activations=True)
    assert checkpoint.tp_size_of(checkpoint.resolve(run)) == 2
    assert_same_metrics(run, single, ("lm_loss",), steps=STEPS)
    assert_same_weights(run, single, tol=WEIGHT_TOL)


def test_cp2_dp2_zero1_equals_one_process(tmp_path, small_corpus):
    """Dropout off in both: data-parallel ranks draw the same masks for their own samples (as in
    test_parallel_equivalence), so with dropout the runs would part for that reason alone (step 1: 6.6560 vs 6.6509)."""
    single = train(tmp_path / "single", small_corpus, 1, hidden_dropout=0.0)
    run = train(tmp_path / "cp2dp2", small_corpus, 4, context_parallel_size=2, train_micro_batch_size_per_gpu=2,
                hidden_dropout=0.0)
    assert checkpoint.dp_size_of(checkpoint.resolve(run)) == 4  # ZeRO-1 over data x context
    assert_same_metrics(run, single, ("lm_loss",), steps=STEPS)
    assert_same_weights(run, single, tol=WEIGHT_TOL)


def test_cp2_checkpoint_loads_for_generation_at_cp1(one_process, runs):
    """generate.py / eval.py's loader takes a CP=2 checkpoint at context_parallel_size 1 (the weights do not depend
    on CP): its logits are bit for bit those of a CP=1 model holding the checkpoint's merged weights, and the KV-cache
    decode of the last token gives the full forward's last logits (the same ops, in another order: 1e-5)."""
    import torch

    from neox_fork.inference.generation import load_for_inference
    from neox_fork.model.transformer import build_model

    model, config, _ = load_for_inference(runs["cp2"])
    assert config.context_parallel_size == 1
    weights, _, _ = checkpoint.load_merged(runs["cp2"])
    reference = build_model(config, perform_initialization=False)
    reference.load_state_dict(weights, strict=False)
    tokens = (torch.arange(40).reshape(1, 40) * 7) % 500
    with torch.no_grad():
        logits = model(tokens)
        assert torch.equal(logits, reference.eval()(tokens))
        cache = model.new_kv_cache()
        model(tokens[:, :-1], kv_cache=cache)
        last = model(tokens[:, -1:], kv_cache=cache)
    torch.testing.assert_close(last[0, -1], logits[0, -1], rtol=1e-5, atol=1e-5)
