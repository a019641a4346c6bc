"""Process groups, the RNG tracker and the adapter DeepSpeed needs to see TP/CP/DP groups.

Tensor-parallel (TP), context-parallel (CP) and data-parallel (DP) groups come from megatron-core's
`parallel_state`, with ranks ordered tensor fastest, then context, then data (megatron-core's
"tp-cp-ep-dp-pp"), so that a TP group is made of neighbouring ranks (inside one node on a cluster). The
same code runs NCCL on GPUs and gloo on CPUs; a single process gets a one-rank gloo group so that the
tensor-parallel layers work unchanged at TP=1.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from megatron.core import parallel_state
from torch.utils.checkpoint import noop_context_fn

from neox_fork.errors import UserError


def init_distributed(backend: str | None = None, timeout_minutes: int = 10) -> None:
    """Join the default process group (env:// when launched, a private one-rank group otherwise).

    Under srun or mpirun call `launcher_environment` first, so RANK and WORLD_SIZE are set. The private
    group is gloo unless NCCL is asked for by name on a CUDA machine (a one-GPU DeepSpeed engine)."""
    if dist.is_initialized():
        return
    private_nccl = backend == "nccl" and torch.cuda.is_available()
    if backend is None or (backend == "nccl" and not torch.cuda.is_available()):
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timeout)
    elif private_nccl:
        torch.cuda.set_device(0)
        dist.init_process_group(backend="nccl", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                device_id=torch.device("cuda", 0))
    else:
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def initialize(tensor_parallel_size: int = 1, backend: str | None = None, timeout_minutes: int = 10,
               pipeline_parallel_size: int = 1, context_parallel_size: int = 1, expert_parallel_size: int = 1) -> None:
    """Process group plus TP/CP/DP (and pipeline, expert) groups; idempotent for the same sizes. Ranks are ordered
    tensor fastest, then context, then data, then pipeline stage: DeepSpeed's PipeModelDataParallelTopology
    orders TP, DP and pipeline the same way, so its pipeline groups and megatron-core's TP/DP groups hold the
    same ranks (pipelines and context parallelism are not combined: config/rules.py). Expert parallelism
    (megatron-core's groups, expert_tensor_parallel_size = TP): the EP group is `expert_parallel_size`
    neighbouring data-parallel ranks (same TP rank), the expert-data-parallel group the ranks holding the same
    experts (experts and context parallelism are not combined either)."""
    init_distributed(backend, timeout_minutes)
    world = dist.get_world_size()
    pipeline_parallel_size = max(pipeline_parallel_size, 1)
    if world % (tensor_parallel_size * pipeline_parallel_size * context_parallel_size):
        raise UserError(f"model_parallel_size {tensor_parallel_size} x pipe_parallel_size {pipeline_parallel_size} "
                        f"x context_parallel_size {context_parallel_size} does not divide the world size {world}")
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() == tensor_parallel_size
                and parallel_state.get_pipeline_model_parallel_world_size() == pipeline_parallel_size
                and parallel_state.get_context_parallel_world_size() == context_parallel_size
                and parallel_state.get_expert_model_parallel_world_size() == expert_parallel_size):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=False,
    )
    if context_parallel_size > 1:  # DistributedAttention's all-to-all goes through deepspeed.comm
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(minutes=timeout_minutes))
    _megatron_moe_without_transformer_engine()
    if not torch.cuda.is_available():
        _megatron_buffers_on_cpu()


class _CpuCuda:
    """torch.cuda as megatron-core's allocations see it on a machine without CUDA: the current device is the CPU."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")


class _TorchWithCpuCuda:
    def __init__(self):
        self.cuda = _CpuCuda()

    def __getattr__(self, name):
        return getattr(torch, name)


def _megatron_buffers_on_cpu() -> None:
    """Let megatron-core's sequence-parallel collectives run on CPU processes (gloo).

    Its all-gather and reduce-scatter (tensor_parallel.mappings, the sequence-parallel linear in
    tensor_parallel.layers, the global memory buffer) allocate their output buffers with
    `device=torch.cuda.current_device()`, which fails without CUDA. On such a machine those three modules
    see a `torch` whose current CUDA device is the CPU; the collectives, autograd functions and layers
    that run are megatron-core's own. Never done when CUDA is available.
    """
    from megatron.core import utils
    from megatron.core.tensor_parallel import layers, mappings
    from megatron.core.transformer.moe import router

    # router: the MoE router moves its weight to torch.cuda.current_device() at its first forward
    for module in (mappings, layers, utils, router):
        if module.torch is torch:
            module.torch = _TorchWithCpuCuda()


def _megatron_moe_without_transformer_engine() -> None:
    """megatron-core's MoE router gating (moe_utils.RouterGatingLinearFunction) tests `te_general_gemm is not
    None`, a name moe_utils defines only when TransformerEngine imports: without it (any CPU build, a GPU build
    without TE) the name is undefined. Defined as None there, the gating takes its own torch matmul path.
    The MoE token dispatcher is always the all-gather one (model/moe.py): the all-to-all one creates a
    torch.cuda.Stream. tests/test_moe_cpu_shims_match_megatron_core.py fails when megatron-core changes these."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def sum_sequence_parallel_grads(model: torch.nn.Module) -> int:
    """Make the gradient of every parameter marked `sequence_parallel` the sum over the TP group.

    Under sequence parallelism each TP rank's norm (and row-parallel bias) gradient covers only its
    sequence slice. DeepSpeed reduces gradients over the data-parallel group only, and ZeRO does so inside
    `engine.backward` (stage 2 as each gradient is produced, then frees it), so there is no moment between
    backward and step to add them up. A hook on each such parameter all-reduces its gradient over the TP
    group as autograd produces it, before it is accumulated and before DeepSpeed sees it (sums are linear,
    so gradient accumulation is unaffected). Returns how many parameters were hooked.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    if group.size() == 1:
        return 0

    def all_reduce(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    hooked = 0
    for p in model.parameters():
        if p.requires_grad and getattr(p, "sequence_parallel", False):
            p.register_hook(all_reduce)
            hooked += 1
    return hooked


def reduce_expert_parallel_grads(model: torch.nn.Module) -> int:
    """Expert parallelism (EP > 1) as megatron-core reduces it, inside a DeepSpeed engine that knows nothing of it.

    DeepSpeed's data-parallel group is then the expert-data-parallel group (`MPU`): the ranks holding the same
    experts, so ZeRO shards and all-reduces only tensors that are equal across it. The rest of the data-parallel
    reduction is done here, by a hook on each parameter as autograd produces its gradient (before accumulation,
    like sum_sequence_parallel_grads; sums are linear): a dense parameter's gradient is averaged over the EP group
    (DeepSpeed's average over the expert-data-parallel group completes the mean over all data-parallel ranks);
    an expert's gradient already sums the tokens every EP rank sent it (the dispatcher's backward), so it is
    divided by EP. megatron-core marks expert parameters `allreduce = False`, which DeepSpeed would take for its
    own MoE's parameters (needing its own groups): the mark becomes `expert_parallel = True`. DeepSpeed's
    gradient norm adds squares over its model-parallel group (`MPU`: tensor x expert ranks), so dense
    parameters of EP ranks > 0 are marked `ds_pipe_replicated` (counted on EP rank 0 only, as DeepSpeed counts
    a tied pipeline weight once). Returns how many parameters were hooked."""
    ep = parallel_state.get_expert_model_parallel_world_size()
    if ep == 1:
        return 0
    group = parallel_state.get_expert_model_parallel_group()
    first = parallel_state.get_expert_model_parallel_rank() == 0

    def mean_over_ep(grad):
        grad = grad / ep
        dist.all_reduce(grad, group=group)
        return grad

    hooked = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "allreduce", True) is False or getattr(p, "expert_parallel", False):
            p.allreduce, p.expert_parallel = True, True
            p.register_hook(lambda grad: grad / ep)
        else:
            p.register_hook(mean_over_ep)
            # keeps a pipeline's mark on the last stage's copy of tied embeddings (NeoXPipe: counted on stage 0)
            p.ds_pipe_replicated = getattr(p, "ds_pipe_replicated", False) or not first
        hooked += 1
    return hooked


def destroy() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    """This rank's device: its current CUDA device, else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def any_ranks(*flags: bool) -> list[bool]:
    """Each flag true on every rank when it is true on any (one all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any."""
    return any_ranks(flag)[0]


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def cp_rank() -> int:
    return parallel_state.get_context_parallel_rank()


def cp_size() -> int:
    return parallel_state.get_context_parallel_world_size()


def cp_group():
    return parallel_state.get_context_parallel_group()


def context_group():
    """The context-parallel group when it has more than one rank (each holds a slice of every sequence), else None
    (also before the groups exist: a model built for sizing)."""
    group = parallel_state.get_context_parallel_group(check_initialized=False)
    return group if group is not None and group.size() > 1 else None


def gather_sequence(t: torch.Tensor, group) -> torch.Tensor:
    """[b, s/CP] slices of the CP group's ranks (no gradient: ids) -> [b, s], in rank order."""
    parts = [torch.empty_like(t) for _ in range(group.size())]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def context_slice(batch: dict) -> dict:
    """This rank's 1/CP of every sequence of a batch (context parallelism; the batch as is at CP=1).

    Every rank of a context-parallel group reads the same samples (they share one data-parallel rank); each
    keeps the contiguous positions [r s/CP, (r+1) s/CP) of tokens, labels, loss mask and (document masks) position
    and segment ids. The model computes global positions and gathers the segment ids (model/transformer.py)."""
    cp = cp_size()
    if cp == 1:
        return batch
    r = cp_rank()
    return {k: v.chunk(cp, dim=1)[r].contiguous() for k, v in batch.items()}


def context_sum(value: torch.Tensor) -> torch.Tensor:
    """A rank's loss summed over its context-parallel group: each CP rank's loss is its slice's part of the
    sequences' mean, so the sum is the loss one process computes (detached; `value` itself at CP=1)."""
    if cp_size() == 1:
        return value
    value = value.detach().float().clone()
    dist.all_reduce(value, group=cp_group())
    return value


def data_and_context_group():
    """The ranks that hold the same weights (data x context parallel): ZeRO partitions and gradients are
    reduced over it."""
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def ep_rank() -> int:
    return parallel_state.get_expert_model_parallel_rank()


def ep_size() -> int:
    return parallel_state.get_expert_model_parallel_world_size()


def pp_rank() -> int:
    return parallel_state.get_pipeline_model_parallel_rank()


def pp_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size()


def reads_data() -> bool:
    """Whether this rank reads training data: every rank without pipelining, else the first and last stages
    (tokens in, labels and loss mask at the loss)."""
    return pp_rank() in (0, pp_size() - 1)


class MPU:
    """The methods DeepSpeed calls on `mpu=`; without them it would treat TP ranks as DP copies. Its universal
    checkpoint loader asks for the tensor-parallel ones by their newer names.

    With expert parallelism (EP > 1) DeepSpeed's data-parallel group is megatron-core's expert-data-parallel one
    (ranks with the same experts: ZeRO shards over it) and its model-parallel group the tensor x expert ranks
    (megatron-core's expert-tensor-and-model-parallel group: each writes its own mp_rank file, and the gradient
    norm adds them up); reduce_expert_parallel_grads does the rest of the data-parallel reduction.

    Context parallelism is DeepSpeed's "sequence parallelism" (Ulysses): DeepSpeed reads the sequence group
    (its size decides its gradient divisor) and the sequence x data group, over which ZeRO partitions the
    optimizer states, gradients are reduced and the model is broadcast at start; the data-parallel group stays
    the one without context ranks (DeepSpeed's batch-size arithmetic: train_batch_size = micro x accumulation x
    DP). DeepSpeed (engine.allreduce_bucket, ZeRO-1/2's reduction) sums gradients over sequence x data and
    divides by its size / CP = DP: the context ranks' gradients are summed, the data ranks' averaged; the loss
    of each context rank is therefore its tokens' sum over the whole sequence's count (docs/parallelism.md)."""

    @staticmethod
    def get_sequence_parallel_group():
        return parallel_state.get_context_parallel_group()

    @staticmethod
    def get_sequence_parallel_world_size():
        return parallel_state.get_context_parallel_world_size()

    @staticmethod
    def get_sequence_parallel_rank():
        return parallel_state.get_context_parallel_rank()

    @staticmethod
    def get_sequence_data_parallel_group():
        # DeepSpeed's ZeRO partitions and reduces over this group whenever `mpu` has it: at CP 1 it must be the
        # data-parallel group above (the expert-data-parallel one under expert parallelism)
        if parallel_state.get_context_parallel_world_size() > 1:
            return data_and_context_group()
        return MPU.get_data_parallel_group()

    @staticmethod
    def get_sequence_data_parallel_world_size():
        return dist.get_world_size(group=MPU.get_sequence_data_parallel_group())

    @staticmethod
    def get_sequence_data_parallel_rank():
        return dist.get_rank(group=MPU.get_sequence_data_parallel_group())

    @staticmethod
    def get_model_parallel_group():
        if parallel_state.get_expert_model_parallel_world_size() > 1:
            return parallel_state.get_expert_tensor_and_model_parallel_group()
        return parallel_state.get_tensor_model_parallel_group()

    @staticmethod
    def get_model_parallel_rank():
        return dist.get_rank(group=MPU.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size():
        return dist.get_world_size(group=MPU.get_model_parallel_group())

    @staticmethod
    def get_tensor_model_parallel_group():
        return parallel_state.get_tensor_model_parallel_group()

    @staticmethod
    def get_tensor_model_parallel_rank():
        return dist.get_rank(group=parallel_state.get_tensor_model_parallel_group())

    @staticmethod
    def get_tensor_model_parallel_world_size():
        return dist.get_world_size(group=parallel_state.get_tensor_model_parallel_group())

    @staticmethod
    def get_data_parallel_group():
        if parallel_state.get_expert_model_parallel_world_size() > 1:
            return parallel_state.get_expert_data_parallel_group()
        return parallel_state.get_data_parallel_group()

    @staticmethod
    def get_data_parallel_rank():
        return dist.get_rank(group=MPU.get_data_parallel_group())

    @staticmethod
    def get_data_parallel_world_size():
        return dist.get_world_size(group=MPU.get_data_parallel_group())


class RNGTracker:
    """Named RNG streams that work on CPU and GPU (megatron-core's tracker needs CUDA).

    `fork("model-parallel")` runs a block under a stream seeded differently on each TP rank (dropout
    inside a head-split region: the attention probabilities, model.Attention.core); outside forks the
    default generator is seeded the same on every TP rank so replicated tensors see the same dropout masks
    and initialisation. Activation recompute replays the streams (`checkpoint` below).
    """

    def __init__(self) -> None:
        self.states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def add(self, name: str, seed: int) -> None:
        with preserved_rng():
            torch.manual_seed(seed)
            self.states[name] = get_rng_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel"):
        if name not in self.states:
            yield
            return
        saved = get_rng_state()
        set_rng_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = get_rng_state()
            set_rng_state(saved)

    def recompute_contexts(self):
        """torch.utils.checkpoint's `context_fn`: called as the checkpointed forward starts, it keeps the
        streams as they are then; the recompute in the backward runs from that copy (drawing the forward's
        masks again) and the streams go back to where they were, as megatron-core's CheckpointFunction does
        with its CUDA tracker."""
        return contextlib.nullcontext(), self._replaying(dict(self.states))

    @contextlib.contextmanager
    def _replaying(self, states: dict):
        current, self.states = self.states, states
        try:
            yield
        finally:
            self.states = current

    def state_dict(self) -> dict:
        return dict(self.states)

    def load_state_dict(self, states: dict) -> None:
        self.states = dict(states)


def checkpoint(function, *args):
    """Activation checkpointing (torch's non-reentrant one) whose recompute draws the forward's random numbers:
    torch restores the default CPU/CUDA generators, the tracker's `recompute_contexts` its streams. Inside a
    compiled graph torch refuses such contexts: there the tracker's streams are not replayed."""
    context_fn = RNG_TRACKER.recompute_contexts if not torch.compiler.is_compiling() else noop_context_fn
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=context_fn)


def get_rng_state():
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state[1])


@contextlib.contextmanager
def preserved_rng():
    """Run a block that seeds or draws (a stream's creation, lm-eval's seeding) without moving the process's
    RNG streams: python's, numpy's, torch's and CUDA's are put back afterwards."""
    import random

    import numpy as np

    saved = random.getstate(), np.random.get_state(), get_rng_state()
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        set_rng_state(saved[2])


RNG_TRACKER = RNGTracker()


def seed_everything(seed: int) -> None:
    """Same default stream on every rank (TP- and CP-invariant init); a stream per TP x CP rank for head-split
    dropout (under context parallelism each rank of the CP group attends with other heads too); at CP=1 the
    streams are those of TP alone."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    rank = tp_rank() + tp_size() * cp_rank() if parallel_state.model_parallel_is_initialized() else 0
    RNG_TRACKER.add("model-parallel", seed + 2718 + rank)
