"""Upstream's MoE keys load with upstream's meaning; bad values, what is not built yet, and older upstream's
DeepSpeed-MoE keys are each one line naming the key."""

import pytest

from conftest import tiny_keys
from neox_fork.config.loading import from_dict
from neox_fork.config.upstream import REMOVED_MOE_KEYS
from neox_fork.errors import UserError


def test_upstream_defaults_are_dense_sinkhorn_top1():
    c = from_dict(tiny_keys())
    assert (c.moe_num_experts, c.moe_expert_interval, c.moe_top_k, c.moe_router_type, c.moe_lbl_in_fp32,
            c.moe_jitter_eps, c.moe_aux_loss_coeff, c.expert_model_parallel_size) == (1, 1, 1, "sinkhorn", False,
                                                                                      None, 0.0, 1)


@pytest.mark.parametrize("keys, match", [
    (dict(moe_num_experts=0), "moe_num_experts must be 1"),
    (dict(moe_num_experts=4, moe_top_k=5), "moe_top_k must be from 1 to moe_num_experts 4"),
    (dict(moe_num_experts=4, moe_expert_interval=0), "moe_expert_interval must be 1 or more"),
    (dict(moe_num_experts=4, moe_router_type="expert_choice"), "moe_router_type 'expert_choice' is not supported"),
    (dict(moe_num_experts=4, moe_aux_loss_coeff=0.01), "moe_aux_loss_coeff applies to moe_router_type topk"),
    (dict(moe_num_experts=4, moe_normalize_expert_weights=True), "moe_normalize_expert_weights applies to"),
    (dict(moe_num_experts=4, moe_router_type="topk", moe_aux_loss_coeff=-1.0), "must be 0 or more"),
    (dict(moe_num_experts=4, moe_router_type="topk", moe_jitter_eps=1.5), "moe_jitter_eps must be between 0 and 1"),
    (dict(moe_num_experts=4, moe_jitter_eps=0.1), "moe_jitter_eps applies to moe_router_type topk"),
    (dict(expert_model_parallel_size=2), "expert_model_parallel_size 2 needs experts"),
    (dict(moe_num_experts=4, expert_model_parallel_size=3), "expert_model_parallel_size 3 does not divide "
                                                            "moe_num_experts 4"),
    (dict(moe_num_experts=4, expert_model_parallel_size=0), "expert_model_parallel_size must be 1 or more"),
    (dict(moe_num_experts=4, expert_model_parallel_size=2, eval_tasks=["lambada_openai"]),
     "eval_tasks during training with expert_model_parallel_size 2 is not supported yet"),
    (dict(moe_num_experts=4, adapter="lora"), "adapters on the experts are not built"),
    (dict(moe_num_experts=4, moe_router_type="topk", moe_aux_loss_coeff=0.01, precision="fp16"),
     "the fp16 loss scale"),
])
def test_bad_or_not_yet_built_moe_settings_are_one_line(keys, match):
    with pytest.raises(UserError, match=match) as err:
        from_dict(tiny_keys(**keys))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", sorted(REMOVED_MOE_KEYS))
def test_older_upstream_deepspeed_moe_keys_say_what_replaced_them(key):
    with pytest.raises(UserError, match=rf"key '{key}' was removed upstream: ") as err:
        from_dict(tiny_keys(**{key: 1}))
    assert "\n" not in str(err.value)


def test_moe_keys_load_as_given():
    c = from_dict(tiny_keys(moe_num_experts=8, moe_top_k=2, moe_router_type="topk", moe_aux_loss_coeff=0.01,
                            moe_normalize_expert_weights=True, moe_lbl_in_fp32=True, moe_jitter_eps=0.01,
                            moe_expert_interval=2))
    assert (c.moe_num_experts, c.moe_top_k, c.moe_expert_interval, c.moe_jitter_eps) == (8, 2, 2, 0.01)


def test_older_upstream_moe_expert_parallel_size_is_an_alias():
    c = from_dict(tiny_keys(moe_num_experts=4, moe_expert_parallel_size=2))
    assert c.expert_model_parallel_size == 2
    with pytest.raises(UserError, match="moe_expert_parallel_size 2 and expert_model_parallel_size 4 disagree"):
        from_dict(tiny_keys(moe_num_experts=4, moe_expert_parallel_size=2, expert_model_parallel_size=4))


def test_expert_parallel_size_must_divide_data_parallel_ranks():
    c = from_dict(tiny_keys(moe_num_experts=4, expert_model_parallel_size=4))
    with pytest.raises(UserError, match="expert_model_parallel_size 4 does not divide the data-parallel size 2") as err:
        c.check_world_size(2)
    assert "\n" not in str(err.value)
    c.check_world_size(4)
