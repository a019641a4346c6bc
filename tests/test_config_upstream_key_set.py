"""Every key upstream gpt-neox's NeoXArgs defines is known here: a NeoXConfig field, or a row of
neox_fork/config/upstream.py saying what it is (no effect and logged, refused unless at upstream's default,
derived and checked against the run, or passed through to DeepSpeed)."""

import json
import logging

import pytest

from conftest import REPO
from neox_fork.config import upstream as up
from neox_fork.config.neox_config import NeoXConfig
from neox_fork.config.loading import from_dict, ignored_settings, load_config, log_ignored_settings
from neox_fork.errors import UserError

UPSTREAM_KEYS = REPO / "tests" / "upstream_neox_keys.txt"
FIELDS = {name for name, f in NeoXConfig.__dataclass_fields__.items() if "doc" in f.metadata}


def upstream_names() -> list[str]:
    lines = UPSTREAM_KEYS.read_text().splitlines()
    assert "commit ea7aefd8" in lines[0]
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_every_upstream_key_is_a_field_or_a_row_of_the_table():
    names = upstream_names()
    assert len(names) == len(set(names)) == 318  # the count over upstream's NeoXArgs dataclasses
    unknown = [k for k in names if k not in FIELDS and k not in up.KEYS]
    assert not unknown, f"upstream keys neither implemented nor listed in neox_fork/config/upstream.py: {unknown}"
    assert set(up.KEYS) <= set(names), "a table row that is no upstream key"


def test_no_key_is_both_a_field_and_a_row_of_the_table():
    assert not FIELDS & set(up.KEYS), "implemented now: delete its row from neox_fork/config/upstream.py"
    kinds = {up.NO_EFFECT, up.REFUSED, up.DERIVED, up.DEEPSPEED, up.ALIAS}
    assert all(row[0] in kinds and row[3] for row in up.KEYS.values())


def other_value(key):
    """A value that is not upstream's default, of the key's type."""
    _, default, kind, _ = up.KEYS[key]
    if kind is bool:
        return not default
    if kind in (int, float):
        return kind((default or 0) + 3)
    return {str: "something-else", list: ["x"], dict: {"enabled": True}, object: "something-else"}[kind]


@pytest.mark.parametrize("key", up.keys_of(up.NO_EFFECT))
def test_each_no_effect_key_loads_and_is_named_in_the_start_line(key, caplog):
    value = other_value(key)
    c = from_dict({key: value})
    assert ignored_settings(c) == {key: value}
    with caplog.at_level(logging.WARNING):
        log_ignored_settings(c)
        log_ignored_settings(from_dict({key: up.KEYS[key][1]}))  # at the default: nothing to say
    assert len(caplog.records) == 1 and f"{key}={value!r}" in caplog.text


@pytest.mark.parametrize("key", up.keys_of(up.REFUSED))
def test_each_refused_key_is_one_line_unless_at_upstreams_default(key):
    from_dict({key: up.KEYS[key][1]})
    with pytest.raises(UserError) as err:
        from_dict({key: other_value(key)})
    message = str(err.value)
    assert "\n" not in message and f"{key} " in message and "not" in message


def test_post_training_keys_load_and_reinforce_is_refused():
    keys = {"pack_impl": "packed", "train_data_paths": ["a"], "train_label_data_paths": ["a_label"],
            "dpo_beta": 0.2, "z_loss": 0.0, "allow_chopped": True, "precompute_model_name": "ref",
            "pos_train_data_paths": ["p"]}
    c = from_dict(keys)
    assert c.dpo_beta == 0.2 and c.precompute_model_name == "ref" and c.pos_train_data_paths == ["p"]
    # masked fine-tuning's and preference training's keys are fields now: none is ignored
    assert set(ignored_settings(c)) == set()
    dpo = from_dict({**keys, "train_impl": "dpo", "dataset_impl": "pairwise", "neg_train_data_paths": ["n"]})
    assert (dpo.train_impl, dpo.dataset_impl) == ("dpo", "pairwise")
    with pytest.raises(UserError, match="train_impl 'reinforce' is not supported: .* not built"):
        from_dict({**keys, "train_impl": "reinforce"})


