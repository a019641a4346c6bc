"""The training loop: set up a rank, then step, log, evaluate and save until done or told to stop.

One `pretrain(config)` call per rank. The flow:

    process groups -> seed -> tokenizer -> data checks -> model -> engine (training/optim.py)
    -> resume (training/state.py) -> loop: train_step, log, eval, save, react to SIGTERM/SIGUSR1

The state on disk (save, resume, a change of layout) lives in training/state.py, the LR schedule, optimizer and
DeepSpeed engine in training/optim.py.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from neox_fork.perf import flops
from neox_fork.parallel import groups as parallel
from neox_fork.checkpoint import universal
from neox_fork.config.neox_config import NeoXConfig
from neox_fork.config.loading import log_ignored_settings
from neox_fork.data.loader_workers import ends_loader_workers
from neox_fork.errors import UserError
from neox_fork.launch.launcher import launcher_environment
from neox_fork.training import faults
from neox_fork.training.metrics import MetricsWriter, progress_line
from neox_fork.model import moe
from neox_fork.model.shape import count_parameters
from neox_fork.model.transformer import build_model
from neox_fork.training.optim import build_engine, deepspeed_skipped_update, skip_update, unchecked_nonfinite_grads
from neox_fork.training.preference import Objective, reference_for_run
from neox_fork.training.step_logging import Profilers, StepLogger
from neox_fork.training.state import (TrainState, fail_if_asked, finish_pending, resume, save, test_failure,
                                     warn_if_no_room)
from neox_fork.training.watchdog import Watchdog, hang_if_asked

log = logging.getLogger("neox_fork")
placement_log = logging.getLogger("neox_fork.placement")


# ---------------------------------------------------------------------- signals
class StopSignal:
    """SIGTERM/SIGUSR1 (Slurm preemption) and SIGINT (Ctrl-C, or deepy passing one on) ask for a checkpoint
    at the next step boundary and a clean exit."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the save
        self.received = signum
        log.warning("received %s: will save a checkpoint and exit after this step", signal.Signals(signum).name)

    def finished(self) -> None:
        """Training is over and saved: a late copy of a stop signal (another host's, passed on by deepy after
        this rank already stopped with the others) must not kill the rank on its way out."""
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)

    def any_rank(self) -> bool:
        return parallel.any_rank(self.received is not None)


def _rank0() -> bool:
    return dist.get_rank() == 0


def _dp_mean(value: torch.Tensor) -> float:
    value = value.detach().float().clone().to(parallel.device())
    dist.all_reduce(value, group=parallel.parallel_state.get_data_parallel_group())
    return value.item() / parallel.dp_size()


def _dp_means(values: torch.Tensor) -> list[float]:
    """Each entry averaged over the data-parallel ranks, in one all-reduce."""
    values = values.detach().float().to(parallel.device())
    dist.all_reduce(values, group=parallel.parallel_state.get_data_parallel_group())
    return (values / parallel.dp_size()).tolist()


