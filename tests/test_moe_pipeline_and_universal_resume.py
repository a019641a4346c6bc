"""An MoE model (2 layers, both MoE: 4 experts, top 2, load-balancing loss 0.1) trains at pipe_parallel_size 2
(one MoE layer a stage) like one process, also with experts split over 2 expert-parallel ranks (pipe 2 x EP 2) or
2 tensor-parallel ranks (pipe 2 x TP 2); its checkpoint resumes exactly at pipe 2 and at pipe 2 x EP 2, and through
DeepSpeed's universal checkpoint at data parallel 2 (ZeRO-1 cutting the experts anew) like the uninterrupted run;
universal checkpoints go both ways between pipe 2 x EP 2 and one process.

Runs (train.py on local ranks joined by gloo, fp32, no dropout, test_parallel_equivalence's Adam with eps 1e-5):

    one   1 process, micro-batch 2 x 2 accumulated, steps 1-4: the reference
    pp2   pipe 2, micro-batch 2 x 2 in flight, full activation recompute, steps 1-4, saving step 2 too
    same  pp2's step 2 -> the same, steps 3-4                    (exact resume: equal to pp2 bit for bit)
    dp2   pp2's step 2 -> universal -> data parallel 2, micro-batch 2, steps 3-4   (like `one`)
    one_tied  as one, with tied embeddings, saving step 2 too
    pp2ep2  pipe 2 x EP 2 (4 ranks, data parallel 2, DeepSpeed's data-parallel group the expert-data one of 1 rank),
          tied embeddings, micro-batch 2, no accumulation, full recompute, saving step 2  (like one_tied; resumed)
    from_pp2ep2  pp2ep2's step 2 -> universal -> 1 process, as one_tied, steps 3-4                  (like one_tied)
    into_pp2ep2  one_tied's step 2 -> universal -> pipe 2 x EP 2, as pp2ep2, steps 3-4           (like one_tied)
    pp2tp2  pipe 2 x TP 2 (4 ranks), as pp2                                               (like `one`)

Each micro-batch has its own load-balancing loss in every run (the same 2 samples: data parallelism deals a global
batch out in order, as the accumulating process takes it), scaled by 1 / accumulation steps (1 / 2 in `one` and
pp2, 1 in dp2 whose two ranks' gradients are averaged). What moves: the loss (lm_loss, from the last stage), the
balancing loss summed over both stages' layers (moe_lbl) and the tokens per expert of each layer, gathered from
both stages to the logging rank. Bounds are test_parallel_equivalence's (same operations, sums in another order):
losses and moe_lbl within 1e-5 relative; weights within 1e-3 of a step's lr per step. Tokens per expert are
counts of routing choices: equal (they were here; a choice flips only where a token's k-th and (k+1)-th expert
scores lie within the rounding that separates the runs' weights).

Broken on purpose (once each): the pipeline path without set_aux_loss_scale (the balancing loss's gradient scaled
1 instead of 1/2) moves pp2's step-2 loss by 1.0e-4 relative (1e-5 allowed) and weights by up to 1e-2 (1.2e-5
allowed); gathering the metrics without the all-reduce over the stages leaves the logging rank stage 0's half of
moe_lbl (1.0016 against 2.0027 at step 1) and no tokens for layer 1. At pipe 2 x EP 2: DeepSpeed's pipeline grid
with its own data-parallel group (model axis TP, not TP x EP) stops at start (its batch arithmetic and the group
check in build_pipeline); without the validation loss's average over the EP group the logged eval_lm_loss is EP
rank 0's half (6.4828 against 6.5042); with reduce_expert_parallel_grads clearing the pipeline's mark on the last
stage's copy of the tied embedding, EP rank 0 counts it twice: gradient norm 1.1283 against 0.8349 at step 1.
Universal checkpoints of pipe 2 x EP 2, either way: the two tests that say so in their docstrings.
"""

import shutil

import pytest
import torch

from conftest import read_metrics, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint
from neox_fork.checkpoint import universal
from test_parallel_equivalence import LOSS_RTOL, LR, OPTIMIZER

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

STEPS, STOP = 4, 2
MOE = dict(moe_num_experts=4, moe_top_k=2, moe_router_type="topk", moe_aux_loss_coeff=0.1, hidden_dropout=0.0,
           train_iters=STEPS, optimizer=OPTIMIZER, make_vocab_size_divisible_by=256,
           train_micro_batch_size_per_gpu=2)
