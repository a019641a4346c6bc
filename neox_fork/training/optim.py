"""How the weights move: the LR schedule, AdamW's parameter groups, and the DeepSpeed engine around them.

The engine is what training steps (training/loop.py) and what checkpoints save and load (training/state.py):
AdamW with decoupled weight decay, the schedule as a LambdaLR so DeepSpeed saves and restores it,
ZeRO as configured, bf16 with fp32 master weights, gradient clipping.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from neox_fork.parallel import groups as parallel
from neox_fork.config.neox_config import NeoXConfig
from neox_fork.config.ds_config import deepspeed_config
from neox_fork.errors import UserError

log = logging.getLogger("neox_fork")


def schedule_of(c: NeoXConfig) -> dict:
    """The settings the LR schedule is made of (what a checkpoint records and a resume compares)."""
    return {"lr": c.learning_rate, "min_lr": c.min_lr, "warmup_iters": c.warmup_steps, "decay_iters": c.decay_iters,
            "decay_style": c.lr_decay_style}


def lr_from(s: dict, iteration: int) -> float:
    """LR for the update after `iteration` completed steps: linear warmup, then decay to min_lr.

    warmup:  lr * (iteration + 1) / warmup_iters
    cosine:  min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * progress))
    linear:  min_lr + (lr - min_lr) * (1 - progress)
    with progress = (iteration - warmup_iters) / (decay_iters - warmup_iters), clamped to [0, 1].
    """
    peak, warmup, decay, floor = s["lr"], s["warmup_iters"], s["decay_iters"], s["min_lr"]
    if iteration < warmup:
        return peak * (iteration + 1) / warmup
    if s["decay_style"] == "constant":
        return peak
    progress = min(max((iteration - warmup) / max(decay - warmup, 1), 0.0), 1.0)
    if s["decay_style"] == "linear":
        return floor + (peak - floor) * (1 - progress)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_at(c: NeoXConfig, iteration: int) -> float:
    """The config's LR for the update after `iteration` completed steps (see lr_from)."""
    return lr_from(schedule_of(c), iteration)


class Schedule(torch.optim.lr_scheduler.LRScheduler):
    """The LR schedule DeepSpeed steps, saves and restores. On resume the saved settings are compared with the
    config's, as upstream's AnnealingLR does: `override_lr_scheduler` keeps the config's,
    `use_checkpoint_lr_scheduler` takes the checkpoint's, and with neither a difference stops the run."""

    def __init__(self, optimizer, c: NeoXConfig):
        self.settings, self.c = schedule_of(c), c
        super().__init__(optimizer)

    def get_lr(self):
        return [lr_from(self.settings, self.last_epoch)] * len(self.optimizer.param_groups)

    def lr_for(self, iteration: int) -> float:
        return lr_from(self.settings, iteration)

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count, "settings": dict(self.settings)}

    def load_state_dict(self, state: dict) -> None:
        if "num_iters" in state:  # upstream gpt-neox's AnnealingLR
            saved = {"lr": state["start_lr"], "min_lr": state["min_lr"], "warmup_iters": state["warmup_iter"],
                     "decay_iters": state["end_iter"], "decay_style": state["decay_style"]}
            self.last_epoch = int(state["num_iters"])
        else:  # ours; a LambdaLR state (older saves) has no settings to compare
            saved = state.get("settings")
            self.last_epoch = int(state["last_epoch"])
        self._step_count = self.last_epoch + 1
        if saved and not self.c.override_lr_scheduler:
            if self.c.use_checkpoint_lr_scheduler:
                self.settings = dict(saved)
                log.info("use_checkpoint_lr_scheduler: the LR schedule is the checkpoint's: %s", saved)
            else:
                differ = [k for k in self.settings if saved.get(k) != self.settings[k]]
                if differ:
                    k = differ[0]
                    raise UserError(f"{self.c.where('override_lr_scheduler')}: the checkpoint's LR schedule has "
                                    f"{k} {saved.get(k)!r}, this config {self.settings[k]!r}; set "
                                    "override_lr_scheduler: true to use the config's or use_checkpoint_lr_scheduler: "
                                    "true to use the checkpoint's")
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms (weight and bias, the [heads, head_dim] qk norm included) and any
    bias get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def decays(name: str, p: torch.nn.Parameter) -> bool:
    """Whether AdamW decays this parameter (param_groups' rule)."""
    return not (p.dim() < 2 or name.endswith(".bias") or ".qk_layernorm." in name)


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


def unchecked_nonfinite_grads(engine, params) -> bool:
    """Whether this rank's gradients hold an inf/NaN that DeepSpeed would apply: its fp16, bf16 and ZeRO
    optimizers skip such a step themselves (they have `overflow`), the plain optimizer (fp32, ZeRO stage 0)
    would write NaN into the weights."""
    if hasattr(engine.optimizer, "overflow"):
        return False
    grads = [p.grad for p in params if p.grad is not None]
    return bool(grads) and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


def skip_update(engine, zero_grads_of=()) -> None:
    """Make this step's update leave the weights as they are: lr 0 (AdamW's decoupled decay is lr x wd), and
    zero gradients for the parameters `zero_grads_of` (non-finite ones: 0 x NaN would still be NaN)."""
    for p in zero_grads_of:
        if p.grad is not None:
            p.grad.zero_()
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0


def deepspeed_skipped_update(engine, device) -> str | None:
    """Why DeepSpeed skipped this step's update on some rank (None if it did not): it does when the gradients are
    non-finite (an fp16 loss-scale overflow; an inf/NaN gradient norm under bf16 or ZeRO 1/2). DeepSpeed then
    leaves the LR schedule where it was; it is stepped here, so the LR of every step is the schedule's value at
    its number (as for the other skips: docs/fault-handling.md)."""
    import torch.distributed as dist

    flag = torch.tensor([0.0 if engine.was_step_applied() else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return None
    engine.lr_scheduler.step()
    scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
    if engine.fp16_enabled() and isinstance(scale, (int, float)):
        return f"gradients are NaN/inf (DeepSpeed skipped the update; fp16 loss scale now {scale:g})"
    return "gradients are NaN/inf (DeepSpeed skipped the update)"


def build_engine(c: NeoXConfig, model: torch.nn.Module, world: int):
    """The DeepSpeed engine training runs: AdamW + the LR schedule, ZeRO, bf16 with fp32 masters, clipping."""
    import deepspeed

    if parallel.sum_sequence_parallel_grads(model) and c.partition_activations and not c.sequence_parallel:
        log.info("partition_activations: true runs as sequence_parallel: true (checkpointed layer inputs are "
                 "split over the tensor-parallel group)")
    if torch.cuda.is_available():
        model = model.cuda()
    optimizer = build_optimizer(c, model)
    scheduler = lambda opt: Schedule(opt, c)  # noqa: E731
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asks for it even of a single process
    pipelined = c.pipe_parallel_size > 1  # a pipeline_stages.NeoXPipe: its topology is DeepSpeed's mpu
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(c, world), mpu=None if pipelined else parallel.MPU(),
                                           dist_init_required=False)
    return engine  # pipelined: pipeline_stages.build_pipeline_engine gives it the stages' step rules