"""Upstream's checkpoint, LR-schedule and data keys, each against what it says it changes.

One DeepSpeed engine is built in this process (the tiny test model, ZeRO-1, fp32) and trained one step; it saves
and resumes under each key. Compared with: the files on disk, the optimizer/RNG state the resume leaves, the LR
worked by hand from each schedule, megatron-core's own sample count, and upstream's weight formula by hand.
"""

import dataclasses
import math
import shutil

import pytest
import torch

from conftest import write_train_config
from neox_fork.checkpoint import store as checkpoint
from neox_fork.parallel import groups as parallel
from neox_fork.config.loading import load_config
from neox_fork.errors import UserError


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory, small_corpus):
    """(run, config, checkpoint folder saved at step 1 with validation logits) in this process."""
    from neox_fork.training import loop as training
    from neox_fork.training.state import save

    folder = tmp_path_factory.mktemp("neoxtrain_keys")
    c = load_config(write_train_config(folder, small_corpus, train_iters=4, hidden_dropout=0.0,
                                       checkpoint_validation_with_forward_pass=True))
    run = training.setup(c)
    params = [p for p in run.model.parameters() if p.requires_grad]
    training.train_step(run.engine, run.c, training.batches(run.train_data, run.c, 0), params)
    run.state.iteration, run.state.consumed_samples = 1, run.c.global_batch_size(1)
    save(run.engine, run.c, run.state)
    yield run, run.c, checkpoint.step_dir(c.save, 1)
    parallel.destroy()


def _resume(run, c, **keys):
    from neox_fork.training.state import TrainState, resume

    state = TrainState()
    resume(run.engine, run.model, dataclasses.replace(c, **keys), state)
    return state


def test_no_save_optim_and_no_save_rng_leave_them_off_disk(engine_run, tmp_path):
    from neox_fork.training.state import TrainState, save

    run, c, saved = engine_run
    assert list(saved.glob("*optim_states.pt")) and checkpoint.rng_files(saved)  # what a default save writes
    lean = dataclasses.replace(c, save=str(tmp_path / "lean"), no_save_optim=True, no_save_rng=True)
    save(run.engine, lean, TrainState(iteration=1))
    folder = checkpoint.step_dir(lean.save, 1)
    assert not list(folder.glob("*optim_states.pt")), "no_save_optim still wrote ZeRO optimizer shards"
    assert not checkpoint.rng_files(folder), "no_save_rng still wrote RNG states"
    assert (folder / checkpoint.MODEL_FILE.format(0)).is_file()
    with pytest.raises(UserError, match="saved with no_save_optim.*no_load_optim: true") as err:
        _resume(run, c, load=lean.save)
    assert "\n" not in str(err.value)
    assert _resume(run, c, load=lean.save, no_load_optim=True).iteration == 1  # weights and iteration still load


def test_no_load_optim_and_no_load_rng_skip_what_they_name(engine_run):
    run, c, saved = engine_run
    saved_rng = checkpoint.read_file(saved / checkpoint.RNG_FILE.format(0))["rng"][0]

    def moments():  # Adam's first moments, as ZeRO holds them (a load replaces the tensors)
        return [s["exp_avg"] for s in run.engine.optimizer.optimizer.state.values()]

    saved_norm = math.sqrt(sum(float(m.pow(2).sum()) for m in moments()))
    assert saved_norm > 0  # the one step trained before the save

    def poison():  # a state unlike the checkpoint's, to see whether the resume replaces it
        for m in moments():
            m.zero_()
        run.engine.lr_scheduler.last_epoch = 3
        torch.manual_seed(12345)
        return torch.get_rng_state()

    before = poison()
    assert _resume(run, c, load=str(saved.parent), no_load_optim=True, no_load_rng=True).iteration == 1
    assert all(float(m.abs().sum()) == 0 for m in moments()), "no_load_optim restored the Adam moments"
    assert run.engine.lr_scheduler.last_epoch == 3, "no_load_optim restored the LR schedule"
    assert torch.equal(torch.get_rng_state(), before), "no_load_rng restored the RNG state"
    poison()
    _resume(run, c, load=str(saved.parent))
    assert math.sqrt(sum(float(m.pow(2).sum()) for m in moments())) == pytest.approx(saved_norm, rel=1e-6)
    assert run.engine.lr_scheduler.last_epoch == 1
    assert torch.equal(torch.get_rng_state(), saved_rng)


def test_lr_schedule_on_resume_follows_config_or_checkpoint_as_told(engine_run):
    from neox_fork.training.optim import Schedule

    _, c, saved = engine_run
    state = checkpoint.read_file(saved / checkpoint.MODEL_FILE.format(0))["lr_scheduler"]
    assert state["last_epoch"] == 1
    changed = dataclasses.replace(c, optimizer={"type": "Adam", "params": {"lr": 1e-3}}, min_lr=1e-4)

    def lr_after_load(config):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
        Schedule(opt, config).load_state_dict(state)
        return opt.param_groups[0]["lr"]

    # c: cosine, lr 3e-3 -> min 3e-4 over 4 steps, warmup round(0.1 x 4) = 0; the update after step 1 is at 1/4
    by_checkpoint = 3e-4 + (3e-3 - 3e-4) * 0.5 * (1 + math.cos(math.pi / 4))
    by_config = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_after_load(c) == pytest.approx(by_checkpoint, rel=1e-12)
    assert lr_after_load(dataclasses.replace(changed, override_lr_scheduler=True)) == pytest.approx(by_config,
                                                                                                   rel=1e-12)
    assert lr_after_load(dataclasses.replace(changed, use_checkpoint_lr_scheduler=True)) == pytest.approx(
        by_checkpoint, rel=1e-12)
    with pytest.raises(UserError, match="checkpoint's LR schedule has lr 0.003, this config 0.001; set "
                                        "override_lr_scheduler"):
        lr_after_load(changed)


