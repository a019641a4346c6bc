"""Reward-model and KTO training through train.py at TP=2 and at DP=2 compute what one process computes: the
same objective, metrics and gradient norm (clipped: KTO at 1, RM at 0.1; above the clip at some step) every
step and the same weights after (the reward head rm_linear included, the same on every TP rank that holds it).
Each DP=2 run stops at step STOP and resumes from its own checkpoint (KTO's frozen reference included) to the
end, so resume is proven for both objectives too.

* RM (`train_impl: rm`, the shipped pairs): TP=2 with sequence parallelism (micro-batch 4) and DP=2 with
  ZeRO stage 2 (micro-batch 2 per rank) against one process with micro-batch 4. Its loss is a mean over the
  pairs, so any split of the global batch into ranks gives the same number.
* KTO (`train_impl: kto`, 16 unpaired conversations with +1/-1 rewards, desirable weight 3, undesirable 1):
  the first run of KTO through train.py. Its KL estimate is a property of the micro-batch (upstream's: one
  half's mean clamped log-ratio, used for the other half; ranks do not pool it), so a run equals one process
  that runs the same micro-batches: one process takes the global batch of 8 as 2 accumulated micro-batches
  of 4; TP=2 (with sequence parallelism) does the same; DP=2 (ZeRO-1) gives each rank one of them.

Tolerances and their bounds: tests/test_parallel_equivalence.py (sums change their order of addition only;
its weight bound is 1e-3 of one step's lr per step, here over STEPS steps). Its loss bound (relative 1e-5) is
for a mean of log-likelihoods, which barely moves with the weights. A reward is a raw readout, r = w . x over
the HIDDEN inputs of rm_linear (final-norm outputs, of order 1): after k updates each w_i may differ by
k x 1e-3 x lr, so r (and the RM loss, 1-Lipschitz in the margin, and its gradient norm) may differ by
HIDDEN x k x 1e-3 x lr more (3.8e-4 at step 3; a fresh machine measured 2.1e-5 there). A missing all-reduce
moves weights by a good part of lr a step and a reward by ~1e-1."""

import pytest
import torch
import yaml

from conftest import read_metrics, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint
from test_parallel_equivalence import LR, OPTIMIZER, assert_same_metrics, assert_same_weights
from test_preference_kto_reads_rewards_and_starts_at_its_value import write_kto_data

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]
STEPS, STOP = 5, 3
WEIGHT_TOL = 1e-3 * LR * STEPS
HIDDEN = 64  # conftest.tiny_keys' hidden_size: the reward head's inputs
RM_DRIFT_PER_STEP = HIDDEN * 1e-3 * LR  # see the docstring
RM_CLIP = 0.1  # the reward model's gradient norms run 0.2-1.3 on these pairs: clip below them, so clipping acts
RM_METRICS = ("lm_loss", "grad_norm", "pos_values", "neg_values", "margin")
KTO_METRICS = ("lm_loss", "grad_norm", "kl", "policy_logp", "ref_logp", "pos_policy_logp", "neg_policy_logp",
               "policy_rewards")


