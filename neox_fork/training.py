"""The training loop: DeepSpeed engine (ZeRO-1, bf16, clipping), LR schedule, eval, checkpoints, signals.

One `pretrain(config)` call per rank. The flow:

    process groups -> seed -> tokenizer -> data checks -> model -> AdamW + schedule -> DeepSpeed engine
    -> resume (`load`) -> loop: micro-batches, step, log, eval, save, react to SIGTERM/SIGUSR1

A run is reproducible from (config, checkpoint): the checkpoint holds the model, ZeRO optimizer shards,
the LR schedule, the iteration and consumed samples, and every rank's RNG state, so stopping at N and
resuming gives the same losses as an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from neox_fork import checkpoint, flops, parallel
from neox_fork.config import NeoXConfig, deepspeed_config, log_ignored_settings
from neox_fork.errors import UserError
from neox_fork.launch import launcher_environment
from neox_fork.metrics import MetricsWriter, progress_line
from neox_fork.model import build_model, count_parameters

log = logging.getLogger("neox_fork")
placement_log = logging.getLogger("neox_fork.placement")


# ---------------------------------------------------------------------- learning rate
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
    """Weight decay on matrices only: norms (weight and bias) and any bias get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(c: NeoXConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay); torch's fused kernel on CUDA, the foreach one on CPU."""
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(param_groups(model, c.weight_decay), lr=c.learning_rate, betas=c.adam_betas,
                             eps=c.adam_eps, fused=fused, foreach=None if fused else True)


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
        flag = torch.tensor([1.0 if self.received else 0.0], device=_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ---------------------------------------------------------------------- state
@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    nan_steps_in_a_row: int = 0
    last_saved: int | None = None


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _rank0() -> bool:
    return dist.get_rank() == 0


def _dp_mean(value: torch.Tensor) -> float:
    value = value.detach().float().clone().to(_device())
    dist.all_reduce(value, group=parallel.parallel_state.get_data_parallel_group())
    return value.item() / parallel.dp_size()


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
    from neox_fork.data.datasets import build_datasets

    gbs = c.global_batch_size(world_size)
    train, valid, _ = build_datasets(
        data_path=c.data_path, train_data_paths=c.train_data_paths, train_data_weights=c.train_data_weights,
        valid_data_paths=c.valid_data_paths, valid_data_weights=c.valid_data_weights,
        test_data_paths=c.test_data_paths, test_data_weights=c.test_data_weights, split=c.split,
        seq_length=c.seq_length, seed=c.seed, train_samples=c.train_iters * gbs,
        valid_samples=c.eval_iters * c.train_micro_batch_size_per_gpu * parallel.dp_size(),
        cache_dir=c.data_cache_path, tokenizer=tokenizer,
    )
    return train, valid


def batches(dataset, c: NeoXConfig, consumed_samples: int):
    from neox_fork.data.datasets import build_batch_iterator

    return build_batch_iterator(dataset, consumed_samples=consumed_samples,
                                micro_batch_size=c.train_micro_batch_size_per_gpu,
                                data_parallel_rank=parallel.dp_rank(), data_parallel_size=parallel.dp_size(),
                                num_workers=min(c.num_workers, 2))


# ---------------------------------------------------------------------- checkpoints
def save(engine, c: NeoXConfig, state: TrainState) -> None:
    """Everything needed to resume, written under global_stepN.partial and published when complete.

    A no-op without `save`, or when this iteration is already saved."""
    if not c.save or state.last_saved == state.iteration:
        return
    ckpt_dir = Path(c.save)
    partial = checkpoint.partial_dir(ckpt_dir, state.iteration)
    if _rank0():
        checkpoint.start_partial(ckpt_dir, state.iteration)
    dist.barrier()
    # the weights as GPT-NeoX writes them for this pipe_parallel_size (DeepSpeed's `module` replaced)
    module, layers = checkpoint.neox_weights(checkpoint.model_state(engine.module), c, parallel.tp_size())
    client_state = {"iteration": state.iteration, "consumed_samples": state.consumed_samples, "module": module}
    engine.save_checkpoint(str(ckpt_dir), tag=partial.name, client_state=client_state, save_latest=False)
    if parallel.dp_rank() == 0:
        checkpoint.save_layer_files(partial, parallel.tp_rank(), layers)
    torch.save({"rng": parallel.get_rng_state(), "tracker": parallel.RNG_TRACKER.state_dict()},
               partial / checkpoint.RNG_FILE.format(dist.get_rank()))
    if c.save_universal:
        save_universal(engine, engine.module, partial)
    if not _rank0() and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        checkpoint.fsync_tree(partial)  # this node's writes reach the disk before rank 0 publishes
    dist.barrier()
    if _rank0():
        checkpoint.save_config(partial, c)
        checkpoint.copy_tokenizer(partial, c.vocab_file)
        checkpoint.publish(partial, ckpt_dir, state.iteration)
        prune_checkpoints(ckpt_dir, c.keep_last_n_checkpoints)
        log.info("saved checkpoint %s", checkpoint.step_dir(ckpt_dir, state.iteration))
    dist.barrier()
    state.last_saved = state.iteration


def prune_checkpoints(ckpt_dir: Path, keep: int | None) -> None:
    if not keep:
        return
    for step in checkpoint.saved_steps(ckpt_dir)[:-keep]:
        shutil.rmtree(checkpoint.step_dir(ckpt_dir, step), ignore_errors=True)


class SafeLoads:
    """DeepSpeed's checkpoint engine with every file it reads going through checkpoint.read_file.

    engine.load_checkpoint unpickles model states and ZeRO shards itself, through
    `engine.checkpoint_engine.load` (all of its reads in DeepSpeed 0.19): routing that one method keeps
    DeepSpeed from running code from a checkpoint, and gives its corrupt files our one-line errors.
    """

    def __init__(self, inner, trust: bool):
        self.inner, self.trust = inner, trust

    def load(self, path, map_location=None):
        return checkpoint.read_file(path, self.trust)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def resume(engine, model, c: NeoXConfig, state: TrainState) -> None:
    """Continue from `load` (full state), or take weights only with `finetune: true`."""
    if not c.load:
        return
    if c.trust_checkpoint:
        log.warning("trust_checkpoint is on: files of %s are unpickled without restriction and can run code",
                    c.load)
    step = checkpoint.read_latest(c.load)
    if step is None:
        if Path(c.load) == Path(c.save or ""):  # first start of a run that saves and loads in one place
            log.info("no checkpoint in %s yet: starting from scratch", c.load)
            return
        raise UserError(f"load: '{c.load}' has no 'latest' file; point it at a checkpoint folder")
    folder = checkpoint.resolve(c.load, step)
    saved_tp = checkpoint.tp_size_of(folder)
    if c.finetune:
        load_weights_only(model, folder, c.trust_checkpoint)
        log.info("fine-tuning from the weights of %s", folder)
        return
    if saved_tp != c.model_parallel_size:
        resume_resharded(engine, model, c, state, folder, saved_tp)
        return
    if not isinstance(engine.checkpoint_engine, SafeLoads):
        engine.checkpoint_engine = SafeLoads(engine.checkpoint_engine, c.trust_checkpoint)

    def load_weights(src, dst):  # DeepSpeed's `module` (sequential or our names), else the layer files
        path = folder / checkpoint.MODEL_FILE.format(parallel.tp_rank())
        copy_weights(dst, checkpoint.weights_of_module(src, path) if src else None, folder, c.trust_checkpoint)

    _, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name, custom_load_fn=load_weights)
    state.iteration = client_state["iteration"]
    # GPT-NeoX keeps no sample count: its data position is iteration x global batch
    state.consumed_samples = client_state.get("consumed_samples",
                                              state.iteration * c.global_batch_size(dist.get_world_size()))
    state.last_saved = state.iteration
    rng_file = folder / checkpoint.RNG_FILE.format(dist.get_rank())
    if rng_file.is_file():
        saved = checkpoint.read_file(rng_file, c.trust_checkpoint)
        parallel.set_rng_state(saved["rng"])
        parallel.RNG_TRACKER.load_state_dict(saved["tracker"])
    log.info("resumed from %s at iteration %d (%d samples consumed)", folder, state.iteration,
             state.consumed_samples)


