"""The training state on disk: save a step, resume it, or resume it at another layout (TP, DP, ZeRO stage).

A run is reproducible from (config, checkpoint): the checkpoint holds the model, ZeRO optimizer shards,
the LR schedule, the iteration and consumed samples, and every rank's RNG state, so stopping at N and
resuming gives the same losses as an uninterrupted run. At another layout the same state comes back through
DeepSpeed's Universal Checkpointing (checkpoint/universal.py, `load_universal: true`). checkpoint/store.py owns the layout
(names, GPT-NeoX tensor layouts, atomic publish, safe reads); this module decides what a run writes and reads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from neox_fork import errors
from neox_fork.checkpoint import neox_layout
from neox_fork.checkpoint import store as checkpoint
from neox_fork.parallel import groups as parallel
from neox_fork.checkpoint import universal
from neox_fork.checkpoint.async_writer import AsyncWriter
from neox_fork.config.neox_config import NeoXConfig
from neox_fork.data.tokenizer import TokenizerSource
from neox_fork.errors import UserError
from neox_fork.model import moe
from neox_fork.model.adapters import adapter_sharding, is_adapter

log = logging.getLogger("neox_fork")


def _rank0() -> bool:
    return dist.get_rank() == 0


def _model_of(engine, c: NeoXConfig):
    """The NeoXModel the engine trains (this pipeline stage's part of it when pipelined)."""
    if c.pipe_parallel_size > 1:
        from neox_fork.training.pipeline import model_of

        return model_of(engine)
    return engine.module


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    nan_steps_in_a_row: int = 0
    last_saved: int | None = None
    resumed_from: Path | None = None  # the step folder a full resume read (not a finetune's `load`)
    reference: object = None  # training/preference.py's frozen reference model, saved with each step
    adapter_base: Path | None = None  # adapter lora: the step folder of the frozen base weights (what saves name)
    skipped_iterations: list = field(default_factory=list)  # [first, last] steps skip_train_iteration_ranges skipped
    pending: object = None  # an async_save still being written: PendingSave


# Test-only: NEOX_FORK_TEST_FAIL="RANK:STEP:WHERE" makes global rank RANK raise a RuntimeError at step STEP
# in WHERE (step, save, eval or data: a data-loader worker), so that tests can fail a real run where a bug, a
# broken file or a broken task would (tests/test_train_failing_rank_or_full_disk_ends_the_run.py); WHERE grads
# or spike injects a bad step instead (training/faults.py injected_fault).
TEST_FAIL_ENV = "NEOX_FORK_TEST_FAIL"


def test_failure(where: str) -> int | None:
    """The step at which this rank is to fail in `where` (TEST_FAIL_ENV); None almost always."""
    spec = os.environ.get(TEST_FAIL_ENV, "").split(":")
    if len(spec) == 3 and spec[2] == where and int(spec[0]) == dist.get_rank():
        return int(spec[1])
    return None


def fail_if_asked(where: str, step: int) -> None:
    if test_failure(where) == step:
        raise RuntimeError(f"injected failure in {where} at step {step} on rank {dist.get_rank()} "
                           f"({TEST_FAIL_ENV}, for tests)")


def checkpoint_size(c: NeoXConfig, model) -> tuple[int, str]:
    """(bytes, what) of one checkpoint: what the newest step folder in `save` holds, else model_summary's
    estimate."""
    steps = checkpoint.saved_steps(c.save) if c.save and Path(c.save).is_dir() else []
    if steps:
        folder = checkpoint.step_dir(c.save, steps[-1])
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        if size:
            return size, f"one checkpoint (as {folder.name})"
    from neox_fork.model.shape import count_parameters
    from neox_fork.perf.summary import checkpoint_bytes

    # every TP rank writes its replicated parameters (norms, row-parallel biases): this rank's, counted once more
    # for each other TP rank (perf.summary.checkpoint_elements does this exactly from the whole model's names)
    replicated = sum(p.numel() for name, p in model.named_parameters() if checkpoint.sharding(name) is None)
    elements = count_parameters(model.shape) + (parallel.tp_size() - 1) * replicated
    # experts: this rank's share of each (split over TP, spread over EP) times the ranks that hold them
    experts = sum(p.numel() for name, p in model.named_parameters() if moe.is_expert(name))
    return (checkpoint_bytes(c, elements, elements - experts * parallel.tp_size() * parallel.ep_size()),
            "one checkpoint (model_summary's estimate)")


def warn_if_no_room(c: NeoXConfig, model) -> None:
    """One warning line when the save folder's filesystem has less free space than one checkpoint."""
    if not c.save or not _rank0():
        return
    free = errors.free_bytes(c.save)
    needed, what = checkpoint_size(c, model)
    if free is not None and free < needed:
        log.warning("save folder %s: %s free, below %s of about %s; saves will fail when the disk is full",
                    c.save, errors.size_text(free), what, errors.size_text(needed))


def _latest_note(ckpt_dir: Path) -> str:
    pointer = ckpt_dir / checkpoint.LATEST_FILE
    latest = pointer.read_text().strip() if pointer.is_file() else None
    return (f"the partial step folder was removed and 'latest' still names {latest}" if latest else
            "the partial step folder was removed; no checkpoint is saved yet") + \
        "; free some space or point `save` at a larger filesystem"


@dataclass
class PendingSave:
    """A step folder whose files this rank's writer thread is still writing (async_save)."""
    iteration: int
    partial: Path
    writer: AsyncWriter


# Test-only: NEOX_FORK_TEST_SLOW_ASYNC_SAVE=SECONDS makes each async save's writer wait that long before writing.
TEST_SLOW_ASYNC_ENV = "NEOX_FORK_TEST_SLOW_ASYNC_SAVE"


def save(engine, c: NeoXConfig, state: TrainState) -> None:
    """Everything needed to resume, written under global_stepN.partial and published when complete.

    A no-op without `save`, or when this iteration is already saved. With async_save the files are copied to host
    memory here and written by a thread while training goes on; finish_pending publishes them once every rank's
    writer is done (a save waits for the previous one first). On any failure this rank removes the partial folder
    (`latest` keeps naming the last complete step); a full filesystem is one line."""
    if not c.save:
        return
    finish_pending(c, state, wait=True)
    if state.last_saved == state.iteration:
        return
    ckpt_dir = Path(c.save)
    partial = checkpoint.partial_dir(ckpt_dir, state.iteration)
    writer = AsyncWriter() if c.async_save else None
    with _disk_errors(c, engine, ckpt_dir, partial):
        _write_step(engine, c, state, ckpt_dir, partial, writer)
        if writer is None:
            _publish_step(c, ckpt_dir, partial, state.iteration)
        else:
            writer.start(float(os.environ.get(TEST_SLOW_ASYNC_ENV, "0")))
            state.pending = PendingSave(state.iteration, partial, writer)
            log.info("saving checkpoint %s in the background (async_save)",
                     checkpoint.step_dir(ckpt_dir, state.iteration))
    state.last_saved = state.iteration


def finish_pending(c: NeoXConfig, state: TrainState, wait: bool) -> None:
    """Publish the async save in flight once every rank's writer is done: at once with `wait`, else only if they
    all are (one small all-reduce, at each step boundary while a save is in flight)."""
    pending = state.pending
    if pending is None:
        return
    if not wait and parallel.any_rank(not pending.writer.done()):
        return
    ckpt_dir = Path(c.save)
    with _disk_errors(c, None, ckpt_dir, pending.partial):
        pending.writer.wait()
        _publish_step(c, ckpt_dir, pending.partial, pending.iteration)
    state.pending = None


def _disk_errors(c: NeoXConfig, engine, ckpt_dir: Path, partial: Path):
    return errors.full_disk_is_one_line(ckpt_dir, cleanup=lambda: shutil.rmtree(partial, ignore_errors=True),
                                        needed=lambda: checkpoint_size(c, engine.module) if engine else None,
                                        note=lambda: _latest_note(ckpt_dir))


class _SavesTo:
    """engine.checkpoint_engine with its saves handed to an AsyncWriter (DeepSpeed writes its files through it); the
    save-side twin of SafeLoads."""

    def __init__(self, inner, writer: AsyncWriter):
        self.inner, self.writer = inner, writer

    def save(self, state_dict, path):
        self.writer.add(state_dict, path)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@contextlib.contextmanager
def _saves_through(engine, writer: AsyncWriter | None):
    """DeepSpeed's saves inside the block go to `writer` (nothing changes without one)."""
    if writer is None:
        yield
        return
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _SavesTo(inner, writer)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner


def _write_step(engine, c: NeoXConfig, state: TrainState, ckpt_dir: Path, partial: Path, writer=None) -> None:
    """This rank's files of the step (through `writer` when it is an async save; else written here)."""
    if _rank0():
        checkpoint.start_partial(ckpt_dir, state.iteration)
    dist.barrier()
    model = _model_of(engine, c)
    if c.adapter:  # only the adapters (our names) and, in lora_adapters.json, the base they adapt
        module, layers = {k: v for k, v in checkpoint.model_state(model).items() if is_adapter(k)}, {}
        if c.pipe_parallel_size > 1:  # each stage's in GPT-NeoX's per-layer files, as a pipelined run's weights;
            # every entry of the layer list gets a file (empty without adapters): ds_to_universal maps stages by them
            layers = {**{i: {} for i in range(c.num_layers + 5)}, **neox_layout.to_neox(module, c.num_layers)}
            module = {}
    else:  # the weights as GPT-NeoX writes them for this pipe_parallel_size (DeepSpeed's `module` replaced)
        # expert-parallel: layer files (and EP rank 0's module) with every expert, the other EP ranks' own ones
        full, own = moe.expert_parallel_states(checkpoint.model_state(model), c.moe_num_experts)
        module, layers = checkpoint.neox_weights(full, c, parallel.tp_size())
        if parallel.ep_rank() > 0:
            module = checkpoint.neox_weights(own, c, parallel.tp_size())[0]
    # what DeepSpeed's ds_to_universal needs to merge each parameter's tensor-parallel slices
    info = getattr(engine.module, "universal_info", None) or universal.checkpoint_info(  # pipelined: whole model's
        dict(model.named_parameters()), model.shape.vocab_size)
    client_state = {"iteration": state.iteration, "consumed_samples": state.consumed_samples,
                    "module": checkpoint.compact(module),  # DeepSpeed's torch.save would write whole flat buffers
                    universal.INFO_KEY: info, SKIPPED_KEY: state.skipped_iterations}
    if c.pipe_parallel_size > 1:  # DeepSpeed's pipeline engine saves `module: None` (each stage's layer files)
        del client_state["module"]
    elif c.checkpoint_validation_with_forward_pass:
        client_state[VALIDATION_KEY] = validation_logits(engine.module, c)
    with _without_optimizer_states(engine, c.no_save_optim), _saves_through(engine, writer):
        engine.save_checkpoint(str(ckpt_dir), tag=partial.name, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=bool(c.adapter))  # ZeRO-2 would copy the frozen base
    fail_if_asked("save", state.iteration)
    if layers:  # index 1 is a function, so GPT-NeoX writes no file for it; ds_to_universal refuses a folder without
        layers = {**layers, 1: {}}  # a layer_01 file, so an empty one is written (every reader skips it)
    if c.pipe_parallel_size > 1:  # each stage writes its own entries of the layer list
        from neox_fork.training.pipeline import stage_files

        layers = stage_files(engine, layers)
    if parallel.dp_rank() == 0 and parallel.cp_rank() == 0:  # one writer per TP rank (CP ranks hold the same)
        checkpoint.save_layer_files(partial, parallel.tp_rank(), layers, writer)
        if state.reference is not None and not c.adapter:  # LoRA's reference is the base the folder names
            checkpoint.save_reference(partial, state.reference, c, parallel.tp_size(), parallel.tp_rank(), writer)
    if c.adapter and _rank0():  # the base the adapters are on, and how each adapter tensor splits over TP ranks
        sharding = getattr(engine.module, "adapter_sharding", None) or adapter_sharding(model)  # pipelined: all's
        checkpoint.save_lora_info(partial, state.adapter_base, sharding)
    if not c.no_save_rng:
        save_rng(partial / checkpoint.RNG_FILE.format(dist.get_rank()), writer)


def _publish_step(c: NeoXConfig, ckpt_dir: Path, partial: Path, iteration: int) -> None:
    """Once every rank wrote its files: rank 0 adds the config and tokenizer and publishes the step folder."""
    if not _rank0() and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        checkpoint.fsync_tree(partial)  # this node's writes reach the disk before rank 0 publishes
    dist.barrier()
    if _rank0():
        if c.no_save_optim:
            (partial / NO_OPTIMIZER_FILE).write_text("saved with no_save_optim: no optimizer states\n")
        checkpoint.save_config(partial, c)
        checkpoint.copy_tokenizer(partial, TokenizerSource.of_config(c))
        checkpoint.publish(partial, ckpt_dir, iteration)
        prune_checkpoints(ckpt_dir, c.keep_last_n_checkpoints)
        log.info("saved checkpoint %s", checkpoint.step_dir(ckpt_dir, iteration))
    dist.barrier()


VALIDATION_KEY = "checkpoint_validation_logits"  # upstream's name in the saved state
SKIPPED_KEY = "skipped_iterations"  # ours: the steps whose batches skip_train_iteration_ranges skipped so far
NO_OPTIMIZER_FILE = "no_optimizer_states"  # marks a step saved with no_save_optim


@torch.no_grad()
def validation_logits(model, c: NeoXConfig) -> torch.Tensor:
    """Upstream's check input: tokens 0..seq_length-1 (modulo the vocabulary), its logits on the CPU in fp32."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens = (torch.arange(c.seq_length, device=device) % model.shape.vocab_size)[None]
    logits = model(tokens)[0].float().cpu()
    model.train(was_training)
    return logits


def check_validation_logits(model, c: NeoXConfig, saved: torch.Tensor | None, folder: Path) -> None:
    """checkpoint_validation_with_forward_pass on resume: the loaded weights must give the saved logits."""
    if saved is None:
        log.warning("checkpoint_validation_with_forward_pass is on but %s holds no validation logits", folder)
        return
    now = validation_logits(model, c)
    if now.shape != saved.shape or not torch.isclose(now, saved).all():  # upstream's test: torch.isclose
        diff = (now - saved).abs().max().item() if now.shape == saved.shape else f"shape {tuple(saved.shape)}"
        raise UserError(f"checkpoint_validation_with_forward_pass: {folder} gives other logits after loading than "
                        f"when it was saved (max difference {diff}); the checkpoint or this model is not the one "
                        "that was saved")
    log.info("validated %s with a forward pass", folder)


class _without_optimizer_states:
    """no_save_optim: DeepSpeed writes no optimizer state (no ZeRO shard files, `optimizer: None`)."""

    def __init__(self, engine, active: bool):
        self.engine, self.active = engine, active

    def __enter__(self):
        if self.active:
            self.zero = self.engine.save_zero_checkpoint
            self.engine.save_zero_checkpoint = False
            self.engine.optimizer.state_dict = lambda: None  # the non-ZeRO path saves optimizer.state_dict()

    def __exit__(self, *exc):
        if self.active:
            self.engine.save_zero_checkpoint = self.zero
            del self.engine.optimizer.state_dict


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

    @classmethod
    def install(cls, engine, trust: bool) -> None:
        """Route `engine`'s checkpoint reads through the safe reader (once)."""
        if not isinstance(engine.checkpoint_engine, cls):
            engine.checkpoint_engine = cls(engine.checkpoint_engine, trust)


def save_rng(path: Path, writer=None) -> None:
    """This rank's RNG streams (the default generators and the tracker's, which attention dropout draws from),
    read back by `restore_rng`."""
    checkpoint.save_tensors({"rng": parallel.get_rng_state(), "tracker": parallel.RNG_TRACKER.state_dict()}, path,
                            writer)


def restore_rng(path: Path, trust: bool, tracker: bool = True) -> None:
    """This rank's RNG streams from a file `save` wrote; the per-TP-rank tracker streams only if `tracker`."""
    saved = checkpoint.read_file(path, trust)
    parallel.set_rng_state(saved["rng"])
    if tracker:
        parallel.RNG_TRACKER.load_state_dict(saved["tracker"])


def resume(engine, model, c: NeoXConfig, state: TrainState) -> None:
    """Continue from `load` (full state), or take weights only with `finetune: true`."""
    no_base = ("adapter lora trains adapters on frozen base weights, and a LoRA checkpoint names them instead of "
               "copying them: set load to a base checkpoint (e.g. one tools/ckpts/convert_hf_llama_to_neox.py "
               "imported) with finetune: true")
    if not c.load:
        if c.adapter:
            raise UserError(f"{c.where('adapter')}: {no_base}")
        return
    if c.trust_checkpoint:
        log.warning("trust_checkpoint is on: files of %s are unpickled without restriction and can run code",
                    c.load)
    if c.load_universal:  # universal.resolve_load left it on: the universal checkpoint is the newest
        resume_universal(engine, model, c, state)
        return
    step = checkpoint.read_latest(c.load)
    if step is None:
        if Path(c.load) == Path(c.save or ""):  # first start of a run that saves and loads in one place
            if c.adapter:
                raise UserError(f"load: '{c.load}' has no checkpoint yet; {no_base}")
            log.info("no checkpoint in %s yet: starting from scratch", c.load)
            return
        raise UserError(f"load: '{c.load}' has no 'latest' file; point it at a checkpoint folder")
    folder = checkpoint.resolve(c.load, step)
    saved_tp = checkpoint.tp_size_of(folder)
    lora = checkpoint.lora_info(folder) is not None
    if c.adapter:  # the base the adapters train on: a LoRA checkpoint's own base, else the folder itself
        if not (lora or c.finetune):
            raise UserError(f"load: {folder} holds no LoRA adapters; start a LoRA run from a base checkpoint with "
                            "finetune: true")
        state.adapter_base = checkpoint.lora_base_of(folder) if lora else folder.resolve()
    elif lora:
        raise UserError(f"load: {folder} is a LoRA checkpoint (adapters on a base): resume it with its config's "
                        "adapter keys, or export the merged model (tools/convert_to_hf.py) and train that")
    if c.finetune:
        load_weights_only(model, folder, c.trust_checkpoint)
        # ZeRO (and bf16) optimizers keep fp32 masters copied from the weights when the engine was built; the
        # first step would write those (the fresh initialisation) back. DeepSpeed does the same when it loads
        # a module without its optimizer state.
        refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()
        log.info("fine-tuning from the weights of %s", folder)
        return
    saved_dp = checkpoint.dp_size_of(folder)
    saved_pp, pp = checkpoint.pp_size_of(folder), max(c.pipe_parallel_size, 1)
    if saved_pp != pp:
        raise UserError(f"checkpoint {folder} was saved at pipe_parallel_size {saved_pp} but this run uses {pp}; "
                        "take its weights with finetune: true, or its full state through the universal checkpoint "
                        f"(`python tools/ckpts/to_universal.py --input-dir {c.load}`, then load_universal: true)")
    saved_ep = checkpoint.ep_size_of(folder)
    if saved_ep != parallel.ep_size():
        raise UserError(f"checkpoint {folder} was saved at expert_model_parallel_size {saved_ep} but this run uses "
                        f"{parallel.ep_size()}; resume at the saved layout, or take its weights with finetune: true, "
                        "or its full state through the universal checkpoint (`python tools/ckpts/to_universal.py "
                        f"--input-dir {c.load}`, then load_universal: true)")
    # ZeRO partitions over data x context parallel ranks (DeepSpeed's sequence x data group): its shard count
    shards = parallel.dp_size() * parallel.cp_size()
    if saved_tp != parallel.tp_size() or saved_dp not in (None, shards):
        raise UserError(f"checkpoint {folder} was saved at model_parallel_size {saved_tp} x {saved_dp or 'any'} "
                        f"data-parallel ranks but this run uses {parallel.tp_size()} x {shards}; to "
                        f"change parallelism run `python tools/ckpts/to_universal.py --input-dir {c.load}` and resume "
                        "with load_universal: true")
    SafeLoads.install(engine, c.trust_checkpoint)

    def load_weights(src, dst):  # DeepSpeed's `module` (sequential or our names), else the layer files
        path = folder / checkpoint.MODEL_FILE.format(parallel.MPU.get_model_parallel_rank())
        mine = checkpoint.weights_of_module(src, path) if src and not lora else None  # LoRA: base + adapters
        copy_weights(dst, mine, folder, c.trust_checkpoint)

    load_optim = not c.no_load_optim
    if load_optim and (folder / NO_OPTIMIZER_FILE).is_file():
        raise UserError(f"{folder} was saved with no_save_optim (it holds no optimizer states); resume from it with "
                        "no_load_optim: true")
    custom = {"custom_load_fn": load_weights}
    if c.pipe_parallel_size > 1:  # DeepSpeed's pipeline engine reads the module through the stage (NeoXPipe)
        engine.module.load_weights, custom = lambda: copy_weights(model, None, folder, c.trust_checkpoint), {}
    _, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name, **custom,
                                             load_optimizer_states=load_optim, load_lr_scheduler_states=load_optim,
                                             load_module_only=not load_optim)
    if c.checkpoint_validation_with_forward_pass and c.pipe_parallel_size <= 1:
        check_validation_logits(engine.module, c, client_state.get(VALIDATION_KEY), folder)
    if not load_optim:
        log.info("no_load_optim: optimizer states and LR schedule start fresh")
    state.iteration = client_state["iteration"]
    # GPT-NeoX keeps no sample count: its data position is iteration x global batch
    state.consumed_samples = client_state.get("consumed_samples",
                                              state.iteration * c.global_batch_size(dist.get_world_size()))
    state.last_saved = state.iteration
    state.resumed_from = folder
    state.skipped_iterations = [list(r) for r in client_state.get(SKIPPED_KEY) or ()]
    rng_file = folder / checkpoint.RNG_FILE.format(dist.get_rank())
    if c.no_load_rng:
        log.info("no_load_rng: the RNG states of %s are not restored", folder)
    elif rng_file.is_file():
        restore_rng(rng_file, c.trust_checkpoint)
    log.info("resumed from %s at iteration %d (%d samples consumed)", folder, state.iteration,
             state.consumed_samples)


