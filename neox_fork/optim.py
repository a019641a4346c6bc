"""How the weights move: the LR schedule, AdamW's parameter groups, and the DeepSpeed engine around them.

The engine is what training steps (training.py) and what checkpoints save and load (training_state.py):
AdamW with decoupled weight decay, the schedule as a LambdaLR so DeepSpeed saves and restores it,
ZeRO as configured, bf16 with fp32 master weights, gradient clipping.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from neox_fork import parallel
from neox_fork.config import NeoXConfig, deepspeed_config
from neox_fork.errors import UserError

log = logging.getLogger("neox_fork")


def lr_at(c: NeoXConfig, iteration: int) -> float:
    """LR for the update after `iteration` completed steps: linear warmup, then decay to min_lr.

    warmup:  lr * (iteration + 1) / warmup_steps
    cosine:  min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * progress))
    linear:  min_lr + (lr - min_lr) * (1 - progress)
    with progress = (iteration - warmup_steps) / (decay_iters - warmup_steps), clamped to [0, 1].
    """
    peak, warmup, decay = c.learning_rate, c.warmup_steps, c.decay_iters
    if iteration < warmup:
        return peak * (iteration + 1) / warmup
    if c.lr_decay_style == "constant":
        return peak
    progress = min(max((iteration - warmup) / max(decay - warmup, 1), 0.0), 1.0)
    if c.lr_decay_style == "linear":
        return c.min_lr + (peak - c.min_lr) * (1 - progress)
    return c.min_lr + (peak - c.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms (weight and bias, the [heads, head_dim] qk norm included) and any
    bias get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith(".bias") or ".qk_layernorm." in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(c: NeoXConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay); torch's fused kernel on CUDA, the foreach one on CPU. With
    `use_bnb_optimizer`, bitsandbytes' Adam8bit as upstream (its decay is decoupled too; moments of tensors
    of 4096+ elements kept in 8 bits, blockwise quantised)."""
    if c.use_bnb_optimizer:
        try:
            import bitsandbytes
        except ImportError:
            raise UserError(f"{c.where('use_bnb_optimizer')}: use_bnb_optimizer needs bitsandbytes, which is not "
                            "installed; `pip install bitsandbytes` or set use_bnb_optimizer: false") from None
        return bitsandbytes.optim.Adam8bit(param_groups(model, c.weight_decay), lr=c.learning_rate,
                                           betas=c.adam_betas, eps=c.adam_eps)
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(param_groups(model, c.weight_decay), lr=c.learning_rate, betas=c.adam_betas,
                             eps=c.adam_eps, fused=fused, foreach=None if fused else True)


def build_engine(c: NeoXConfig, model: torch.nn.Module, world: int):
    """The DeepSpeed engine training runs: AdamW + the LR schedule, ZeRO, bf16 with fp32 masters, clipping."""
    import deepspeed

    if parallel.sum_sequence_parallel_grads(model) and c.partition_activations and not c.sequence_parallel:
        log.info("partition_activations: true runs as sequence_parallel: true (checkpointed layer inputs are "
                 "split over the tensor-parallel group)")
    if torch.cuda.is_available():
        model = model.cuda()
    optimizer = build_optimizer(c, model)
    scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_at(c, it) / c.learning_rate)  # noqa: E731
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asks for it even of a single process
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(c, world), mpu=parallel.MPU(),
                                           dist_init_required=False)
    return engine