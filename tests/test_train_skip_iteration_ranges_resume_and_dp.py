"""skip_train_iteration_ranges: the steps of a range read and train nothing, the step counter, data position and
LR schedule advance over them (docs/fault-handling.md), and a run resumed inside the range, or run on two
data-parallel ranks or two pipeline stages, skips exactly what one uninterrupted process skips.

Six steps with global batch 2 skipping [[3, 4]]: step 5 trains samples 8-9 (its place in the data order) on the
weights of step 2. That is checked against a forward pass of the step-2 checkpoint, computed here, on samples 8-9
(it must equal the logged step-5 loss) and on step 3's samples 4-5 (it must not). fp32 on CPU, dropout off:
the two computations are the same operations on the same numbers except for the thread count (the run uses one
OpenMP thread), which reorders sums over at most 64 x 96 terms: relative difference below 1e-5 (LOSS_RTOL of
test_parallel_equivalence.py, which states that bound); different text moves the loss by far more.
"""

import pytest
import torch
import yaml

from conftest import read_metrics, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint
from test_parallel_equivalence import LOSS_RTOL, OPTIMIZER

pytestmark = [pytest.mark.slow]

STEPS, SKIP = 6, [[3, 4]]
KEYS = dict(train_iters=STEPS, hidden_dropout=0.0, optimizer=OPTIMIZER, warmup=0.0, lr_decay_style="linear")


def train(tmp_path, corpus, name, nproc=1, **keys):
    folder = tmp_path / name
    folder.mkdir()
    config = write_train_config(folder, corpus, **{**KEYS, **keys})
    return config, run_training(config, nproc=nproc)


def client_state(ckpt, step):
    return torch.load(checkpoint.resolve(ckpt, step) / "mp_rank_00_model_states.pt", weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_corpus):
    tmp = tmp_path_factory.mktemp("skip")
    _, plain = train(tmp, small_corpus, "plain")
    _, skipped = train(tmp, small_corpus, "skipped", skip_train_iteration_ranges=SKIP, checkpoint_factor=1)
    return tmp, skipped


def test_skipped_steps_train_nothing_and_the_counter_lr_and_data_advance(runs, one_process):
    tmp, run = runs
    plain, ckpt = tmp / "plain" / "ckpt", tmp / "skipped" / "ckpt"
    losses, expected = read_metrics(ckpt), read_metrics(plain)
    assert sorted(losses) == [1, 2, 5, 6]
    assert read_metrics(ckpt, "batch_skipped") == {3: 1, 4: 1}
    assert [losses[1], losses[2]] == [expected[1], expected[2]]  # bit for bit before the range
    # the LR of each trained step is the one it has without the skip: the schedule advanced over 3 and 4
    assert read_metrics(ckpt, "lr") == {k: v for k, v in read_metrics(plain, "lr").items() if k in losses}
    lines = [line for line in run.stdout.splitlines() if "batches skipped" in line]
    assert len(lines) == 1 and "steps 3-4: batches skipped (skip_train_iteration_ranges [3, 4])" in lines[0]
    assert checkpoint.read_latest(ckpt) == STEPS
    # no update at 3 and 4: their weights are step 2's
    for step in (3, 4):
        assert_same_tensors(client_state(ckpt, step)["module"], client_state(ckpt, 2)["module"])
    # the checkpoints record what was skipped so far
    assert [client_state(ckpt, s)["skipped_iterations"] for s in (2, 3, 4, 6)] == [[], [[3, 3]], [[3, 4]], [[3, 4]]]
    assert client_state(ckpt, 6)["consumed_samples"] == STEPS * 2

    # step 5 trained samples 8-9 on step 2's weights; samples 4-5 (step 3's) never reached the model
    at_step5, at_step3 = (step2_loss_on(ckpt, samples) for samples in ([8, 9], [4, 5]))
    assert abs(losses[5] - at_step5) <= LOSS_RTOL * losses[5], (losses[5], at_step5)
    assert abs(losses[5] - at_step3) > 1e-3, (losses[5], at_step3)


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def step2_loss_on(ckpt, samples):
    """The loss of the step-2 checkpoint's model on these training samples (of the run's data order)."""
    from neox_fork.data.datasets import DataSettings, build_datasets, collate_samples
    from neox_fork.data.tokenizer import TokenizerSource
    from neox_fork.model.transformer import build_model
    from neox_fork.training.state import load_weights_only

    folder = checkpoint.resolve(ckpt, 2)
    c = checkpoint.load_config_of(folder)
    tokenizer = TokenizerSource.of_config(c).build()
    model = build_model(c, tokenizer.vocab_size)
    load_weights_only(model, folder)
    model.eval()
    train_data, _, _ = build_datasets(DataSettings.from_config(c, 1), tokenizer)
    batch = collate_samples([train_data[i] for i in samples])
    with torch.no_grad():
        return model(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"]).item()


def test_resume_inside_the_range_equals_the_uninterrupted_run(runs, small_corpus):
    tmp, _ = runs
    config, _ = train(tmp, small_corpus, "resumed", skip_train_iteration_ranges=SKIP, exit_interval=3)
    ckpt = tmp / "resumed" / "ckpt"
    assert checkpoint.read_latest(ckpt) == 3  # stopped on a skipped step
    keys = yaml.safe_load(config.read_text())
    keys.update(exit_interval=None, load=keys["save"])
    config.write_text(yaml.safe_dump(keys))
    run = run_training(config)
    assert "at iteration 3" in run.stdout and "steps 4-4: batches skipped" in run.stdout
    uninterrupted = tmp / "skipped" / "ckpt"
    for key in ("lm_loss", "lr", "batch_skipped"):
        assert read_metrics(ckpt, key) == read_metrics(uninterrupted, key), key
    assert client_state(ckpt, STEPS)["skipped_iterations"] == [[3, 4]]


@pytest.mark.multiproc
@pytest.mark.parametrize("name, keys", [
    ("dp2", dict(train_micro_batch_size_per_gpu=1)),
    ("pp2", dict(pipe_parallel_size=2, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=2)),
])
def test_two_ranks_skip_what_one_process_skips(runs, small_corpus, name, keys):
    """The same global batch of 2 as two data-parallel ranks, or two pipeline stages with two micro-batches."""
    tmp, _ = runs
    train(tmp, small_corpus, name, nproc=2, skip_train_iteration_ranges=SKIP, **keys)
    one, two = read_metrics(tmp / "skipped" / "ckpt"), read_metrics(tmp / name / "ckpt")
    assert sorted(two) == sorted(one) == [1, 2, 5, 6]
    for step in one:  # the same global batches summed in another order (bound: test_parallel_equivalence.py)
        assert abs(one[step] - two[step]) <= LOSS_RTOL * one[step], (step, one[step], two[step])
    assert read_metrics(tmp / name / "ckpt", "batch_skipped") == {3: 1, 4: 1}
    assert client_state(tmp / name / "ckpt", STEPS)["skipped_iterations"] == [[3, 4]]
