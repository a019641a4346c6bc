"""The training state on disk: save a step, resume it, and move it to another tensor-parallel size.

A run is reproducible from (config, checkpoint): the checkpoint holds the model, ZeRO optimizer shards,
the LR schedule, the iteration and consumed samples, and every rank's RNG state, so stopping at N and
resuming gives the same losses as an uninterrupted run. checkpoint.py owns the layout (names, GPT-NeoX
tensor layouts, atomic publish, safe reads); this module decides what a training run writes and reads.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from neox_fork import checkpoint, parallel
from neox_fork.config import NeoXConfig
from neox_fork.errors import UserError
from neox_fork.optim import lr_at

log = logging.getLogger("neox_fork")


def _rank0() -> bool:
    return dist.get_rank() == 0


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    nan_steps_in_a_row: int = 0
    last_saved: int | None = None



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
