"""context_parallel_size: what does not divide and each combination not built is one line at config load, naming
the key and the pair (config/rules.py); what is built loads, and the data-parallel size counts the context ranks
out of the world."""

import pytest

from conftest import tiny_keys
from neox_fork.config.loading import from_dict
from neox_fork.errors import UserError

BUILT = tiny_keys(context_parallel_size=2)


def test_built_combinations_load():
    for extra in ({}, {"model_parallel_size": 2}, {"zero_optimization": {"stage": 2}}, {"checkpoint_activations": True},
                  {"reset_attention_mask": True, "reset_position_ids": True}, {"precision": "bfloat16"},
                  {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}):
        c = from_dict({**BUILT, **extra})
        assert c.context_parallel_size == 2
    c = from_dict({**BUILT, "model_parallel_size": 2})
    assert c.data_parallel_size(8) == 2 and c.global_batch_size(8) == 2 * c.train_micro_batch_size_per_gpu


@pytest.mark.parametrize("extra, message", [
    ({"context_parallel_size": 0}, "context_parallel_size must be a positive integer (1 = off), got 0"),
    ({"seq_length": 255}, "context_parallel_size 2 with seq_length 255: each rank holds seq_length / "
                          "context_parallel_size positions; use a seq_length divisible by 2"),
    ({"num_attention_heads": 2, "model_parallel_size": 2},
     "context_parallel_size 2 with num_attention_heads 2 at model_parallel_size 2: the all-to-all gives each context "
     "rank 1/2 of a tensor-parallel rank's 1 heads; use head counts divisible by model_parallel_size x "
     "context_parallel_size = 4"),
    ({"num_kv_heads": 1}, "context_parallel_size 2 with num_kv_heads 1 at model_parallel_size 1"),
    ({"pipe_parallel_size": 2}, "context_parallel_size 2 with pipeline stages is not built; use "
                                "context_parallel_size 1 for it"),
    ({"model_parallel_size": 2, "sequence_parallel": True}, "context_parallel_size 2 with sequence_parallel at "
                                                            "model_parallel_size > 1"),
    ({"model_parallel_size": 2, "partition_activations": True}, "with partition_activations at model_parallel_size"),
    ({"moe_num_experts": 2}, "context_parallel_size 2 with mixture of experts"),
    ({"adapter": "lora"}, "context_parallel_size 2 with adapter lora is not built"),
    ({"torch_compile": True}, "context_parallel_size 2 with torch_compile is not built"),
    ({"sliding_window_width": 16}, "context_parallel_size 2 with a sliding window is not built"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "context_parallel_size 2 with rope_scaling type "
                                                                 "dynamic"),
    ({"eval_tasks": ["lambada_openai"]}, "context_parallel_size 2 with eval_tasks during training"),
    ({"checkpoint_validation_with_forward_pass": True}, "with checkpoint_validation_with_forward_pass"),
])
def test_refusals_are_one_line_naming_the_pair(extra, message):
    with pytest.raises(UserError) as e:
        from_dict({**BUILT, **extra})
    text = str(e.value)
    assert message in text and "\n" not in text, text


def test_world_size_must_take_every_parallel_size():
    c = from_dict({**BUILT, "model_parallel_size": 2})
    with pytest.raises(UserError, match="context_parallel_size 2 x model_parallel_size 2 x pipe_parallel_size 1 "
                                        "does not divide the world size 6"):
        c.check_world_size(6)