@contextlib.contextmanager
def _global_expert_names(optimizer, params: dict[str, torch.Tensor]):
    """DeepSpeed's ZeRO optimizer reads each parameter's universal folder by its `param_names` entry (the model's
    name, a local expert index under expert parallelism): for the block, the names of `params` (global ones)."""
    names = getattr(optimizer, "param_names", None)
    if not isinstance(names, dict):
        yield
        return
    saved = dict(names)
    names.update({p: name for name, p in params.items()})
    try:
        yield
    finally:
        names.clear()
        names.update(saved)


class _TensorParallelGrid:
    """DeepSpeed's pipeline grid as its universal loader asks it: the tensor-parallel rank and size it cuts each
    parameter for are TP's. The grid's model axis is TP x EP ranks (training/pipeline.py's build_pipeline), so at
    EP > 1 it would answer TP rank + TP x EP rank of TP x EP, slices the universal folder does not hold."""

    def __init__(self, grid):
        self._grid = grid

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def get_tensor_model_parallel_rank(self) -> int:
        return parallel.tp_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return parallel.tp_size()

    get_slice_parallel_rank, get_slice_parallel_world_size = (get_tensor_model_parallel_rank,
                                                              get_tensor_model_parallel_world_size)


@contextlib.contextmanager
def _tensor_parallel_grid(optimizer):
    """For the block, a pipelined run's ZeRO optimizer sees the grid through _TensorParallelGrid."""
    grid = getattr(optimizer, "mpu", None)
    if grid is None or not hasattr(grid, "get_slice_parallel_world_size"):  # no pipelines: parallel.MPU says TP
        yield
        return
    optimizer.mpu = _TensorParallelGrid(grid)
    try:
        yield
    finally:
        optimizer.mpu = grid


