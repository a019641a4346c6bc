"""How the weights move: the LR schedule, the optimizer's parameter groups, and the DeepSpeed engine around them.

The engine is what training steps (training/loop.py) and what checkpoints save and load (training/state.py):
the configured optimizer (AdamW with decoupled weight decay by default; docs/optimizers.md), the schedule as an
LRScheduler so DeepSpeed saves and restores it, ZeRO as configured, bf16 with fp32 master weights, gradient
clipping.
"""

from __future__ import annotations

import functools
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
    bias get none (every optimizer type gets these two groups)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def decays(name: str, p: torch.nn.Parameter) -> bool:
    """Whether the optimizer decays this parameter (param_groups' rule)."""
    return not (p.dim() < 2 or name.endswith(".bias") or ".qk_layernorm." in name)


def build_optimizer(c: NeoXConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer `optimizer.type` names, over param_groups (decay on matrices only), as upstream's
    get_optimizer builds it; docs/optimizers.md says where each comes from and where it differs from upstream.

    adam/adamw: torch's AdamW (decoupled decay); torch's fused kernel on CUDA, the foreach one on CPU. With
    `use_bnb_optimizer`, bitsandbytes' Adam8bit as upstream (its decay is decoupled too; moments of tensors of
    4096+ elements kept in 8 bits, blockwise quantised).
    cpu_adam: DeepSpeed's DeepSpeedCPUAdam (AdamW; a C++ op DeepSpeed builds at first use), with ZeRO-Offload.
    cpu_torch_adam: torch's AdamW with ZeRO-Offload (the update upstream runs: its check builds DeepSpeedCPUAdam).
    sgd: torch's SGD, L2 decay added to the gradient (upstream: mup's MuSGD, which is SGD at width multiplier 1).
    lion: lion-pytorch's Lion. madgrad_wd: madgrad's MADGRAD with decoupled decay. sm3: pytorch-optimizer's SM3.
    """
    kind, params = c.optimizer_kind, dict(c.optimizer.get("params") or {})
    params.pop("lr", None)
    groups = param_groups(model, c.weight_decay)
    lr = c.learning_rate
    if kind in ("adam", "adamw"):
        if c.use_bnb_optimizer:
            try:
                import bitsandbytes
            except ImportError:
                raise UserError(f"{c.where('use_bnb_optimizer')}: use_bnb_optimizer needs bitsandbytes, which is "
                                "not installed; `pip install bitsandbytes` or set use_bnb_optimizer: false") from None
            return bitsandbytes.optim.Adam8bit(groups, lr=lr, betas=c.adam_betas, eps=c.adam_eps)
        fused = torch.cuda.is_available()
        return torch.optim.AdamW(groups, lr=lr, betas=c.adam_betas, eps=c.adam_eps, fused=fused,
                                 foreach=None if fused else True)
    if c.use_bnb_optimizer:
        log.warning("use_bnb_optimizer is for optimizer type adam (as upstream); %s does not use it", kind)
    try:
        if kind == "cpu_adam":
            return _cpu_adam(c, groups, params)
        if kind == "cpu_torch_adam":
            return torch.optim.AdamW(groups, lr=lr, betas=c.adam_betas, eps=c.adam_eps, foreach=True)
        if kind == "sgd":
            return torch.optim.SGD(groups, lr=lr, **params)
        if kind == "lion":
            lion = _library(c, "lion_pytorch", "lion-pytorch")
            return lion.Lion(groups, lr=lr, betas=tuple(params.get("betas", (0.9, 0.99))))
        if kind == "madgrad_wd":
            _library(c, "madgrad", "madgrad")
            return _madgrad_class()(_madgrad_groups(groups, params.get("momentum", 0.9)), lr=lr,
                                    decouple_decay=True, **params)
        if kind == "sm3":
            _library(c, "pytorch_optimizer", "pytorch-optimizer")
            if c.weight_decay:
                log.info("optimizer sm3 has no weight decay (as upstream's SM3): weight_decay %s has no effect",
                         c.weight_decay)
            return _sm3_class()(groups, lr=lr, **params)
    except ValueError as err:  # the library's check of a parameter (momentum out of range...)
        raise UserError(f"{c.where('optimizer')}: optimizer {kind}: {err}") from None
    raise UserError(f"{c.where('optimizer')}: optimizer type {kind!r} is not built")  # config/rules.py refuses it


def state_keys(c: NeoXConfig) -> tuple[str, ...]:
    """The optimizer's parameter-shaped state tensors, which log_optimizer_states logs (upstream logs every state
    entry but the step); SM3's row and column covers are not parameter-shaped, and are left out."""
    momentum = (c.optimizer.get("params") or {}).get("momentum", 0.9 if c.optimizer_kind == "madgrad_wd" else 0.0)
    return {"lion": ("exp_avg",),
            "sgd": ("momentum_buffer",) if momentum else (),
            "sm3": ("momentum_buffer",) if momentum else (),
            "madgrad_wd": ("grad_sum_sq", "s") + (("x0",) if momentum else ()),
            }.get(c.optimizer_kind, ("exp_avg", "exp_avg_sq"))