def setup_logging() -> None:
    """Rank 0 logs progress, the others warnings only; every line names the rank and its host."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank {rank} {socket.gethostname()}] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    placement_log.setLevel(logging.INFO)  # where each rank runs: one line from every rank
    for noisy in ("megatron", "megatron.core", "DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---------------------------------------------------------------------- data
def build_data(c: NeoXConfig, tokenizer, world_size: int):
    if c.dataset_impl == "pairwise":
        from neox_fork.data.pairwise import build_pairwise

        return build_pairwise(c, world_size)
    if c.train_impl == "kto":
        from neox_fork.data.pairwise import build_kto

        return build_kto(c, tokenizer, world_size)
    from neox_fork.data.datasets import DataSettings, build_datasets

    train, valid, _ = build_datasets(DataSettings.from_config(c, world_size), tokenizer)
    return train, valid


class _FailingSamples(torch.utils.data.Dataset):
    """Test-only (training_state.TEST_FAIL_ENV): a dataset whose samples from `first` on raise, in the
    data-loader worker that reads them."""

    def __init__(self, dataset, first: int):
        self.dataset, self.first = dataset, first

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if index >= self.first:
            raise RuntimeError(f"injected failure in data at sample {index} (for tests)")
        return self.dataset[index]


def batches(dataset, c: NeoXConfig, consumed_samples: int, skip: bool = False):
    """This rank's micro-batches from `consumed_samples` on; with `skip`, never those of the steps in
    skip_train_iteration_ranges."""
    from neox_fork.data.datasets import build_batch_iterator, skipped_sample_ranges

    if not parallel.reads_data():  # a middle pipeline stage: activations come from the stage before
        return iter(())
    fail_at = test_failure("data")
    if fail_at is not None:
        dataset = _FailingSamples(dataset, (fail_at - 1) * c.global_batch_size(dist.get_world_size()))
    return build_batch_iterator(dataset, consumed_samples=consumed_samples,
                                micro_batch_size=c.train_micro_batch_size_per_gpu,
                                data_parallel_rank=parallel.dp_rank(), data_parallel_size=parallel.dp_size(),
                                num_workers=min(c.num_workers, 2),
                                skip_sample_ranges=skipped_sample_ranges(
                                    c.skip_train_iteration_ranges if skip else (),
                                    c.global_batch_size(dist.get_world_size())))



# ---------------------------------------------------------------------- evaluation
@ends_loader_workers  # the validation batches' workers
@torch.no_grad()
def evaluate(engine, c: NeoXConfig, valid, objective: Objective | None = None) -> float | None:
    if valid is None or not c.eval_iters:
        return None
    if c.pipe_parallel_size > 1:
        from neox_fork.training import pipeline as pipeline_stages

        return pipeline_stages.evaluate(engine, batches(valid, c, 0), c.eval_iters)
    engine.eval()
    it = batches(valid, c, 0)
    losses = []
    for _ in range(c.eval_iters):
        try:
            batch = next(it)
        except StopIteration:
            break
        batch = parallel.context_slice({k: v.to(parallel.device()) for k, v in batch.items()})
        if objective is not None and objective.impl != "normal":  # training/preference.py: the objective's mean
            losses.append(objective(engine, batch)[0].float())
        elif "segment_ids" in batch:  # masked: the sum over trained tokens, divided by their count below
            losses.append(torch.stack([_model_loss(engine, batch, 1.0), batch["loss_mask"].sum().float()]))
        else:
            losses.append(parallel.context_sum(_model_loss(engine, batch).float()))
    engine.train()
    if not losses:
        return None
    if losses[0].dim():  # the mean over every rank's trained tokens, as the training loss
        total = torch.stack(losses).sum(0).to(parallel.device())
        dist.all_reduce(total, group=parallel.data_and_context_group())  # every rank's slices of the sequences
        return (total[0] / total[1].clamp(min=1.0)).item()
    return _dp_mean(torch.stack(losses).mean())


def _model_loss(engine, batch: dict, denominator=None) -> torch.Tensor:
    """The model's loss on a batch on the device; masked batches (data/labeled.py, or pretraining with
    reset_attention_mask / reset_position_ids) bring segments and positions, and a `denominator` replaces the
    batch's own trained-token count where there are segments."""
    extra = {key: batch[key] for key in ("position_ids", "segment_ids") if key in batch}
    if "segment_ids" in batch:
        extra["loss_denominator"] = denominator
    return engine(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"], **extra)


def evaluate_tasks(engine, c: NeoXConfig, tokenizer) -> dict[str, float]:
    """lm-eval tasks (`eval_tasks`) on the current weights, as {"task/metric": value} on rank 0.

    The tensor-parallel group of data-parallel rank 0 computes them together; other ranks wait.
    """
    from neox_fork.inference.evaluation import evaluate_model

    flat: dict[str, float] = {}
    if parallel.dp_rank() == 0:
        out = evaluate_model(engine.module, tokenizer, list(c.eval_tasks), batch_size=c.eval_batch_size or 8,
                             max_length=c.seq_length)
        for task, values in out.get("results", {}).items():
            for metric, value in values.items():
                if isinstance(value, (int, float)) and "stderr" not in metric and metric != "alias":
                    flat[f"{task}/{metric.split(',')[0]}"] = float(value)
    dist.barrier()
    return flat


# ---------------------------------------------------------------------- the step
def _forward_backward(engine, batch: dict, params: list[torch.nn.Parameter], objective: Objective,
                      denominator: float | None = None, fault: str | None = None) -> tuple[float, bool, dict]:
    """One micro-batch's loss (the `train_impl` objective: training/preference.py, or the language-modelling loss),
    its metrics and gradient; a non-finite loss backpropagates zeros instead of NaNs. `fault` (tests only,
    faults.injected_fault): "grads" makes the gradients NaN behind a finite loss, "spike" multiplies the loss by 50."""
    batch = parallel.context_slice({k: v.to(parallel.device()) for k, v in batch.items()})
    if objective.impl == "normal":
        loss, metrics = _model_loss(engine, batch, denominator), {}
    else:
        loss, metrics = objective(engine, batch)
    if fault == "grads":
        loss = faults.NanGradient.apply(loss)
    elif fault == "spike":
        loss = loss * 50.0
    finite = bool(torch.isfinite(loss))
    if not finite:
        loss = sum(p.sum() * 0.0 for p in params)
    engine.backward(loss)
    return parallel.context_sum(loss).item(), finite, metrics


def train_step(engine, c: NeoXConfig, micro_batches, params: list[torch.nn.Parameter],
               before_update=None, objective: Objective | None = None, metrics: dict | None = None,
               fault: str | None = None) -> tuple[float, str | None]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches from the iterator `micro_batches`
    (dicts of tokens, labels, loss_mask). A non-finite loss, or non-finite gradients that DeepSpeed would apply
    (fp32 without ZeRO), on any rank makes the update run at lr 0 on zero gradients, so every rank stays in
    step; DeepSpeed skips the others itself. `before_update()` runs once the step's gradients are complete
    (train_logging). The objective's metrics (DPO's rewards...), averaged over the micro-batches, go into
    `metrics`. Returns (mean loss on this rank, why the update was skipped or None).
    tools/benchmark.py --path engine times exactly this."""
    n = c.gradient_accumulation_steps
    if c.moe_num_experts > 1:  # the pipeline's backward scales the loss by 1 / n as DeepSpeed's does
        moe.set_aux_loss_scale(1.0 / n)
    if c.pipe_parallel_size > 1:  # the micro-batches run in DeepSpeed's pipeline schedule
        from neox_fork.training import pipeline as pipeline_stages

        moe_metrics = metrics if c.moe_num_experts > 1 else None
        return pipeline_stages.train_step(engine, micro_batches, before_update, moe_metrics)
    objective = objective or Objective(c)
    losses, finite = [], []
    step_batches = [next(micro_batches) for _ in range(n)]
    denominator = _masked_denominator(step_batches)
    for batch in step_batches:
        loss, ok, micro = _forward_backward(engine, batch, params, objective, denominator, fault)
        if metrics is not None:
            for key, value in micro.items():
                metrics[key] = metrics.get(key, 0.0) + value / n
            if c.moe_num_experts > 1:
                moe.add_step_metrics(metrics, engine.module, n)
        losses.append(loss)
        finite.append(ok)
        if len(losses) < n:
            engine.step()  # DeepSpeed counts micro-batches here and updates only at the boundary
    bad_loss, bad_grads = parallel.any_ranks(not all(finite), unchecked_nonfinite_grads(engine, params))
    if bad_loss or bad_grads:
        skip_update(engine, params if bad_grads else ())
    if before_update is not None:
        before_update()
    engine.step()
    by_deepspeed = deepspeed_skipped_update(engine, parallel.device())  # every rank, every step: a collective
    skipped = "loss is NaN/inf on some rank" if bad_loss else "gradients are NaN/inf" if bad_grads else by_deepspeed
    return sum(loss / n for loss in losses), skipped


def _masked_denominator(step_batches: list[dict]) -> float | None:
    """For batches with segments (data/labeled.py, or pretraining with reset_attention_mask): the trained tokens
    of the whole global batch (all micro-batches, all data-parallel ranks) over n x dp. DeepSpeed averages the
    micro-batches' gradients over n and the data-parallel ranks (and sums the context-parallel ranks', which
    hold slices of the same sequences), so each micro-batch's masked sum divided by this makes the step's loss
    the sum over every trained token of the global batch over their number, whatever the split into
    micro-batches and ranks. None for other pretraining batches (each micro-batch's own mean, as upstream).
    The step's batches are whole sequences here (every CP rank of a data-parallel rank reads the same)."""
    if "segment_ids" not in step_batches[0]:
        return None
    count = torch.tensor([float(sum(b["loss_mask"].sum().item() for b in step_batches))], device=parallel.device())
    dist.all_reduce(count, group=parallel.parallel_state.get_data_parallel_group())
    return max(count.item(), 1.0) / (len(step_batches) * parallel.dp_size())


# ---------------------------------------------------------------------- the loop
@dataclass
class Run:
    """What one rank holds while it trains."""
    c: NeoXConfig
    engine: object
    model: torch.nn.Module
    tokenizer: object
    train_data: object
    valid_data: object
    state: TrainState
    world: int
    objective: Objective
    flops_per_token: flops.FlopsPerToken  # of the whole model (counted before a pipeline stage keeps its part)


def setup(c: NeoXConfig) -> Run:
    """Process groups, seed, tokenizer, data, model, engine, and the state resumed from `load`."""
    c = universal.resolve_load(c)  # before the engine: DeepSpeed takes load_universal when it is built
    parallel.initialize(c.model_parallel_size, c.distributed_backend, c.distributed_timeout_minutes,
                        c.pipe_parallel_size, context_parallel_size=c.context_parallel_size,
                        expert_parallel_size=c.expert_model_parallel_size)
    world = dist.get_world_size()
    placement_log.info("rank %d/%d on host %s: local rank %s, pid %d, tensor-parallel rank %d, context-parallel "
                       "rank %d, data-parallel rank %d", dist.get_rank(), world, socket.gethostname(),
                       os.environ.get("LOCAL_RANK", "0"), os.getpid(), parallel.tp_rank(), parallel.cp_rank(),
                       parallel.dp_rank())
    c.check_world_size(world)
    if _rank0():
        log_ignored_settings(c)
    parallel.seed_everything(c.seed)

    from neox_fork.data.tokenizer import TokenizerSource

    if not c.vocab_file and c.tokenizer_type.lower() != "charleveltokenizer":
        raise UserError(f"{c.where('vocab_file')}: vocab_file is not set; point it at the {c.tokenizer_type} "
                        "tokenizer's file")
    tokenizer = TokenizerSource.of_config(c).build()
    if c.train_epochs is not None:
        from neox_fork.data.datasets import train_iters_for_epochs

        c = train_iters_for_epochs(c, tokenizer, world)
    train_data, valid_data = build_data(c, tokenizer, world)
    model = build_model(c, tokenizer.vocab_size)
    flops_per_token = flops.training_flops_per_token(model, c.seq_length, c.activation_recompute, parallel.tp_size())
    if c.pipe_parallel_size > 1:  # `model` keeps this stage's part; the engine trains the stage
        from neox_fork.training.pipeline import build_pipeline_engine

        engine = build_pipeline_engine(c, model, world)
    else:
        engine = build_engine(c, model, world)
    state = TrainState()
    resume(engine, model, c, state)
    if c.adapter == "qlora":  # the loaded base into 4-bit NF4 (model/adapters.py); the adapters stay as they are
        from neox_fork.model.adapters import quantize_base

        log.info("qlora: %d base linears in 4-bit NF4", quantize_base(model))
    state.reference = reference_for_run(c, engine.module, state.resumed_from)
    return Run(c, engine, model, tokenizer, train_data, valid_data, state, world, Objective(c, state.reference),
               flops_per_token)


class Progress:
    """The progress line and metrics row every `log_interval` steps, averaged over the steps since the last."""

    def __init__(self, run: Run, metrics: MetricsWriter):
        c, model = run.c, run.model
        self.run, self.metrics = run, metrics
        self.flops_per_token = run.flops_per_token
        self.peak = flops.device_peak_flops()
        self.tokens_per_step = c.global_batch_size(run.world) * c.seq_length
        self.started = self.window_start = time.time()
        self.first_iteration = run.state.iteration
        self.steps = self.count = 0
        self.loss = 0.0
        self.extra: dict[str, float] = {}  # the objective's metrics (training/preference.py), summed like the loss
        if _rank0():
            context = f" x context {parallel.cp_size()}" if parallel.cp_size() > 1 else ""
            log.info("model: %d parameters; world %d = tensor %d%s x data %d; global batch %d x %d tokens; %s; "
                     "FLOPs per token %d (hardware %d, recompute %s)", count_parameters(model.shape), run.world,
                     c.model_parallel_size, context, parallel.dp_size(), c.global_batch_size(run.world), c.seq_length,
                     c.dtype_name, self.flops_per_token.model, self.flops_per_token.hardware, c.activation_recompute)

    def add(self, step_loss: float | None, metrics: dict | None = None) -> float | None:
        """One step done; its loss (None for a skipped step) and the objective's metrics join the average.
        Returns the loss averaged over data-parallel ranks (None for a skipped step)."""
        self.steps += 1
        if step_loss is not None:
            keys = sorted(metrics or {})
            means = _dp_means(torch.stack([torch.tensor(float(step_loss))] +
                                          [torch.as_tensor(metrics[k]).float().cpu() for k in keys]))
            self.loss += means[0]
            for k, v in zip(keys, means[1:]):
                self.extra[k] = self.extra.get(k, 0.0) + v
            self.count += 1
            return means[0]
        return None

    def maybe_report(self) -> None:
        c, state, now = self.run.c, self.run.state, time.time()
        if not self.count or not (state.iteration % c.log_interval == 0 or state.iteration == c.train_iters):
            return
        tokens_per_sec = self.tokens_per_step * self.steps / max(now - self.window_start, 1e-9)
        grad_norm = self.run.engine.get_global_grad_norm()
        m = {
            "iteration": state.iteration,
            "lm_loss": self.loss / self.count,
            "lr": self.run.engine.lr_scheduler.lr_for(self.run.engine.lr_scheduler.last_epoch - 1),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_sec": tokens_per_sec,
            "mfu": flops.mfu(tokens_per_sec, self.flops_per_token.model, self.run.world, self.peak),
            "hfu": flops.mfu(tokens_per_sec, self.flops_per_token.hardware, self.run.world, self.peak),
            "consumed_samples": state.consumed_samples,
            "elapsed_sec": now - self.started,
            "eta_sec": (now - self.started) / max(state.iteration - self.first_iteration, 1)
            * (c.train_iters - state.iteration),
        }
        m.update({k: v / self.count for k, v in self.extra.items()})
        if _rank0():
            log.info(progress_line(m, c.train_iters))
        self.metrics.write(m)
        self.window_start, self.steps, self.count, self.loss, self.extra = now, 0, 0, 0.0, {}


def run_evaluations(run: Run, metrics: MetricsWriter) -> None:
    """Validation loss and `eval_tasks` on the current weights."""
    iteration = run.state.iteration
    fail_if_asked("eval", iteration)
    eval_loss = evaluate(run.engine, run.c, run.valid_data, run.objective)
    if eval_loss is not None:
        if _rank0():
            log.info("step %d: validation loss %.4f (ppl %.2f)", iteration, eval_loss, math.exp(min(eval_loss, 50)))
        metrics.write({"iteration": iteration, "eval_lm_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50))})
    task_metrics = {}
    if run.c.eval_tasks and run.c.pipe_parallel_size > 1:
        if _rank0():
            log.warning("eval_tasks are not run during pipelined training (no rank holds the whole model); run "
                        "eval.py on the checkpoint")
    elif run.c.eval_tasks:
        task_metrics = evaluate_tasks(run.engine, run.c, run.tokenizer)
    if task_metrics:
        log.info("step %d: %s", iteration, ", ".join(f"{k} {v:.4f}" for k, v in task_metrics.items()))
        metrics.write({"iteration": iteration, **task_metrics})


@ends_loader_workers  # whoever holds the iterators (DeepSpeed's pipeline engine does): data/loader_workers.py
def pretrain(c: NeoXConfig) -> int:
    """Train as the config says; returns the last iteration. Run on every rank."""
    launcher_environment(c.deepspeed_slurm, c.deepspeed_mpi)
    setup_logging()
    stop = StopSignal()  # before the slow start-up, so a signal during it still ends in a save
    watchdog = Watchdog(c, int(os.environ.get("RANK", "0")))
    watchdog.arm("init", "start-up and the first step")
    run = setup(c)
    c, engine, state = run.c, run.engine, run.state
    if state.iteration >= c.train_iters:
        log.info("nothing to do: the checkpoint is at iteration %d and train_iters is %d; no step was run",
                 state.iteration, c.train_iters)
    warn_if_no_room(c, run.model)
    metrics = MetricsWriter(c, enabled=_rank0())
    progress = Progress(run, metrics)
    train_iter = batches(run.train_data, c, state.consumed_samples, skip=True)
    params = [p for p in run.model.parameters() if p.requires_grad]
    step_log, profilers = StepLogger(c, engine, metrics, c.global_batch_size(run.world)), Profilers(c)
    skipper, spikes = faults.BatchSkipper(c, c.global_batch_size(run.world)), faults.LossSpikes(c)
    if state.iteration == 0 and 0 in (c.extra_save_iters or []):
        save(engine, c, state)
    first_step = state.iteration + 1
    while state.iteration < c.train_iters:
        if state.iteration + 1 > first_step:
            watchdog.arm("train", f"step {state.iteration + 1}")
        skipped = None
        if not skipper.skip(engine, state, metrics):  # a step of skip_train_iteration_ranges reads and trains nothing
            profilers.before_step()
            step_metrics: dict = {}
            step_loss, skipped = train_step(engine, c, train_iter, params, step_log.before_update, run.objective,
                                            step_metrics, faults.injected_fault(state.iteration + 1))
            profilers.after_step()
            state.iteration += 1
            step_log.after_update(state.iteration)
            fail_if_asked("step", state.iteration)
            hang_if_asked(dist.get_rank(), state.iteration, "step")
            state.consumed_samples += c.global_batch_size(run.world)
            faults.check_nan_steps(c, state, skipped, metrics)  # a skipped step still saves and checks signals below
            mean_loss = progress.add(None if skipped else step_loss, step_metrics)
            progress.maybe_report()
            spikes.check(engine, state, mean_loss, metrics)  # a spike saves and stops
        finish_pending(c, state, wait=False)  # an async_save whose files every rank has written is published
        if state.iteration % c.eval_interval == 0 and not skipped:
            watchdog.arm("eval", f"evaluation at step {state.iteration}")
            run_evaluations(run, metrics)
        if (c.save_every and state.iteration % c.save_every == 0) or state.iteration in (c.extra_save_iters or []):
            watchdog.arm("save", f"save at step {state.iteration}")
            hang_if_asked(dist.get_rank(), state.iteration, "save")
            save(engine, c, state)
        if c.exit_interval and state.iteration % c.exit_interval == 0:
            log.info("exit_interval %d reached at step %d", c.exit_interval, state.iteration)
            break
        if stop.any_rank():
            log.warning("stopping at step %d on signal", state.iteration)
            break

    profilers.stop()
    watchdog.arm("save", f"save at step {state.iteration}")
    save(engine, c, state)
    watchdog.close()
    stop.finished()
    metrics.close()
    return state.iteration
