"""What upstream gpt-neox logs beside the loss, each behind its key, and its profilers.

`StepLogger` writes one metrics row per step (metrics.jsonl, TensorBoard, W&B, Comet) with upstream's names:

    log_grad_norm            gradient_norms/NAME         the parameter's gradient norm, before clipping
    log_grad_pct_zeros       pct_grad_zeros/NAME         100 x the fraction of its gradient entries that are 0
    log_param_norm           parameter_norms/NAME        the parameter's norm after the update
    log_optimizer_states     optimizer_state_norms/I_KEY the norm of each state tensor of parameter I (Adam's
                                                         exp_avg / exp_avg_sq, other types': optim.state_keys;
                                                         I counts parameters in the optimizer's group order)
    log_gradient_noise_scale noise_scale                 B_simple of arXiv:1812.06162 (upstream: train/noise_scale)

NAME is the parameter's name in this model. Gradients are read between the last backward and the update, so
under ZeRO and bf16 they are DeepSpeed's full fp32 gradients (deepspeed.utils.safe_get_full_grad); a
tensor-parallel slice's squares are summed over the tensor-parallel group, so every norm is the whole tensor's.

`Profilers` runs the torch profiler (`profile`) and the CUDA memory snapshot (`memory_profiling`) over the
steps profile_step_start..profile_step_stop, as upstream schedules them.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import torch
import torch.distributed as dist

from neox_fork.parallel import groups as parallel
from neox_fork.training.optim import state_keys

log = logging.getLogger("neox_fork")


def _full_grad(p: torch.nn.Parameter) -> torch.Tensor | None:
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(p)


def _optimizer_state(engine, p: torch.nn.Parameter, key: str) -> torch.Tensor | None:
    from deepspeed.utils import safe_get_full_optimizer_state

    try:
        value = safe_get_full_optimizer_state(p, key)
    except ValueError:  # DeepSpeed links a group's moments on its first step, before the later groups have any
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
        value = safe_get_full_optimizer_state(p, key)
    if value is None:  # no ZeRO / bf16 wrapper: the torch optimizer holds the parameter itself
        value = getattr(engine.optimizer, "state", {}).get(p, {}).get(key)
    return value


def _tp_sum(values: torch.Tensor, split: torch.Tensor) -> torch.Tensor:
    """Per-parameter sums whose tensor-parallel slices (`split` true) are summed over the TP group."""
    if parallel.tp_size() > 1:
        part = values * split
        dist.all_reduce(part, group=parallel.parallel_state.get_tensor_model_parallel_group())
        values = torch.where(split.bool(), part, values)
    return values


class GradientNoiseScale:
    """Upstream's estimator: B_small is one step's batch, B_big `n_batches` steps' gradients averaged.

        |G|^2  ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
        tr(S)  ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)
        noise_scale = EMA(tr(S)) / EMA(|G|^2), each a bias-corrected EMA with beta 0.99 over updates.
    """

    def __init__(self, batch_size: int, n_batches: int, cpu_offload: bool = False, beta: float = 0.99):
        self.b_small, self.b_big, self.n_batches = batch_size, batch_size * n_batches, n_batches
        self.beta, self.cpu_offload = beta, cpu_offload
        self.buffer: list[torch.Tensor] | None = None
        self.ema_trace = self.ema_g2 = None
        self.updates = 0
        self.noise_scale: float | None = None

    def _ema(self, avg, value):
        avg = (avg or 0.0) * self.beta + (1 - self.beta) * value
        return avg, avg / (1 - self.beta ** (self.updates + 1))

    def update(self, grads: list[torch.Tensor], sq_norm) -> None:
        """One step's gradients; `sq_norm(list of tensors)` gives their squared norm (TP-aware)."""
        grads = [g.detach().float().cpu() if self.cpu_offload else g.detach().float().clone() for g in grads]
        if not all(torch.isfinite(g).all() for g in grads):
            return  # upstream skips a step with an overflow
        self.buffer = grads if self.buffer is None else [b + g for b, g in zip(self.buffer, grads)]
        if self.updates % self.n_batches == self.n_batches - 1:
            big = [b / self.n_batches for b in self.buffer]
            self.buffer = None
            g_big, g_small = sq_norm(big), sq_norm(grads)
            g2 = (self.b_big * g_big - self.b_small * g_small) / (self.b_big - self.b_small)
            trace = (g_small - g_big) / (1 / self.b_small - 1 / self.b_big)
            self.ema_g2, g2 = self._ema(self.ema_g2, g2)
            self.ema_trace, trace = self._ema(self.ema_trace, trace)
            self.noise_scale = trace / g2
        self.updates += 1


