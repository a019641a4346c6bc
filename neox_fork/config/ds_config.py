"""The DeepSpeed config derived from a `NeoXConfig`: batch sizes, ZeRO, precision, clipping, and the
DeepSpeed sections upstream passes through (config/upstream.py)."""

from __future__ import annotations

from typing import Any

from neox_fork.config import upstream as config_upstream
from neox_fork.config.neox_config import NeoXConfig


def deepspeed_config(c: NeoXConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config derived from ours: batch sizes, ZeRO, precision, clipping, and the DeepSpeed
    sections upstream passes through (config_upstream.DEEPSPEED keys, then deepspeed_extra_args).

    The optimizer and LR schedule are built by neox_fork.training.optim (optimizer.type with no decay on norms
    and biases, warmup + decay), so they are not in this dict. `torch_adam` keeps optimizer steps
    bit-identical across a resume (DeepSpeed's CPU FusedAdam recomputes beta^t after a step jump).
    """
    zero = {k: v for k, v in c.zero_optimization.items() if k != "cpu_offload"}
    zero.setdefault("stage", 0)
    if c.zero_optimization.get("cpu_offload"):
        zero["offload_optimizer"] = {"device": "cpu"}
    ds: dict[str, Any] = {
        "train_batch_size": c.global_batch_size(world_size),
        "train_micro_batch_size_per_gpu": c.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": c.gradient_accumulation_steps,
        "gradient_clipping": c.gradient_clipping,
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # our own progress line replaces DeepSpeed's
        "wall_clock_breakdown": c.wall_clock_breakdown,
        "zero_allow_untested_optimizer": True,
    }
    if c.optimizer_offload and c.optimizer_kind != "cpu_adam":  # cpu_torch_adam: torch's AdamW on the CPU
        ds["zero_force_ds_cpu_optimizer"] = False
    if c.load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if c.pipe_parallel_size > 1:  # stages pass whole activations: each TP rank's own under sequence parallelism
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if c.dtype_name == "bf16":
        ds["bf16"] = {"enabled": True}
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    elif c.dtype_name == "fp16":
        ds["fp16"] = {"enabled": True, **{k: v for k, v in (c.fp16 or {}).items() if k != "enabled"}}
    return config_upstream.deepspeed_sections(c, ds)
