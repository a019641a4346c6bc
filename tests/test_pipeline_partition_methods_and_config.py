"""pipe_partition_method splits GPT-NeoX's layer list as DeepSpeed's PipelineModule does, and pipeline
configs that cannot run are one line naming the key.

The boundaries are worked out by hand for a 4-layer model, whose layer list has 9 entries:
0 embedding, 1 function, 2-5 transformer layers, 6 function, 7 final norm, 8 output layer.
"""

import pytest

from conftest import tiny_keys
from neox_fork.config.loading import from_dict
from neox_fork.errors import UserError
from neox_fork.training.pipeline import entry_names, partition

NAMES = entry_names(4, tied=False)


def test_entry_names_are_upstreams_layer_list():
    assert NAMES == ["EmbeddingPipe", "_pre_transformer_block", *["ParallelTransformerLayerPipe"] * 4,
                     "_post_transformer_block", "NormPipe", "ParallelLinearPipe"]
    assert entry_names(2, tied=True)[-1] == "EmbeddingPipe"  # upstream's TiedLayerSpec closes the list


@pytest.mark.parametrize("method, stages, boundaries", [
    # two transformer layers a stage: entries 0-3 (embedding, function, layers 0-1) and 4-8
    ("type:transformer|mlp", 2, [0, 4, 9]),
    ("type:transformer", 2, [0, 4, 9]),
    # 9 entries over 2 stages: 5 + 4
    ("uniform", 2, [0, 5, 9]),
    # 9 entries over 4 stages: 3 + 2 + 2 + 2
    ("uniform", 4, [0, 3, 5, 7, 9]),
])
def test_partition_by_type_and_uniform(method, stages, boundaries):
    assert partition(method, NAMES, [0] * 9, stages) == boundaries


def test_partition_by_parameters_balances_the_largest_stage():
    # embedding 100, layers 10 each, norm 1, head 100: [0, 4) holds 120, [4, 9) 121; a cut at 3 gives 110/131,
    # at 5 gives 130/111, so 4 is the balanced one
    assert partition("parameters", NAMES, [100, 0, 10, 10, 10, 10, 0, 1, 100], 2) == [0, 4, 9]


def test_a_type_that_matches_nothing_is_one_line():
    with pytest.raises(UserError, match="pipe_partition_method 'type:mamba' matches none"):
        partition("type:mamba", NAMES, [0] * 9, 2)


@pytest.mark.parametrize("keys, message", [
    (dict(pipe_parallel_size=2, zero_optimization={"stage": 2}),
     "zero_optimization stage 2 with pipe_parallel_size 2: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1"),
    (dict(pipe_parallel_size=2, pipe_partition_method="balanced"),
     "pipe_partition_method 'balanced' is not one of uniform, parameters, type:REGEX"),
    (dict(pipe_parallel_size=8), "pipe_parallel_size 8 is more than the 7 entries"),
])
def test_pipeline_configs_that_cannot_run_are_one_line(keys, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(tiny_keys(**keys))


def test_world_size_must_hold_whole_pipelines():
    config = from_dict(tiny_keys(pipe_parallel_size=2, model_parallel_size=2))
    assert config.data_parallel_size(8) == 2
    with pytest.raises(UserError, match="pipe_parallel_size 2 x model_parallel_size 2 does not divide the world size 6"):
        config.check_world_size(6)


def test_a_stage_without_one_of_the_optimizer_groups_is_one_line(one_process):
    """A 2-layer model's 7 entries over 4 uniform stages ([0, 2, 4, 6, 7]) leave stage 0 the embedding alone
    (no norm or bias): DeepSpeed would drop its empty optimizer group and the step would hang; 3 stages
    ([0, 3, 5, 7]: embedding + layer 0, layer 1, norm + head) hold both groups on every stage."""
    from neox_fork.model.transformer import build_model
    from neox_fork.training.pipeline import check_optimizer_groups, entry_parameters

    model = build_model(from_dict(tiny_keys()))
    names = entry_names(2, tied=False)
    check_optimizer_groups(model, names, partition("uniform", names, entry_parameters(model), 3))
    with pytest.raises(UserError, match="pipe_parallel_size 4: stage 0 would hold only EmbeddingPipe, "
                                        "_pre_transformer_block, without norms or biases"):
        check_optimizer_groups(model, names, partition("uniform", names, entry_parameters(model), 4))