# activation recompute as well: the MoE layers run twice per micro-batch, the metrics and balancing loss count once
PP2 = dict(pipe_parallel_size=2, gradient_accumulation_steps=2, checkpoint_activations=True)
# tied embeddings: the last stage's copy counted once in the gradient norm on every EP rank
PP2EP2 = dict(pipe_parallel_size=2, expert_model_parallel_size=2, gradient_accumulation_steps=1,
              checkpoint_activations=True, eval_interval=STEPS, eval_iters=1, extra_save_iters=[STOP],
              no_weight_tying=False)
ONE_TIED = dict(gradient_accumulation_steps=2, no_weight_tying=False)
TOKEN_KEYS = [f"moe_tokens/layer{i}/expert{e}" for i in (0, 1) for e in range(4)]
WEIGHT_TOL = 1e-3 * LR * STEPS


def _train(folder, corpus, nproc, **keys):
    folder.mkdir()
    run_training(write_train_config(folder, corpus, **keys, **MOE), nproc=nproc)
    return folder / "ckpt"


@pytest.fixture(scope="module")
def one(tmp_path_factory, small_corpus):
    return _train(tmp_path_factory.mktemp("moe_one") / "one", small_corpus, 1, gradient_accumulation_steps=2,
                  eval_interval=STEPS, eval_iters=2)


@pytest.fixture(scope="module")
def pp2(tmp_path_factory, small_corpus):
    return _train(tmp_path_factory.mktemp("moe_pp2") / "pp2", small_corpus, 2, extra_save_iters=[STOP], **PP2)


@pytest.fixture(scope="module")
def one_tied(tmp_path_factory, small_corpus):
    return _train(tmp_path_factory.mktemp("moe_one_tied") / "one", small_corpus, 1, extra_save_iters=[STOP],
                  **ONE_TIED, eval_interval=STEPS, eval_iters=2)


@pytest.fixture(scope="module")
def pp2ep2(tmp_path_factory, small_corpus):
    return _train(tmp_path_factory.mktemp("moe_pp2ep2") / "pp2ep2", small_corpus, 4, **PP2EP2)


def _resume(tmp_path, corpus, source, nproc, universal_first=False, **keys):
    """`source`'s step STOP, alone in a new folder (converted first if asked), continued to STEPS with `keys`."""
    ckpt = tmp_path / "run" / "ckpt"
    shutil.copytree(checkpoint.step_dir(source, STOP), checkpoint.step_dir(ckpt, STOP))
    checkpoint.write_atomic(ckpt / checkpoint.LATEST_FILE, checkpoint.step_name(STOP))
    if universal_first:
        universal.convert(ckpt, workers=1)
    run = run_training(write_train_config(tmp_path / "run", corpus, load=str(ckpt), load_universal=universal_first,
                                          **keys, **MOE), nproc=nproc)
    (tmp_path / "run" / "stdout.txt").write_text(run.stdout)  # what the resumed run printed
    return ckpt


def _rows(ckpt, keys, steps):
    out = {}
    for key in keys:
        got = read_metrics(ckpt, key)
        assert sorted(got) == steps, (key, sorted(got))
        out[key] = got
    return out


def _assert_like(got_ckpt, want_ckpt, keys, steps, data_parallel=1, exact=False):
    """The run saved in `got_ckpt` at `steps` against the one in `want_ckpt` (every step logged): `keys` within
    LOSS_RTOL relative (equal when `exact`); tokens per expert equal, each of `data_parallel` ranks counting its
    share (averaged); final weights within WEIGHT_TOL (equal when `exact`), under the same names. Returns (the
    rows of `got_ckpt`, its merged weights)."""
    got = _rows(got_ckpt, [*keys, *TOKEN_KEYS], steps)
    want = _rows(want_ckpt, [*keys, *TOKEN_KEYS], list(range(1, STEPS + 1)))
    for it in steps:
        for key in keys:
            if exact:
                assert got[key][it] == want[key][it], (key, it)
            else:
                assert abs(got[key][it] - want[key][it]) <= LOSS_RTOL * max(abs(want[key][it]), 1.0), (key, it)
        assert [data_parallel * got[k][it] for k in TOKEN_KEYS] == [want[k][it] for k in TOKEN_KEYS], it
    wa, _, _ = checkpoint.load_merged(got_ckpt)
    wb, _, _ = checkpoint.load_merged(want_ckpt)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0 if exact else WEIGHT_TOL, msg=name)
    return got, wa