def _train(folder, corpus, start, nproc, **keys):
    tp = keys.get("model_parallel_size", 1)
    folder.mkdir()
    config = write_train_config(folder, corpus, load=str(start), finetune=True, train_iters=STEPS,
                                checkpoint_factor=None, optimizer=OPTIMIZER, warmup=0.0, hidden_dropout=0.0,
                                attention_dropout=0.0, seq_length=96, valid_data_paths=[],
                                make_vocab_size_divisible_by=128 // tp, **keys)
    run_training(config, nproc=nproc)
    return folder / "ckpt"


def _resume(ckpt, nproc):
    """Continue the run that saved `ckpt` and stopped at STOP (exit_interval) to STEPS, from that checkpoint."""
    config = ckpt.parent / "config.yml"
    keys = yaml.safe_load(config.read_text())
    keys.update(load=str(ckpt), finetune=False, exit_interval=None)
    config.write_text(yaml.safe_dump(keys))
    out = run_training(config, nproc=nproc).stdout
    assert "resumed from" in out and f"at iteration {STOP}" in out, out[-2000:]


def _same(a, b, names, drift_per_step=0.0, clip=1.0):
    """Metrics every step within the loss bound (plus `drift_per_step` for each update before it) and weights
    within the weight bound."""
    assert max(read_metrics(b, "grad_norm").values()) > clip  # clipping is at work in the compared steps
    assert_same_metrics(a, b, names, STEPS, drift_per_step)
    assert_same_weights(a, b, WEIGHT_TOL)


def _replicas_agree(ckpt, name):
    """Every TP rank's copy of a replicated tensor is the same (the merge reads rank 0's only)."""
    folder = checkpoint.resolve(ckpt)
    copies = [checkpoint.load_rank_shard(folder, 2, r)[name] for r in range(2)]
    torch.testing.assert_close(copies[1], copies[0], rtol=0, atol=0, msg=name)


def test_reward_model_tp2_with_sequence_parallel_and_dp2_zero2_equal_one_process(
        tmp_path, small_corpus, preference_pairs, trained_checkpoint):
    p = str(preference_pairs / "pairs")
    keys = dict(train_impl="rm", dataset_impl="pairwise", train_data_paths=[],
                pos_train_data_paths=[p + "_chosen_document"], neg_train_data_paths=[p + "_rejected_document"],
                pos_train_label_data_paths=[p + "_chosen_label_document"],
                neg_train_label_data_paths=[p + "_rejected_label_document"], z_loss=0.01,
                gradient_clipping=RM_CLIP)
    one = _train(tmp_path / "one", small_corpus, trained_checkpoint, 1, train_micro_batch_size_per_gpu=4, **keys)
    tp2 = _train(tmp_path / "tp2", small_corpus, trained_checkpoint, 2, train_micro_batch_size_per_gpu=4,
                 model_parallel_size=2, sequence_parallel=True, **keys)
    dp2 = _train(tmp_path / "dp2", small_corpus, trained_checkpoint, 2, train_micro_batch_size_per_gpu=2,
                 zero_optimization={"stage": 2}, exit_interval=STOP, **keys)
    _resume(dp2, 2)
    assert "rm_linear.weight" in checkpoint.load_merged(one)[0]
    assert checkpoint.tp_size_of(checkpoint.resolve(tp2)) == 2
    _replicas_agree(tp2, "rm_linear.weight")
    _same(tp2, one, RM_METRICS, RM_DRIFT_PER_STEP, RM_CLIP)
    _same(dp2, one, RM_METRICS, RM_DRIFT_PER_STEP, RM_CLIP)


def test_kto_tp2_with_sequence_parallel_and_dp2_equal_one_process(tmp_path, small_corpus, trained_checkpoint):
    data = tmp_path / "data"
    data.mkdir()
    records = write_kto_data(data, small_corpus)
    assert {r["good"] for r in records} == {True, False}
    p = str(data / "kto_messages")
    keys = dict(train_impl="kto", pack_impl="unpacked", train_data_paths=[p + "_document"],
                train_label_data_paths=[p + "_label_document"], train_reward_data_paths=[p + "_reward_document"],
                kto_desirable_weight=3.0, kto_undesirable_weight=1.0, train_micro_batch_size_per_gpu=4)
    one = _train(tmp_path / "one", small_corpus, trained_checkpoint, 1, gradient_accumulation_steps=2, **keys)
    tp2 = _train(tmp_path / "tp2", small_corpus, trained_checkpoint, 2, gradient_accumulation_steps=2,
                 model_parallel_size=2, sequence_parallel=True, **keys)
    dp2 = _train(tmp_path / "dp2", small_corpus, trained_checkpoint, 2, exit_interval=STOP, **keys)
    _resume(dp2, 2)
    assert read_metrics(one, "kl")[1] == 0.0 and read_metrics(one, "kl")[STEPS] != 0.0  # the policy moved
    # the KL estimate (clamped at 0) is at work: a desirable example's log-ratio is above 0 at some step
    pos, ref = read_metrics(one, "pos_policy_logp"), read_metrics(one, "pos_ref_logp")
    assert any(pos[i] > ref[i] for i in pos), (pos, ref)
    assert checkpoint.tp_size_of(checkpoint.resolve(tp2)) == 2
    assert checkpoint.tp_size_of(checkpoint.resolve(tp2) / "reference") == 2
    _same(tp2, one, KTO_METRICS)
    _same(dp2, one, KTO_METRICS)
