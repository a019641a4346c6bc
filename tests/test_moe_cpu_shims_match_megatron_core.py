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