def _cpu_adam(c: NeoXConfig, groups: list[dict], params: dict):
    """DeepSpeedCPUAdam (cpu_adam_class); DeepSpeed JIT-builds its C++ op into TORCH_EXTENSIONS_DIR at first use
    (a minute or two), and a failed build is one line."""
    try:
        return _cpu_adam_class()(groups, lr=c.learning_rate, betas=c.adam_betas, eps=c.adam_eps,
                                 weight_decay=c.weight_decay,
                                 **{k: params[k] for k in ("bias_correction", "adamw_mode") if k in params})
    except RuntimeError as err:
        cause = str(err.__cause__ or err).strip()
        raise UserError(f"{c.where('optimizer')}: optimizer type cpu_adam: DeepSpeed could not build or load its "
                        "cpu_adam C++ op (it needs a C++ compiler and ninja; it builds into TORCH_EXTENSIONS_DIR): "
                        f"{cause.splitlines()[-1] if cause else type(err).__name__}; or use optimizer type "
                        "cpu_torch_adam") from None


@functools.cache
def _cpu_adam_class():
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    class CPUAdam(DeepSpeedCPUAdam):
        """DeepSpeedCPUAdam, resumed bit for bit. Its C++ op keeps beta^t as a running product from step 1 and
        recomputes it as pow(beta, t) when its first step is not 1 (a resumed run): the same number to the last
        bits only. Before that first step, the products are replayed on a one-element scratch tensor."""

        op_step = 0  # the last step the op was given

        def step(self, closure=None):
            steps = [self.state[p]["step"] for g in self.param_groups for p in g["params"] if self.state[p]]
            upcoming = (steps[0] + 1) if steps else 1
            if upcoming > self.op_step + 1:
                group = self.param_groups[0]
                scratch = [torch.zeros(1) for _ in range(4)]
                for t in range(self.op_step + 1, upcoming):
                    self.ds_opt_adam.adam_update(self.opt_id, t, 0.0, *group["betas"], group["eps"], 0.0,
                                                 group["bias_correction"], *scratch)
            loss = super().step(closure)
            self.op_step = max(self.op_step, upcoming)
            return loss

    return CPUAdam


def _library(c: NeoXConfig, module: str, package: str):
    """`module`, or one line naming the optimizer type that needs it and the package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{c.where('optimizer')}: optimizer type {c.optimizer_kind} needs {package}, which is not "
                        f"installed; `pip install -r requirements.txt` (it pins {package})") from None


def _madgrad_groups(groups: list[dict], momentum: float) -> list[dict]:
    """Upstream's madgrad_wd multiplies p by (1 - lr x wd) before MADGRAD averages p with momentum, so a step
    decays p by momentum x lr x wd (lr x wd with momentum 0); madgrad's decoupled decay subtracts lr x wd x p
    after the average. The same update: madgrad's decay is wd x momentum (wd when momentum is 0)."""
    scale = momentum if momentum else 1.0
    return [{**g, "weight_decay": g["weight_decay"] * scale} for g in groups]


@functools.cache
def _madgrad_class():
    import madgrad

    class MADGRAD(madgrad.MADGRAD):
        """madgrad's MADGRAD, two changes that keep its update: its step counter k lives in the param groups,
        not under a string key of `state` (DeepSpeed's ZeRO checkpoints keep the groups and only per-parameter
        state, so k would restart at 0 on resume); and a step at lr 0 (the loop's skipped step after a
        non-finite loss) changes nothing: MADGRAD would still move p towards its dual-averaging point."""

        def step(self, closure=None):
            if all(g["lr"] == 0 for g in self.param_groups):
                return closure() if closure is not None else None
            self.state["k"] = torch.tensor([int(self.param_groups[0].get("k", 0))], dtype=torch.long)
            loss = super().step(closure)
            k = int(self.state.pop("k"))
            for g in self.param_groups:
                g["k"] = k
            return loss

    return MADGRAD


@functools.cache
def _sm3_class():
    import pytorch_optimizer

    class SM3(pytorch_optimizer.SM3):
        """pytorch-optimizer's SM3 without the parameter-sized momentum buffer it allocates even at momentum 0
        (upstream's keeps none then: SM3's point is memory)."""

        def init_group(self, group, **kwargs):
            super().init_group(group, **kwargs)
            if not group["momentum"]:
                for p in group["params"]:
                    self.state[p].pop("momentum_buffer", None)

    return SM3


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
    """The DeepSpeed engine training runs: the optimizer + the LR schedule, ZeRO, bf16 with fp32 masters, clipping."""
    import deepspeed

    if parallel.sum_sequence_parallel_grads(model) and c.partition_activations and not c.sequence_parallel:
        log.info("partition_activations: true runs as sequence_parallel: true (checkpointed layer inputs are "
                 "split over the tensor-parallel group)")
    if parallel.reduce_expert_parallel_grads(model):  # EP > 1: DeepSpeed's data parallelism is expert-data-parallel
        world //= parallel.ep_size()  # its batch: micro x accumulation x expert-data-parallel ranks
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