UNIVERSAL_FILE = "universal_mp_rank_{:02d}.pt"
_ADAM_STATES = ("exp_avg", "exp_avg_sq")


def _link_optimizer_states(engine) -> None:
    """Make every parameter's Adam moments reachable through DeepSpeed's safe_get/safe_set API.

    DeepSpeed 0.19 links them after the first parameter group's step, before the second group has
    any state, and never again, so the no-decay group stays unlinked; states missing before the first
    step (a run about to be resumed) are created here as torch's AdamW would create them.
    """
    wrapper = engine.optimizer
    base = wrapper.optimizer
    for group in base.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            if not base.state[p]:
                base.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32, device=p.device if on_device else "cpu"),
                                 "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    wrapper._hp_optimizer_states_linked = False
    wrapper._lazy_init_hp_params_optimizer_state()


def save_universal(engine, model, folder: Path) -> None:
    """Per TP rank, each parameter's fp32 master weight and Adam moments, gathered over the DP group."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _link_optimizer_states(engine)
    out = {"fp32": {}, **{k: {} for k in _ADAM_STATES}}
    for name, p in model.named_parameters():
        out["fp32"][name] = safe_get_full_fp32_param(p).cpu()
        for key in _ADAM_STATES:
            out[key][name] = safe_get_full_optimizer_state(p, key).cpu()
    base = engine.optimizer.optimizer
    steps = [s["step"] for s in base.state.values() if "step" in s]
    out["step"] = float(steps[0]) if steps else 0.0
    if parallel.dp_rank() == 0:
        torch.save(out, folder / UNIVERSAL_FILE.format(parallel.tp_rank()))


def resume_resharded(engine, model, c: NeoXConfig, state: TrainState, folder: Path, saved_tp: int) -> None:
    """Resume a checkpoint saved at another TP size from its universal optimizer files."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    files = [folder / UNIVERSAL_FILE.format(r) for r in range(saved_tp)]
    if not all(f.is_file() for f in files):
        raise UserError(f"checkpoint {folder} was saved at model_parallel_size {saved_tp} but this run uses "
                        f"{c.model_parallel_size}; it has no universal optimizer states (save_universal: true "
                        "when saving), so only `finetune: true` (weights only) can load it")
    saved = [checkpoint.read_file(f, c.trust_checkpoint) for f in files]
    tp, rank = parallel.tp_size(), parallel.tp_rank()
    mine = {key: checkpoint.split_tp(checkpoint.merge_tp_shards([s[key] for s in saved]), tp)[rank]
            for key in ("fp32", *_ADAM_STATES)}
    load_weights_only(model, folder, c.trust_checkpoint)
    _link_optimizer_states(engine)
    for name, p in model.named_parameters():
        safe_set_full_fp32_param(p, mine["fp32"][name].to(p.device))
        for key in _ADAM_STATES:
            safe_set_full_optimizer_state(p, mine[key][name].to(p.device), key)
    base = engine.optimizer.optimizer
    for opt_state in base.state.values():
        if "step" in opt_state:
            opt_state["step"].fill_(saved[0]["step"])
    meta = checkpoint.read_file(folder / checkpoint.MODEL_FILE.format(0), c.trust_checkpoint)
    engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    state.iteration, state.consumed_samples = meta["iteration"], meta["consumed_samples"]
    for group in engine.optimizer.param_groups:  # the scheduler sets the LR only at its next step
        group["lr"] = lr_at(c, state.iteration)
    engine.global_steps = state.iteration
    engine.global_samples = state.consumed_samples
    state.last_saved = state.iteration
    rng = checkpoint.read_file(folder / checkpoint.RNG_FILE.format(0), c.trust_checkpoint)  # TP ranks share it
    parallel.set_rng_state(rng["rng"])
    log.info("resumed from %s (saved at TP=%d) at TP=%d, iteration %d", folder, saved_tp, tp, state.iteration)