def test_checkpoint_validation_passes_on_a_good_save_and_stops_on_a_changed_one(engine_run, tmp_path, caplog):
    from neox_fork.training.state import VALIDATION_KEY

    run, c, saved = engine_run
    with caplog.at_level("INFO", logger="neox_fork"):
        _resume(run, c, load=str(saved.parent))
    assert f"validated {saved} with a forward pass" in caplog.text
    bad = tmp_path / "bad"
    shutil.copytree(saved.parent, bad)
    model_file = checkpoint.step_dir(bad, 1) / checkpoint.MODEL_FILE.format(0)
    states = checkpoint.read_file(model_file)
    states[VALIDATION_KEY][3, 5] += 0.01  # a reload that no longer gives the saved logits
    torch.save(states, model_file)
    with pytest.raises(UserError, match="gives other logits after loading than when it was saved") as err:
        _resume(run, c, load=str(bad))
    assert "\n" not in str(err.value)
    _resume(run, c, load=str(bad), checkpoint_validation_with_forward_pass=False)  # the key is what checks


def test_eod_mask_loss_leaves_end_of_document_inputs_out_of_the_loss(engine_run):
    from neox_fork.data.datasets import DataSettings, build_datasets

    run, c, _ = engine_run
    eod = run.tokenizer.eod
    on, _, _ = build_datasets(DataSettings.from_config(dataclasses.replace(c, eod_mask_loss=True), 1), run.tokenizer)
    off, _, _ = build_datasets(DataSettings.from_config(c, 1), run.tokenizer)
    index = next(i for i in range(len(on)) if (on[i]["tokens"] == eod).any())
    sample, plain = on[index], off[index]
    assert torch.equal(sample["loss_mask"], (sample["tokens"] != eod).float())
    assert plain["loss_mask"].min() == 1.0
    tokens, labels, mask = sample["tokens"][None], sample["labels"][None], sample["loss_mask"][None]
    model = run.engine.module
    model.eval()
    with torch.no_grad():
        loss = model(tokens, labels=labels, loss_mask=mask).item()
        per_token = torch.nn.functional.cross_entropy(model(tokens)[0].float(), labels[0], reduction="none")
    keep = [i for i in range(len(per_token)) if tokens[0, i] != eod]
    assert loss == pytest.approx(sum(per_token[i].item() for i in keep) / len(keep), rel=1e-5)
    assert loss != pytest.approx(per_token.mean().item(), rel=1e-5)
    model.train()


def test_weight_by_num_documents_uses_upstreams_formula(small_corpus, engine_run):
    from neox_fork.data.datasets import DataSettings, validate_data_paths, weights_by_num_docs
    from neox_fork.data.validate import inspect_indexed_dataset

    # counts 1 and 3, alpha 0.5: q = 1/4, 3/4; p ~ 0.5, 0.8660 -> 0.3660, 0.6340; w ~ p (1 - q) = 0.2745, 0.1585
    assert weights_by_num_docs([1, 3], 0.5) == pytest.approx([0.6339746, 0.3660254], abs=1e-7)
    assert weights_by_num_docs([7], 0.3) == [1.0]
    run, c, _ = engine_run
    paths = [str(small_corpus / "train_text_document"), str(small_corpus / "valid_text_document")]
    n = [len(inspect_indexed_dataset(p).sequence_lengths) for p in paths]
    q = [x / sum(n) for x in n]
    p = [x ** 0.3 / sum(y ** 0.3 for y in q) for x in q]
    w = [a * (1 - b) for a, b in zip(p, q)]
    keys = dict(train_data_paths=paths, train_data_weights=[1.0, 1.0], weighted_sampler_alpha=0.3)
    plan = validate_data_paths(DataSettings.from_config(dataclasses.replace(c, weight_by_num_documents=True,
                                                                            **keys), 1), run.tokenizer)
    assert plan.blends[0][1] == pytest.approx([x / sum(w) for x in w], rel=1e-12)
    plain = validate_data_paths(DataSettings.from_config(dataclasses.replace(c, **keys), 1), run.tokenizer)
    assert list(plain.blends[0][1]) == [1.0, 1.0]  # the weights as given


def test_train_epochs_sets_train_iters_from_one_pass_over_the_data(engine_run, small_corpus, tmp_path):
    from neox_fork.data.datasets import DataSettings, build_datasets, train_iters_for_epochs

    run, c, _ = engine_run
    one_epoch = dataclasses.replace(c, train_iters=1, valid_data_paths=[])
    dataset, _, _ = build_datasets(DataSettings.from_config(one_epoch, 1), run.tokenizer)
    samples = len(dataset)  # megatron-core's samples of one epoch (one batch asked fits in one epoch)
    epochs = dataclasses.replace(c, train_epochs=3)
    derived = train_iters_for_epochs(epochs, run.tokenizer, 1)
    assert derived.train_iters == 3 * samples // c.global_batch_size(1)
    assert derived.train_epochs is None
    config = write_train_config(tmp_path, small_corpus, train_epochs=2)
    with pytest.raises(UserError, match="give train_epochs or train_iters, not both"):
        load_config(config)
