"""Process groups, the RNG tracker and the adapter DeepSpeed needs to see TP/DP groups.

Tensor-parallel (TP) and data-parallel (DP) groups come from megatron-core's `parallel_state`, with
ranks ordered so that a TP group is made of neighbouring ranks (inside one node on a cluster). The
same code runs NCCL on GPUs and gloo on CPUs; a single process gets a one-rank gloo group so that the
tensor-parallel layers work unchanged at TP=1.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from neox_fork.errors import UserError


def slurm_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR derived from Slurm's variables (for `srun python train.py`).

    Only variables that are not set already are returned. MASTER_ADDR is the first host of
    SLURM_JOB_NODELIST (expanded as `scontrol show hostnames` would for the common forms).
    """
    env = os.environ if environ is None else environ
    if "SLURM_PROCID" not in env:
        return {}
    mapped = {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": env.get("SLURM_NTASKS", "1"),
    }
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist:
        mapped["MASTER_ADDR"] = first_slurm_host(nodelist)
    mapped.setdefault("MASTER_PORT", env.get("MASTER_PORT", "29500"))
    return {k: v for k, v in mapped.items() if k not in env}


def mpi_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """RANK/LOCAL_RANK/WORLD_SIZE from Open MPI's variables (launcher openmpi/mvapich, deepspeed_mpi)."""
    env = os.environ if environ is None else environ
    names = {"RANK": ("OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK"),
             "LOCAL_RANK": ("OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"),
             "WORLD_SIZE": ("OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE")}
    mapped = {}
    for ours, theirs in names.items():
        found = next((env[n] for n in theirs if n in env), None)
        if found is not None and ours not in env:
            mapped[ours] = found
    return mapped


def launcher_environment(use_slurm_env: bool, use_mpi_env: bool) -> None:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* from Slurm or MPI before anything reads them."""
    if use_slurm_env:
        os.environ.update(slurm_environment())
    if use_mpi_env:
        os.environ.update(mpi_environment())


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    head = ""
    depth = 0
    for ch in nodelist:
        if ch == "," and depth == 0:
            break
        depth += ch == "["
        depth -= ch == "]"
        head += ch
    # each bracket group contributes its first value: 'a[1-2]b[7,9]' -> 'a1b7'
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], head)


def init_distributed(backend: str | None = None, timeout_minutes: int = 10, use_slurm_env: bool = False) -> None:
    """Join the default process group (env:// when launched, a private one-rank group otherwise)."""
    if dist.is_initialized():
        return
    if use_slurm_env:
        os.environ.update(slurm_environment())
    if backend is None or (backend == "nccl" and not torch.cuda.is_available()):
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def initialize(tensor_parallel_size: int = 1, backend: str | None = None, timeout_minutes: int = 10,
               use_slurm_env: bool = False) -> None:
    """Process group plus TP/DP groups; idempotent for the same TP size."""
    init_distributed(backend, timeout_minutes, use_slurm_env)
    world = dist.get_world_size()
    if world % tensor_parallel_size:
        raise UserError(f"model_parallel_size {tensor_parallel_size} does not divide the world size {world}")
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() == tensor_parallel_size:
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=False,
    )


def destroy() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size()


class MPU:
    """The six methods DeepSpeed calls on `mpu=`; without them it would treat TP ranks as DP copies."""

    @staticmethod
    def get_model_parallel_group():
        return parallel_state.get_tensor_model_parallel_group()

    @staticmethod
    def get_model_parallel_rank():
        return dist.get_rank(group=parallel_state.get_tensor_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size():
        return dist.get_world_size(group=parallel_state.get_tensor_model_parallel_group())

    @staticmethod
    def get_data_parallel_group():
        return parallel_state.get_data_parallel_group()

    @staticmethod
    def get_data_parallel_rank():
        return dist.get_rank(group=parallel_state.get_data_parallel_group())

    @staticmethod
    def get_data_parallel_world_size():
        return dist.get_world_size(group=parallel_state.get_data_parallel_group())


class RNGTracker:
    """Named RNG streams that work on CPU and GPU (megatron-core's tracker needs CUDA).

    `fork("model-parallel")` runs a block under a stream seeded differently on each TP rank (dropout
    inside a head-split region); outside forks the default generator is seeded the same on every TP rank
    so replicated tensors see the same dropout masks and initialisation.
    """

    def __init__(self) -> None:
        self.states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def add(self, name: str, seed: int) -> None:
        with _preserved_rng():
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

    def state_dict(self) -> dict:
        return dict(self.states)

    def load_state_dict(self, states: dict) -> None:
        self.states = dict(states)


def get_rng_state():
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state[1])


@contextlib.contextmanager
def _preserved_rng():
    saved = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


RNG_TRACKER = RNGTracker()


def seed_everything(seed: int) -> None:
    """Same default stream on every rank (TP-invariant init); a per-TP-rank stream for head-split dropout."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    rank = tp_rank() if parallel_state.model_parallel_is_initialized() else 0
    RNG_TRACKER.add("model-parallel", seed + 2718 + rank)
