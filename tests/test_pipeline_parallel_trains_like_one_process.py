"""Pipeline parallelism (pipe_parallel_size 2, alone and with tensor or data parallelism) computes what one
process computes, and each stage holds the entries of GPT-NeoX's layer list its partition method gives it.

Each run is train.py on local ranks joined by gloo (conftest.run_training), with gradient_accumulation_steps
micro-batches in flight in DeepSpeed's pipeline schedule; the reference is one process with the whole global batch as one micro-batch
(every token counts, so the mean of the micro-batch means is the batch mean). Bounds, harness and reasons are
those of test_parallel_equivalence.py: the stages compute the same operations on the same numbers, only the
TP/DP sums change order. A skipped or wrong activation send, a lost or doubled layer, or a tied embedding whose
two copies drift apart moves losses and weights far outside them.

Which entries each stage holds is read from the ZeRO optimizer shards of each stage (`zero_pp_rank_D_mp_rank_XX`,
XX = stage x TP + TP rank), which name the parameters they hold (the model's names, `layers.1.*`). The expected
stages are worked out by hand for the test model (2 layers, 7 entries: 0 embedding, 1 function, 2-3 layers,
4 function, 5 final norm, 6 output layer; per-rank parameters 49152, 0, 53504, 53504, 0, 128, 49152).
"""

import pytest
import torch

from neox_fork.checkpoint import store as checkpoint
from test_parallel_equivalence import assert_same_losses, assert_same_weights, train

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

# type:transformer|mlp and parameters both give [0, 3, 7] (one layer a stage; 102656 vs 102784 parameters);
# uniform gives [0, 4, 7] (4 + 3 entries: both layers on the first stage)
ONE_LAYER_EACH = [{0, 2}, {3, 5, 6}]
UNIFORM = [{0, 2, 3}, {5, 6}]


def stage_entries(ckpt, stages: int, tp: int = 1) -> list[set[int]]:
    """The layer-list entries whose parameters each stage's optimizer shards (TP rank 0, all DP ranks: ZeRO-1
    splits a stage's parameters over them) hold."""
    folder = checkpoint.resolve(ckpt)
    out = []
    for stage in range(stages):
        entries = set()
        for path in folder.glob(f"zero_pp_rank_*_mp_rank_{stage * tp:02d}_optim_states.pt"):
            shard = torch.load(path, weights_only=False)
            names = [n for group in shard["optimizer_state_dict"]["param_slice_mappings"] for n in group]
            entries |= {entry_of(n, stage) for n in names}
        out.append(entries)
    return out


def entry_of(name: str, stage: int) -> int:
    """The layer-list entry (2 layers) of a parameter by its name; the embedding on a later stage is the tied
    copy that closes the list."""
    if name.startswith("layers."):
        return 2 + int(name.split(".")[1])
    if name.startswith("word_embeddings."):
        return 0 if stage == 0 else 6
    return {"final_norm": 5, "output_layer": 6}[name.split(".")[0]]


@pytest.fixture(scope="module")
def single(tmp_path_factory, small_corpus):
    return train(tmp_path_factory.mktemp("single_pp"), small_corpus, "one", 1, train_micro_batch_size_per_gpu=4)


def test_pp2_partition_by_parameters_equals_one_process(tmp_path, small_corpus, single):
    pp2 = train(tmp_path, small_corpus, "pp2", 2, pipe_parallel_size=2, pipe_partition_method="parameters",
                train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    assert stage_entries(pp2, 2) == ONE_LAYER_EACH
    assert_same_losses(pp2, single)
    assert_same_weights(pp2, single)


def test_pp2_by_tp2_with_sequence_parallel_and_full_recompute_equals_one_process(tmp_path, small_corpus, single):
    both = train(tmp_path, small_corpus, "pp2tp2", 4, pipe_parallel_size=2, model_parallel_size=2,
                 pipe_partition_method="type:transformer", train_micro_batch_size_per_gpu=2,
                 gradient_accumulation_steps=2, sequence_parallel=True, checkpoint_activations=True)
    assert checkpoint.tp_size_of(checkpoint.resolve(both)) == 2
    assert stage_entries(both, 2, tp=2) == ONE_LAYER_EACH
    assert_same_losses(both, single)
    assert_same_weights(both, single)


def test_pp2_by_dp2_zero1_uniform_split_with_selective_recompute_equals_one_process(tmp_path, small_corpus, single):
    both = train(tmp_path, small_corpus, "pp2dp2", 4, pipe_parallel_size=2, pipe_partition_method="uniform",
                 train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=2, checkpoint_activations=True,
                 recompute_granularity="selective")
    folder = checkpoint.resolve(both)
    assert len(list(folder.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))) == 2  # ZeRO-1 over DP per stage
    assert stage_entries(both, 2) == UNIFORM
    assert_same_losses(both, single)
    assert_same_weights(both, single)


def test_pp2_tied_embeddings_equal_one_process(tmp_path, small_corpus):
    tied = dict(no_weight_tying=False)
    one = train(tmp_path, small_corpus, "tied1", 1, train_micro_batch_size_per_gpu=4, **tied)
    pp2 = train(tmp_path, small_corpus, "tied_pp2", 2, pipe_parallel_size=2, train_micro_batch_size_per_gpu=2,
                gradient_accumulation_steps=2, **tied)
    assert stage_entries(pp2, 2) == ONE_LAYER_EACH  # the last stage's entry 6 is its copy of the embedding
    assert_same_losses(pp2, one)
    assert_same_weights(pp2, one)
    # both copies were updated alike: the last stage's file for entry 6 holds the first stage's embedding
    folder = checkpoint.resolve(pp2)
    first = torch.load(folder / "layer_00-model_00-model_states.pt")["word_embeddings.weight"]
    last = torch.load(folder / "layer_06-model_00-model_states.pt")["word_embeddings.weight"]
    torch.testing.assert_close(first, last, rtol=0, atol=0)