def load_weights_only(model, folder: Path, trust: bool = False) -> None:
    """This rank's weights from a checkpoint saved at any TP size (merged, then split for this run)."""
    copy_weights(model, None, folder, trust)


def copy_weights(model, mine: dict | None, folder: Path, trust: bool = False) -> None:
    """Copy `mine` (default: this rank's weights read from `folder`) into the model, checking every shape."""
    if mine is None:
        mine = checkpoint.load_rank_shard(folder, parallel.tp_size(), parallel.tp_rank(), trust)
    own = checkpoint.model_state(model)
    problems = [k for k in own if k not in mine or mine[k].shape != own[k].shape]
    if problems:
        k = problems[0]
        got = tuple(mine[k].shape) if k in mine else "missing"
        raise UserError(f"checkpoint {folder} does not fit this model: {k} is {got}, the model needs "
                        f"{tuple(own[k].shape)}; check num_layers/hidden_size/vocab settings")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(mine[name])


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(engine, c: NeoXConfig, valid) -> float | None:
    if valid is None or not c.eval_iters:
        return None
    engine.eval()
    it = batches(valid, c, 0)
    losses = []
    for _ in range(c.eval_iters):
        try:
            batch = next(it)
        except StopIteration:
            break
        batch = {k: v.to(_device()) for k, v in batch.items()}
        losses.append(engine(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"]).float())
    engine.train()
    return _dp_mean(torch.stack(losses).mean()) if losses else None


def evaluate_tasks(engine, c: NeoXConfig, tokenizer) -> dict[str, float]:
    """lm-eval tasks (`eval_tasks`) on the current weights, as {"task/metric": value} on rank 0.

    The tensor-parallel group of data-parallel rank 0 computes them together; other ranks wait.
    """
    from neox_fork.evaluation import evaluate_model

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


def train_step(engine, c: NeoXConfig, micro_batches, params: list[torch.nn.Parameter]) -> tuple[float, bool]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches from the iterator `micro_batches`
    (dicts of tokens, labels, loss_mask). A non-finite loss on any rank backpropagates zeros and the update
    runs at lr 0, so every rank stays in step. Returns (mean loss on this rank, whether the update was
    skipped). tools/benchmark.py --path engine times exactly this."""
    step_loss, finite = 0.0, True
    for micro in range(c.gradient_accumulation_steps):
        batch = {k: v.to(_device()) for k, v in next(micro_batches).items()}
        loss = engine(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"])
        if not torch.isfinite(loss):
            finite = False
            loss = sum(p.sum() * 0.0 for p in params)  # zero gradient instead of NaNs
        engine.backward(loss)
        step_loss += loss.item() / c.gradient_accumulation_steps
        if micro == c.gradient_accumulation_steps - 1:
            bad = torch.tensor([0.0 if finite else 1.0], device=_device())
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item():
                for group in engine.optimizer.param_groups:  # lr 0 leaves the weights unchanged
                    group["lr"] = 0.0
        engine.step()  # DeepSpeed updates only at the accumulation boundary
    return step_loss, bool(bad.item())


# ---------------------------------------------------------------------- the loop
def pretrain(c: NeoXConfig) -> int:
    """Train as the config says; returns the last iteration. Run on every rank."""
    launcher_environment(c.deepspeed_slurm, c.deepspeed_mpi)
    setup_logging()
    stop = StopSignal()  # before the slow start-up, so a signal during it still ends in a save
    parallel.initialize(c.model_parallel_size, c.distributed_backend, c.distributed_timeout_minutes)
    world = dist.get_world_size()
    placement_log.info("rank %d/%d on host %s: local rank %s, pid %d, tensor-parallel rank %d, data-parallel rank %d",
                       dist.get_rank(), world, socket.gethostname(), os.environ.get("LOCAL_RANK", "0"), os.getpid(),
                       parallel.tp_rank(), parallel.dp_rank())
    c.check_world_size(world)
    if _rank0():
        log_ignored_settings(c)
    parallel.seed_everything(c.seed)

    from neox_fork.data.tokenizer import build_tokenizer

    if not c.vocab_file:
        raise UserError(f"{c.where('vocab_file')}: vocab_file is not set; point it at a tokenizer.json")
    tokenizer = build_tokenizer(c.tokenizer_type, c.vocab_file)
    train_data, valid_data = build_data(c, tokenizer, world)

    model = build_model(c, tokenizer.vocab_size)
    engine = build_engine(c, model, world)
    state = TrainState()
    resume(engine, model, c, state)
    if state.iteration >= c.train_iters:
        log.info("nothing to do: the checkpoint is at iteration %d and train_iters is %d; no step was run",
                 state.iteration, c.train_iters)
    metrics = MetricsWriter(c, enabled=_rank0())

    n_params = count_parameters(model.shape)
    flops_per_token = flops.training_flops_per_token(model, c.seq_length, c.recompute, parallel.tp_size())
    peak = flops.device_peak_flops()
    global_batch = c.global_batch_size(world)
    tokens_per_step = global_batch * c.seq_length
    if _rank0():
        log.info("model: %d parameters; world %d = tensor %d x data %d; global batch %d x %d tokens; %s; "
                 "FLOPs per token %d (hardware %d, recompute %s)", n_params, world, c.model_parallel_size,
                 parallel.dp_size(), global_batch, c.seq_length, c.dtype_name, flops_per_token.model,
                 flops_per_token.hardware, c.recompute)

    train_iter = batches(train_data, c, state.consumed_samples)
    started, window_start, window_steps = time.time(), time.time(), 0
    first_iteration = state.iteration
    window_loss, window_count = 0.0, 0
    params = [p for p in model.parameters() if p.requires_grad]
    if state.iteration == 0 and 0 in (c.extra_save_iters or []):
        save(engine, c, state)
    while state.iteration < c.train_iters:
        step_loss, skipped = train_step(engine, c, train_iter, params)
        state.iteration += 1
        state.consumed_samples += global_batch
        window_steps += 1

        if skipped:  # NaN/inf loss: no update, but the saves and the signal check below still run
            state.nan_steps_in_a_row += 1
            log.warning("step %d: loss is NaN/inf on some rank; update skipped (%d in a row)", state.iteration,
                        state.nan_steps_in_a_row)
            if state.nan_steps_in_a_row >= c.max_nan_steps:
                metrics.close()
                raise UserError(f"loss was NaN/inf for {state.nan_steps_in_a_row} steps in a row (max_nan_steps "
                                f"{c.max_nan_steps}) at step {state.iteration}; last good checkpoint: "
                                f"{'step ' + str(state.last_saved) if state.last_saved is not None else 'none'}; "
                                "lower the learning rate or check the data")
        else:
            state.nan_steps_in_a_row = 0
            window_loss += _dp_mean(torch.tensor(step_loss))
            window_count += 1

        if window_count and (state.iteration % c.log_interval == 0 or state.iteration == c.train_iters):
            elapsed = time.time() - window_start
            tokens_per_sec = tokens_per_step * window_steps / max(elapsed, 1e-9)
            grad_norm = engine.get_global_grad_norm()
            m = {
                "iteration": state.iteration,
                "lm_loss": window_loss / max(window_count, 1),
                "lr": lr_at(c, state.iteration - 1),
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_sec": tokens_per_sec,
                "mfu": flops.mfu(tokens_per_sec, flops_per_token.model, world, peak),
                "hfu": flops.mfu(tokens_per_sec, flops_per_token.hardware, world, peak),
                "consumed_samples": state.consumed_samples,
                "elapsed_sec": time.time() - started,
            }
            done = state.iteration - first_iteration
            m["eta_sec"] = (time.time() - started) / max(done, 1) * (c.train_iters - state.iteration)
            if _rank0():
                log.info(progress_line(m, c.train_iters))
            metrics.write(m)
            window_start, window_steps, window_loss, window_count = time.time(), 0, 0.0, 0

        if state.iteration % c.eval_interval == 0 and not skipped:
            eval_loss = evaluate(engine, c, valid_data)
            if eval_loss is not None:
                if _rank0():
                    log.info("step %d: validation loss %.4f (ppl %.2f)", state.iteration, eval_loss,
                             math.exp(min(eval_loss, 50)))
                metrics.write({"iteration": state.iteration, "eval_lm_loss": eval_loss,
                               "eval_ppl": math.exp(min(eval_loss, 50))})
            task_metrics = evaluate_tasks(engine, c, tokenizer) if c.eval_tasks else {}
            if task_metrics:
                log.info("step %d: %s", state.iteration, ", ".join(f"{k} {v:.4f}" for k, v in task_metrics.items()))
                metrics.write({"iteration": state.iteration, **task_metrics})

        if (c.save_every and state.iteration % c.save_every == 0) or state.iteration in (c.extra_save_iters or []):
            save(engine, c, state)
        if c.exit_interval and state.iteration % c.exit_interval == 0:
            log.info("exit_interval %d reached at step %d", c.exit_interval, state.iteration)
            break
        if stop.any_rank():
            log.warning("stopping at step %d on signal", state.iteration)
            break

    save(engine, c, state)
    stop.finished()
    metrics.close()
    return state.iteration