def test_pp2_trains_like_one_process_with_the_balancing_loss_and_expert_load_of_both_stages(one, pp2):
    steps = list(range(1, STEPS + 1))
    got, weights = _assert_like(pp2, one, ["lm_loss", "moe_lbl"], steps)
    for it in steps:
        for layer in (0, 1):  # dropless: 2 micro-batches x 2 x 64 tokens x top 2 per layer
            assert sum(got[f"moe_tokens/layer{layer}/expert{e}"][it] for e in range(4)) == 2 * 2 * 64 * 2
    # each stage holds one MoE layer (the partition of test_pipeline_parallel_trains_like_one_process)
    folder = checkpoint.resolve(pp2)
    assert sorted(p.name for p in folder.glob("layer_0[23]-*")) == ["layer_02-model_00-model_states.pt",
                                                                    "layer_03-model_00-model_states.pt"]
    assert any(".mlp.moe.experts.local_experts.3." in n for n in weights)
    assert any(n.endswith(".mlp.moe.router.weight") for n in weights)


def test_pp2_resumes_exactly_at_pp2(tmp_path, small_corpus, pp2):
    same = _resume(tmp_path, small_corpus, pp2, 2, **PP2)
    _assert_like(same, pp2, ["lm_loss", "moe_lbl"], [3, 4], exact=True)


def test_pp2_resumes_at_dp2_through_the_universal_checkpoint_like_one_process(tmp_path, small_corpus, one, pp2):
    """The converted experts and router (fp32 masters and Adam moments under their own names) come back at another
    layout: steps 3-4 at data parallel 2 are the reference's."""
    dp2 = _resume(tmp_path, small_corpus, pp2, 2, universal_first=True)
    zero = checkpoint.universal_dir(dp2, STOP) / "zero"
    assert (zero / "layers.1.mlp.moe.experts.local_experts.3.linear_fc2.weight" / "exp_avg.pt").is_file()
    assert (zero / "layers.0.mlp.moe.router.weight" / "fp32.pt").is_file()
    # tokens per expert: each data-parallel rank's count of its micro-batch, averaged over the 2 ranks
    _assert_like(dp2, one, ["lm_loss", "moe_lbl"], [3, 4], data_parallel=2)


def test_pp2_ep2_trains_like_one_process(one_tied, pp2ep2):
    """Pipe 2 x expert parallel 2 (4 ranks; each stage's 2 ranks hold 2 of a layer's 4 experts, DeepSpeed's
    data-parallel group the expert-data-parallel one of 1 rank): micro-batch 2 on each of the 2 data-parallel
    ranks is `one_tied`'s 2 accumulated micro-batches (as dp2 above), embeddings tied (the first and last stage hold
    a copy). Layer files hold every expert (global index)."""
    _assert_like(pp2ep2, one_tied, ["lm_loss", "moe_lbl", "grad_norm"], list(range(1, STEPS + 1)), data_parallel=2)
    # validation after step 4: each data-parallel rank's one micro-batch of 2 is one of `one`'s 2, averaged over both
    ea, eb = read_metrics(pp2ep2, "eval_lm_loss"), read_metrics(one_tied, "eval_lm_loss")
    assert sorted(ea) == sorted(eb) == [STEPS]
    assert abs(ea[STEPS] - eb[STEPS]) <= LOSS_RTOL * max(abs(eb[STEPS]), 1.0), (ea, eb)
    folder = checkpoint.resolve(pp2ep2)
    assert sorted(p.name for p in folder.glob("layer_0[23]-*")) == ["layer_02-model_00-model_states.pt",
                                                                    "layer_03-model_00-model_states.pt"]


def test_pp2_ep2_resumes_exactly(tmp_path, small_corpus, pp2ep2):
    """Each stage's layer files (every expert) give each EP rank its own experts back; DeepSpeed's optimizer state
    is per (stage, TP x EP) rank: steps 3-4 equal the uninterrupted run bit for bit."""
    same = _resume(tmp_path, small_corpus, pp2ep2, 4, **PP2EP2)
    _assert_like(same, pp2ep2, ["lm_loss", "moe_lbl", "grad_norm"], [3, 4], exact=True)