def resume_universal(engine, model, c: NeoXConfig, state: TrainState) -> None:
    """Continue from the universal checkpoint of `load` (tools/ckpts/to_universal.py) at this run's TP, DP and ZeRO.

    DeepSpeed's loader cuts each parameter's fp32 weight and Adam moments for this rank and restores the LR
    schedule; iteration and data position come from the copied model states, each rank's RNG state from the
    saved rank universal.rng_source names."""
    folder = checkpoint.universal_dir(c.load, checkpoint.read_latest_universal(c.load))
    lora = checkpoint.lora_info(folder) is not None
    if lora and not c.adapter:
        raise UserError(f"load_universal: {folder} is a LoRA run's universal checkpoint (adapters on a base): resume "
                        "it with its config's adapter keys")
    if c.adapter and not lora:
        raise UserError(f"load_universal: {folder} holds no LoRA adapters; start a LoRA run from a base checkpoint "
                        "with finetune: true")
    # a universal folder names every expert by its global index; an expert-parallel rank reads its own experts
    params = moe.global_expert_names(dict(model.named_parameters()), parallel.ep_rank(),
                                     c.moe_num_experts // parallel.ep_size())
    universal.check_folder(folder, params, parallel.tp_size(), c.trust_checkpoint,
                           trainable={n for n, p in params.items() if p.requires_grad})
    if lora:  # zero/ holds the adapters and their Adam states; the frozen base comes from the folder it names
        state.adapter_base = checkpoint.lora_base_of(folder)
        base = checkpoint.load_rank_shard(state.adapter_base, parallel.tp_size(), parallel.tp_rank(),
                                          c.trust_checkpoint)
        adapters = {k: v for k, v in checkpoint.model_state(model).items() if is_adapter(k)}  # DeepSpeed's, below
        copy_weights(model, {**base, **adapters}, state.adapter_base, c.trust_checkpoint)
    SafeLoads.install(engine, c.trust_checkpoint)
    with (universal.safe_unpickling(c.trust_checkpoint), _global_expert_names(engine.optimizer, params),
          _tensor_parallel_grid(engine.optimizer)):
        _, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    state.iteration, state.consumed_samples = client_state["iteration"], client_state["consumed_samples"]
    state.last_saved = state.iteration
    state.resumed_from = folder  # tools/ckpts/to_universal.py copies the step's reference/ into it
    state.skipped_iterations = [list(r) for r in client_state.get(SKIPPED_KEY) or ()]
    saved_tp = checkpoint.tp_size_of(folder)
    saved_dp = len(checkpoint.rng_files(folder)) // (saved_tp * checkpoint.pp_size_of(folder))  # stage 0's first
    if saved_dp:
        # ranks are numbered tp + TP x (cp + CP x dp): the data x context index takes the place of the DP rank
        shard = parallel.cp_rank() + parallel.cp_size() * parallel.dp_rank()
        source, same_tp_rank = universal.rng_source(parallel.tp_rank(), shard, saved_tp, saved_dp)
        restore_rng(folder / checkpoint.RNG_FILE.format(source), c.trust_checkpoint, tracker=same_tp_rank)
    else:
        log.warning("%s holds no RNG states (not made by tools/ckpts/to_universal.py?): dropout continues from fresh "
                    "seeds", folder)
    saved = _layout(checkpoint.pp_size_of(folder), checkpoint.ep_size_of(folder), saved_tp, max(saved_dp, 1))
    now = _layout(parallel.pp_size(), parallel.ep_size(), parallel.tp_size(), parallel.dp_size())
    log.info("resumed from universal checkpoint %s (saved at %s) at %s, iteration %d (%d samples consumed)", folder,
             saved, now, state.iteration, state.consumed_samples)


def _layout(pp: int, ep: int, tp: int, dp: int) -> str:
    """"PP=2 x EP=2 x TP=1 x DP=2": pipeline stages and expert parallelism named where there are more than one."""
    return " x ".join(f"{name}={n}" for name, n in (("PP", pp), ("EP", ep), ("TP", tp), ("DP", dp))
                      if n > 1 or name in ("TP", "DP"))


def load_weights_only(model, folder: Path, trust: bool = False) -> None:
    """This rank's weights from a checkpoint saved at any TP size (merged, then split for this run); a
    reward model's head may be missing there (fine-tuning a language model into one)."""
    copy_weights(model, None, folder, trust, fresh_reward_head=True)


def copy_weights(model, mine: dict | None, folder: Path, trust: bool = False, fresh_reward_head: bool = False) -> None:
    """Copy `mine` (default: this rank's weights read from `folder`) into the model, checking every shape."""
    if mine is None:
        mine = checkpoint.load_rank_shard(folder, parallel.tp_size(), parallel.tp_rank(), trust)
    if getattr(model, "shape", None) is not None and model.shape.moe is not None:  # expert-parallel: own experts
        mine = moe.own_experts(mine, model.shape.moe.num_experts)
    own = checkpoint.model_state(model)
    if fresh_reward_head and "rm_linear.weight" in own and "rm_linear.weight" not in mine:
        log.info("reward model from %s, a language model: rm_linear starts from its initialisation", folder)
        own.pop("rm_linear.weight")
    if not any(is_adapter(k) for k in mine) and any(is_adapter(k) for k in own):
        log.info("LoRA adapters start from their initialisation on the weights of %s", folder)
        own = {k: v for k, v in own.items() if not is_adapter(k)}
    problems = [k for k in own if k not in mine or mine[k].shape != own[k].shape]
    if problems:
        k = problems[0]
        got = tuple(mine[k].shape) if k in mine else "missing"
        raise UserError(f"checkpoint {folder} does not fit this model: {k} is {got}, the model needs "
                        f"{tuple(own[k].shape)}; check num_layers/hidden_size/vocab settings")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(mine[name])