class StepLogger:
    """The per-step diagnostics the log_* keys ask for; call `before_update` and `after_update` on every rank."""

    def __init__(self, c, engine, metrics, global_batch: int):
        self.c, self.engine, self.metrics = c, engine, metrics
        self.named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        self.split = torch.tensor([float(getattr(p, "tensor_model_parallel", False)) for _, p in self.named],
                                  dtype=torch.float64)
        self.noise = (GradientNoiseScale(global_batch, c.gradient_noise_scale_n_batches,
                                         c.gradient_noise_scale_cpu_offload) if c.log_gradient_noise_scale else None)
        self.wants_grads = c.log_grad_norm or c.log_grad_pct_zeros or self.noise is not None
        self.active = self.wants_grads or c.log_param_norm or c.log_optimizer_states
        self.row: dict = {}

    def _per_param(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=parallel.device())
        return _tp_sum(t, self.split.to(t.device)).tolist()

    def _sq_norm(self, tensors: list[torch.Tensor]) -> float:
        return sum(self._per_param([float(t.float().pow(2).sum()) for t in tensors]))

    def before_update(self) -> None:
        """Read the gradients of this step (all micro-batches, averaged over data-parallel ranks)."""
        self.row = {}
        if not self.wants_grads:
            return
        grads = [_full_grad(p) for _, p in self.named]
        present = [(name, g) for (name, _), g in zip(self.named, grads) if g is not None]
        if len(present) != len(grads):
            log.warning("log_grad_norm/log_grad_pct_zeros/log_gradient_noise_scale: DeepSpeed returned no gradient "
                        "for %s; not logged this step", self.named[len(present)][0])
            return
        if self.c.log_grad_norm:
            sq = self._per_param([float(g.float().pow(2).sum()) for g in grads])
            self.row.update({f"gradient_norms/{n}": v ** 0.5 for (n, _), v in zip(self.named, sq)})
        if self.c.log_grad_pct_zeros:
            zeros = self._per_param([float((g == 0).sum()) for g in grads])
            sizes = self._per_param([float(g.numel()) for g in grads])
            self.row.update({f"pct_grad_zeros/{n}": 100.0 * z / s for (n, _), z, s in zip(self.named, zeros, sizes)})
        if self.noise is not None:
            self.noise.update(grads, self._sq_norm)

    def after_update(self, iteration: int) -> None:
        if not self.active:
            return
        row = self.row
        if self.c.log_param_norm:
            sq = self._per_param([float(p.detach().float().pow(2).sum()) for _, p in self.named])
            row.update({f"parameter_norms/{n}": v ** 0.5 for (n, _), v in zip(self.named, sq)})
        if self.c.log_optimizer_states:
            ordered = [p for group in self.engine.optimizer.param_groups for p in group["params"]]
            index = {id(p): i for i, p in enumerate(ordered)}
            for key in state_keys(self.c):
                found = [(name, p, _optimizer_state(self.engine, p, key)) for name, p in self.named]
                sq = self._per_param([float(s.float().pow(2).sum()) if s is not None else 0.0 for _, _, s in found])
                for (name, p, s), v in zip(found, sq):
                    if s is not None:
                        row[f"optimizer_state_norms/{index.get(id(p), name)}_{key}"] = v ** 0.5
        if self.noise is not None and self.noise.noise_scale is not None:
            row["noise_scale"] = self.noise.noise_scale
        if row:
            self.metrics.write({"iteration": iteration, **row})
        self.row = {}




class Profilers:
    """`profile`: torch.profiler over steps profile_step_start..profile_step_stop (upstream's schedule: wait
    start steps, warm up one, record stop - start), one Chrome trace per rank, `rankN.*.pt.trace.json`, in
    tensorboard_dir (else save). `memory_profiling`: CUDA allocation history from the start, a snapshot
    `mem_snapshot.pickle` in memory_profiling_path after each profiled step on rank 0."""

    def __init__(self, c):
        self.c, self.prof, self.memory = c, None, False
        self.steps = 0
        if c.memory_profiling:
            if torch.cuda.is_available():
                torch.cuda.memory._record_memory_history(max_entries=100_000)
                self.memory = True
            else:
                log.warning("memory_profiling: needs a CUDA device; no memory snapshot is written on this one")
        if c.profile:
            folder = c.tensorboard_dir or c.save
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=c.profile_step_start, warmup=1,
                                                 active=c.profile_step_stop - c.profile_step_start),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(folder, worker_name=f"rank{dist.get_rank()}"),
                record_shapes=True, profile_memory=True, with_flops=True, with_modules=True, with_stack=True)
            self.prof.start()
            log.info("profile: torch profiler trace of steps %d..%d goes to %s", c.profile_step_start,
                     c.profile_step_stop, folder)

    def before_step(self) -> None:
        if self.prof is not None:
            self.prof.step()

    def after_step(self) -> None:
        """After the step this process ran as its `steps`-th (0-based), as upstream counts."""
        c, step = self.c, self.steps
        self.steps += 1
        if self.prof is not None and step == c.profile_step_stop:
            self.stop()
        if self.memory and c.profile_step_start <= step <= c.profile_step_stop and dist.get_rank() == 0:
            folder = Path(c.memory_profiling_path)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".mem_snapshot.pickle.{os.getpid()}"
            with open(tmp, "wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)
            os.replace(tmp, folder / "mem_snapshot.pickle")

    def stop(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None
        if self.memory and self.steps > self.c.profile_step_stop:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.memory = False
