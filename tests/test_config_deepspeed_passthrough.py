"""DeepSpeed sections upstream passes through (data_types, comms_logger, flops_profiler, csv_monitor,
communication_data_type, prescale_gradients, ..., deepspeed_extra_args) reach the dict handed to
deepspeed.initialize, and DeepSpeed's engine runs with them."""

import pytest
import torch

from conftest import tiny_keys
from neox_fork.config import upstream as up
from neox_fork.config.ds_config import deepspeed_config
from neox_fork.config.loading import from_dict
from neox_fork.errors import UserError

# every passthrough key at a value that is not upstream's default (monitors and profilers off, so the engine
# writes nothing), and one key only deepspeed_extra_args carries
PASSTHROUGH = {
    "prescale_gradients": True, "gradient_predivide_factor": 2.0, "dump_state": True,
    "flops_profiler": {"enabled": False, "profile_step": 7}, "communication_data_type": "fp16",
    "autotuning": {"enabled": False}, "tensorboard": {"enabled": False}, "wandb": {"enabled": False},
    "csv_monitor": {"enabled": False},
    "comms_logger": {"enabled": False, "verbose": True}, "checkpoint": {"tag_validation": "FAIL"},
    "data_types": {"grad_accum_dtype": "fp32"}, "deepspeed_extra_args": {"memory_breakdown": True},
}


def test_every_passthrough_key_is_in_the_table_and_exercised_here():
    assert set(PASSTHROUGH) == set(up.keys_of(up.DEEPSPEED))


def test_passthrough_keys_are_merged_into_the_deepspeed_config():
    ds = deepspeed_config(from_dict(tiny_keys(load_universal=True, **PASSTHROUGH)), 1)
    for key, value in PASSTHROUGH.items():
        if key == "deepspeed_extra_args":
            assert ds["memory_breakdown"] is True and key not in ds
        elif key == "checkpoint":  # merged with what load_universal asks of the same section
            assert ds[key] == {"load_universal": True, "tag_validation": "FAIL"}
        else:
            assert ds[key] == value, key
    plain = deepspeed_config(from_dict(tiny_keys()), 1)
    assert not set(plain) & (set(PASSTHROUGH) - {"data_types"}) and "memory_breakdown" not in plain


def test_config_sections_win_over_ours_and_extra_args_may_not_repeat_a_key():
    # bf16 sets grad_accum_dtype fp32 here; the config's data_types wins key by key
    ds = deepspeed_config(from_dict(tiny_keys(precision="bfloat16", data_types={"grad_accum_dtype": "bf16"})), 1)
    assert ds["data_types"] == {"grad_accum_dtype": "bf16"} and ds["bf16"] == {"enabled": True}
    with pytest.raises(UserError, match="deepspeed_extra_args sets 'gradient_clipping', which the config also"):
        from_dict(tiny_keys(gradient_clipping=0.5, deepspeed_extra_args={"gradient_clipping": 2.0}))
    with pytest.raises(UserError, match="deepspeed_extra_args sets 'bf16', a key of its own here; give it at the"):
        from_dict(tiny_keys(deepspeed_extra_args={"bf16": {"enabled": True}}))  # the model would stay fp32
    with pytest.raises(UserError, match="scheduler .* is not supported: DeepSpeed's LR schedulers are not used"):
        from_dict(tiny_keys(deepspeed_extra_args={"scheduler": {"type": "WarmupLR"}}))


def test_the_engine_is_built_with_them(one_process, monkeypatch):
    """The dict training hands to deepspeed.initialize carries each key, and the engine reads them back."""
    import deepspeed

    from neox_fork.model.transformer import build_model
    from neox_fork.training.optim import build_engine

    handed = []
    real = deepspeed.initialize
    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: (handed.append(kw["config"]), real(**kw))[1])
    c = from_dict(tiny_keys(zero_optimization={"stage": 0}, wall_clock_breakdown=True, **PASSTHROUGH))
    engine = build_engine(c, build_model(c), 1)
    assert handed[0]["gradient_predivide_factor"] == 2.0 and handed[0]["memory_breakdown"] is True
    assert engine.communication_data_type == torch.float16  # fp32 training: without the key, fp32
    assert engine.gradient_predivide_factor() == 2.0 and engine.postscale_gradients() is False
    assert engine.wall_clock_breakdown() and engine.memory_breakdown()
    assert engine.flops_profiler_profile_step() == 7 and engine.dump_state()
    assert engine.checkpoint_tag_validation_fail()