def test_derived_keys_agreeing_with_the_run_load_and_contradicting_ones_are_one_line(tmp_path):
    # hand-worked: micro 4 -> batch_size 4; clip 0.5; pipe 1 -> is_pipe_parallel; vocab 1000 padded to 128 x 2
    # -> 1024; ZeRO stage 1 with a 2e8 bucket; 2 ranks
    load = tmp_path / "neoxkeys_ckpt"
    load.mkdir()
    (load / "latest").write_text("global_step30")
    (load / "global_step30").mkdir()
    agree = {"train_micro_batch_size_per_gpu": 4, "batch_size": 4, "gradient_clipping": 0.5, "clip_grad": 0.5,
             "pipe_parallel_size": 1, "is_pipe_parallel": True, "vocab_size": 1000, "model_parallel_size": 2,
             "padded_vocab_size": 1024, "zero_optimization": {"stage": 1, "reduce_bucket_size": 200000000},
             "zero_stage": 1, "zero_reduce_bucket_size": 200000000, "zero_allgather_bucket_size": 500000000,
             "zero_reduce_scatter": True, "zero_contiguous_gradients": False, "optimizer_type": "Adam",
             "deepspeed": True, "dynamic_loss_scale": True, "world_size": 2, "global_num_gpus": 2,
             "load": str(load), "iteration": 30}
    c = from_dict(agree)
    c.check_world_size(2)
    assert ignored_settings(c) == {}
    contradictions = {"batch_size": 8, "clip_grad": 1.0, "is_pipe_parallel": False, "padded_vocab_size": 1000,
                      "zero_stage": 2, "zero_reduce_bucket_size": 500000000, "optimizer_type": "sgd",
                      "deepspeed": False, "dynamic_loss_scale": False, "iteration": 0}
    for key, wrong in contradictions.items():
        with pytest.raises(UserError, match=f"{key} {wrong!r} contradicts this run") as err:
            from_dict({**agree, key: wrong})
        assert "\n" not in str(err.value)
    for key, wrong in {"world_size": 4, "global_num_gpus": 1, "rank": 0, "local_rank": 1}.items():
        c = from_dict({**agree, key: wrong})  # the world size is known at launch, not before
        with pytest.raises(UserError, match=f"{key} {wrong!r} contradicts this run"):
            c.check_world_size(2)
    from_dict({"rank": 0, "local_rank": 0}).check_world_size(1)  # one process: rank 0 agrees


def test_upstream_style_setup_file_loads_with_one_line_for_what_has_no_effect(tmp_path, caplog):
    """A local_setup.yml as upstream's quick start writes it, plus keys from upstream's model configs."""
    setup = tmp_path / "local_setup.yml"
    setup.write_text(json.dumps({
        "data_path": "data/enwik8/enwik8_text_document", "vocab_file": "data/gpt2-vocab.json",
        "merge_file": "data/gpt2-merges.txt", "save": "checkpoints", "load": "checkpoints",
        "checkpoint_validation_with_forward_pass": False, "tensorboard_dir": "tensorboard", "log_dir": "logs",
        "use_comet": False, "log_grad_norm": True, "use_flashattn_swiglu": True, "rmsnorm_fusion": True,
        "profile": False, "memory_profiling": False, "wandb_run_name": "quickstart",
        "data_types": {"grad_accum_dtype": "fp32"}, "deepspeed_extra_args": {"comms_logger": {"enabled": False}},
    }))
    c = load_config(REPO / "configs" / "tiny.yml", setup)
    assert c.wandb_name == "quickstart"
    with caplog.at_level(logging.WARNING):
        log_ignored_settings(c)
    assert len(caplog.records) == 1
    for named in ("use_flashattn_swiglu=True",
                  "rmsnorm_fusion=True", "log_dir='logs'"):
        assert named in caplog.text
    assert "use_comet" not in caplog.text and "profile" not in caplog.text  # at upstream's default


def test_a_key_upstream_does_not_know_stays_an_error_with_a_suggestion():
    with pytest.raises(UserError, match="unknown key 'log_grad_nrom'; did you mean 'log_grad_norm'"):
        from_dict({"log_grad_nrom": True})
    with pytest.raises(UserError, match="key 'merge_file' must be str or null, got 3"):
        from_dict({"merge_file": 3})


def test_the_table_keys_round_trip_through_the_saved_config():
    c = from_dict({"merge_file": "m.txt", "comms_logger": {"enabled": True}, "batch_size": 1})
    assert c.to_dict()["merge_file"] == "m.txt" and from_dict(c.to_dict()).to_dict() == c.to_dict()
    assert from_dict(c.to_dict()).upstream_keys == c.upstream_keys
    assert from_dict(c.to_dict()) != from_dict({**c.to_dict(), "merge_file": "other.txt"})


def test_lr_decay_fraction_decays_over_that_share_of_train_iters():
    """Upstream: lr_decay_iters = floor(train_iters x lr_decay_fraction) when lr_decay_iters is null. Linear
    decay from 1e-3 to 0 over floor(1000 x 0.25) = 250 steps, warmup 0: half way at step 125, done at 250."""
    from neox_fork.training.optim import lr_at

    keys = {"train_iters": 1000, "lr_decay_fraction": 0.25, "warmup": 0.0, "lr_decay_style": "linear",
            "min_lr": 0.0, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}
    c = from_dict(keys)
    assert lr_at(c, 125) == pytest.approx(0.5e-3) and lr_at(c, 250) == 0.0 and lr_at(c, 600) == 0.0
    assert from_dict({**keys, "lr_decay_iters": 500}).decay_iters == 500  # an explicit step count wins