def _assert_steps_3_4_are_one_tieds(resumed, one_tied, data_parallel: int):
    """Steps 3-4 of `resumed` against the uninterrupted `one_tied`, with test_pp2_ep2_trains_like_one_process's
    bounds; tokens per expert are each of `data_parallel` ranks' count of its share of one_tied's 2 micro-batches,
    averaged."""
    _assert_like(resumed, one_tied, ["lm_loss", "moe_lbl", "grad_norm"], [3, 4], data_parallel)


def test_pp2_ep2_converts_to_the_universal_checkpoint_of_one_process(tmp_path, small_corpus, one_tied, pp2ep2):
    """to_universal on pipe 2 x EP 2's step 2: each EP rank's files of both stages (mp_rank TP rank + TP x (EP rank
    + EP x stage)) converted alone, its experts renamed to global indices. The folder holds what one process holds
    at step 2 (every expert of both layers, the tied embedding once), and one process resumes from it like the
    uninterrupted one_tied for steps 3-4.

    Broken on purpose: EP rank 1's experts on stage 1 given the wrong global index (local 0 and 1 renamed 3 and 2,
    not 2 and 3, in universal._merge_expert_parallel_rank) leaves layer 1's experts 2 and 3 0.125 from one process's
    (6e-6 allowed); the resumed run's gradient norm at step 3 is 1.1904 against 1.1927."""
    resumed = _resume(tmp_path, small_corpus, pp2ep2, 1, universal_first=True, **ONE_TIED)
    assert "(saved at PP=2 x EP=2 x TP=1 x DP=2) at TP=1 x DP=1, iteration 2" in \
        (tmp_path / "run" / "stdout.txt").read_text()
    zero = checkpoint.universal_dir(resumed, STOP) / "zero"
    want, _, _ = checkpoint.load_merged(one_tied, STOP)
    assert sorted(p.name for p in zero.iterdir() if p.is_dir()) == sorted(want)
    for name, tensor in want.items():  # Adam's moments: checked by the resumed steps
        got = checkpoint.read_file(zero / name / "fp32.pt")["param"]
        torch.testing.assert_close(got, tensor.float(), rtol=0, atol=1e-3 * LR * STOP, msg=name)
    _assert_steps_3_4_are_one_tieds(resumed, one_tied, data_parallel=1)


def test_a_universal_checkpoint_resumes_at_pp2_ep2(tmp_path, small_corpus, one_tied):
    """load_universal into pipe 2 x EP 2 from one process's universal checkpoint (all 4 experts of a layer on one
    rank): each stage's EP rank reads its 2 experts of its layer by their global names, both stages the tied
    embedding; steps 3-4 are one_tied's (micro-batch 2 on each of 2 data-parallel ranks, as pp2ep2).

    Broken on purpose: reading by the local names (resume_universal without global_expert_names: each stage's EP
    rank 1 reads experts 0 and 1) gives the step-3 loss 6.57406 against 6.57351 (6.6e-5 allowed)."""
    resumed = _resume(tmp_path, small_corpus, one_tied, 4, universal_first=True, **PP2EP2)
    assert "(saved at TP=1 x DP=1) at PP=2 x EP=2 x TP=1 x DP=2, iteration 2" in \
        (tmp_path / "run" / "stdout.txt").read_text()
    _assert_steps_3_4_are_one_tieds(resumed, one_tied, data_parallel=2)


@pytest.fixture(scope="module")
def pp2tp2(tmp_path_factory, small_corpus):
    folder = tmp_path_factory.mktemp("moe_pp2tp2") / "pp2tp2"
    folder.mkdir()
    keys = {**MOE, "make_vocab_size_divisible_by": 128}  # the same padded vocabulary over 2 TP ranks
    run_training(write_train_config(folder, small_corpus, model_parallel_size=2, eval_interval=STEPS, eval_iters=2,
                                    **PP2, **keys), nproc=4)
    return folder / "ckpt"


def test_pp2_tp2_trains_like_one_process(one, pp2tp2):
    """Pipe 2 x tensor parallel 2 (4 ranks; each expert split over the TP group as the dense MLP): pp2's micro-batches
    and accumulation, so every number is `one`'s (tokens per expert counted whole, validation on the same 2)."""
    _assert_like(pp2tp2, one, ["lm_loss", "moe_lbl", "grad_norm"], list(range(1, STEPS + 1)))
    ea, eb = read_metrics(pp2tp2, "eval_lm_loss"), read_metrics(one, "eval_lm_loss")
    assert abs(ea[STEPS] - eb[STEPS]) <= LOSS_RTOL * max(abs(eb[STEPS]), 1.0), (ea, eb)
