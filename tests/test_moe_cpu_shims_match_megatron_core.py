"""The shims that let megatron-core's MoE run without CUDA or TransformerEngine (neox_fork/parallel/groups.py)
still patch what megatron-core does: when an upgrade changes one of these calls, this fails and names the shim
to revisit (drop it when the call is gone, move it when it moved)."""

import inspect
from importlib.metadata import version

import torch
from megatron.core.transformer.moe import moe_utils, router, token_dispatcher

from conftest import REPO
from neox_fork.parallel import groups


def test_megatron_core_is_the_version_the_shims_were_written_for():
    pinned = next(line.split("==")[1] for line in (REPO / "requirements.txt").read_text().splitlines()
                  if line.startswith("megatron-core=="))
    assert version("megatron-core") == pinned


def test_the_router_still_moves_its_weight_to_the_current_cuda_device():
    # groups._megatron_buffers_on_cpu gives router.py a torch whose current CUDA device is the CPU
    assert "torch.cuda.current_device()" in inspect.getsource(router.Router.gating)


def test_the_router_gating_still_tests_te_general_gemm_which_needs_transformer_engine():
    # groups._megatron_moe_without_transformer_engine defines it as None where TE is missing
    source = inspect.getsource(moe_utils.RouterGatingLinearFunction)
    assert "te_general_gemm is not None" in source
    assert "te_general_gemm" not in moe_utils.__dict__ or moe_utils.te_general_gemm is None or _has_te()


def test_the_all_to_all_dispatcher_still_needs_a_cuda_stream_so_the_all_gather_one_is_used():
    assert "torch.cuda.Stream" in inspect.getsource(token_dispatcher)
    from neox_fork.model import moe

    assert 'moe_token_dispatcher_type="allgather"' in inspect.getsource(moe.transformer_config)


def test_after_initialize_the_shims_are_in_place(one_process):
    assert moe_utils.te_general_gemm is None or _has_te()
    if not torch.cuda.is_available():
        assert isinstance(router.torch, groups._TorchWithCpuCuda)
        assert router.torch.cuda.current_device() == torch.device("cpu")


def _has_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _dispatcher_collectives(rank):
    """What the all-gather dispatcher runs over its TP x EP group under expert parallelism, on gloo."""
    from megatron.core.tensor_parallel import mappings

    groups.initialize(1, "gloo", expert_parallel_size=2)
    group = groups.parallel_state.get_expert_tensor_and_model_parallel_group()
    routing = torch.tensor([[True, False], [rank == 1, True]])
    hidden = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered_map = mappings.gather_from_sequence_parallel_region(routing, group=group)
    gathered = mappings.gather_from_sequence_parallel_region(hidden, group=group, use_global_buffer=True)
    seen = gathered.tolist()  # the global buffer is reused by the next gather (the backward's)
    combined = mappings.reduce_scatter_to_sequence_parallel_region(gathered * 10, group=group)
    combined.sum().backward()
    return gathered_map.tolist(), seen, combined.tolist(), hidden.grad.tolist()


def test_the_all_gather_dispatcher_collectives_run_on_gloo_without_a_shim():
    """EP on CPU processes: megatron-core's all-gather dispatcher gathers the routing map (bool), the tokens (into
    its global buffer, shimmed to the CPU) and reduce-scatters the experts' outputs over the TP x EP group with
    all_gather_into_tensor / reduce_scatter_tensor, which gloo runs in the pinned torch; no shim is needed. When
    megatron-core or torch changes that, this fails before the EP training tests do."""
    from distributed import run_distributed

    source = inspect.getsource(token_dispatcher.MoEAllGatherTokenDispatcher)
    assert "gather_from_sequence_parallel_region" in source and "reduce_scatter_to_sequence_parallel_region" in source
    for rank, (routing, hidden, combined, grad) in enumerate(run_distributed(_dispatcher_collectives, 2)):
        assert routing == [[True, False], [False, True], [True, False], [True, True]]
        assert hidden == [[1.0] * 3] * 2 + [[2.0] * 3] * 2
        assert combined == [[10.0 * (rank + 1) * 2] * 3] * 2  # its own rows, summed over both ranks' copies
        assert grad == [[20.0] * 3] * 2  # the reduce-scatter's backward gathers, the gather's sums back
