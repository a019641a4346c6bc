"""DeepSpeed's Universal Checkpointing for our parameters: change TP size, DP size or ZeRO stage mid-run.

Two commands (README, "Changing parallelism mid-run"):

    python tools/ckpts/to_universal.py --input-dir CKPT        # runs deepspeed.checkpoint.ds_to_universal
    ... train with `load_universal: true` and the new model_parallel_size / GPUs / zero stage

DeepSpeed's converter merges each parameter's ZeRO fragments (over data-parallel ranks) and slices (over
tensor-parallel ranks) into one fp32 tensor per state (weight, exp_avg, exp_avg_sq, step) under
CKPT/global_stepN_universal/zero/<name>/, as a TP=1 model holds it; DeepSpeed's loader cuts them again for
any TP size, DP size and ZeRO stage 1 or 2. How to merge a parameter's TP slices is what the
`universal_checkpoint_info` every checkpoint carries says, by regex on parameter names. Ours come from
checkpoint.sharding, the one table of how each parameter is split:

    replicated: norms, row-parallel biases, learned positions -> tp_replicated_parameter_patterns
    row-parallel weights (attention.dense, mlp.linear2)       -> parameter_with_row_parallelism_patterns
    gated linear1 (each rank holds [up_r; gate_r], +bias)     -> parameter_with_2_sub_params_cat_dim_0
    column-parallel: fused QKV (+bias; whole key/value groups per rank, so GQA too), plain linear1 (+bias)
                                                              -> DeepSpeed's default, concatenated on dim 0
    word embedding and untied head (vocabulary rows)          -> vocabulary_parameter_patterns as well

MoE experts split over TP as the dense MLP (the same table). Under expert parallelism each EP rank is converted
alone and its experts renamed to their global index (_merge_expert_parallel_rank; docs/moe.md says why), so the
folder is the one a one-process run gives; the loader (training/state.py) reads each EP rank's experts by that index.
With pipeline stages too, an EP rank's files of every stage are converted together, numbered as a pipelined run of
TP ranks numbers them (_saved_rank, _link_as_tp_group); loading into pipeline stages at EP > 1 is the same load.

The vocabulary is kept at its padded size (`original_vocab_size` is the padded size): the head's padding
rows take part in the softmax and are trained, so dropping them would change the loss. The resumed run
must pad to the same size (checked, with the make_vocab_size_divisible_by that does).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from neox_fork import errors
from neox_fork.checkpoint import store as checkpoint
from neox_fork.checkpoint import safe_unpickle
from neox_fork.config.neox_config import NeoXConfig
from neox_fork.errors import UserError

log = logging.getLogger("neox_fork")

# DeepSpeed's keys (deepspeed.checkpoint.constants), spelled out so that saving imports no DeepSpeed module
INFO_KEY = "universal_checkpoint_info"
_VERSION = ("universal_checkpoint_version", 0.4)
REPLICATED = "tp_replicated_parameter_patterns"
ROW_PARALLEL = "parameter_with_row_parallelism_patterns"
TWO_SUB_PARAMS = "parameter_with_2_sub_params_cat_dim_0"
VOCABULARY = "vocabulary_parameter_patterns"
ORIGINAL_VOCAB_SIZE = "original_vocab_size"
_VOCABULARY_PARAMS = ("word_embeddings.weight", "output_layer.weight")  # rows: the (padded) vocabulary


def _pattern(name: str) -> str:
    """A regex matching `name` in every layer, and nothing else (DeepSpeed matches with re.match)."""
    return re.sub(r"layers\\\.\d+\\\.", r"layers\\.\\d+\\.", re.escape(name)) + "$"


def category(name: str, params: dict[str, torch.Tensor]) -> str | None:
    """Which of DeepSpeed's merge rules `name` needs; None: concatenate on dim 0 (column-parallel)."""
    spec = checkpoint.sharding(name, params)
    if spec is None:
        return REPLICATED
    dim, stride = spec
    if dim == 1:
        return ROW_PARALLEL
    return TWO_SUB_PARAMS if stride == 2 else None


def checkpoint_info(params: dict[str, torch.Tensor], padded_vocab: int) -> dict:
    """The `universal_checkpoint_info` of a model with these parameters (one rank's, names as in the model). Only
    the trainable ones are in the optimizer, so only they are named (LoRA: the adapters; the frozen base is read
    again from the base checkpoint on resume)."""
    info: dict = {_VERSION[0]: _VERSION[1], ORIGINAL_VOCAB_SIZE: padded_vocab,
                  REPLICATED: [], ROW_PARALLEL: [], TWO_SUB_PARAMS: [], VOCABULARY: []}
    for name, p in params.items():
        if not p.requires_grad:
            continue
        kind = category(name, params)
        pattern = _pattern(name)
        if kind and pattern not in info[kind]:
            info[kind].append(pattern)
        if name in _VOCABULARY_PARAMS and pattern not in info[VOCABULARY]:
            info[VOCABULARY].append(pattern)
    return {k: v for k, v in info.items() if v != []}  # the converter refuses a pattern that matches nothing


# ---------------------------------------------------------------------- converting (tools/ckpts/to_universal.py)
def convert(path: str | os.PathLike, step: int | None = None, workers: int = 4, trust: bool = False) -> Path:
    """CKPT (or one of its step folders) -> CKPT/global_stepN_universal by DeepSpeed's ds_to_universal, unchanged.

    The converter unpickles our files with torch.load(weights_only=False): every file it reads is first
    read through checkpoint.read_file, and it runs under safe_unpickling. Besides its output the folder gets
    the step's config.yml, tokenizer and per-rank RNG states, and loses the fp32 copies the converter makes of
    the `module` entries (GPT-NeoX's `sequential.*` names, which no parameter has: never read); it is
    written beside and renamed into place when complete, then `latest_universal` names it.
    """
    folder = checkpoint.resolve(path, step)
    n = checkpoint.folder_step(folder)
    tp = checkpoint.tp_size_of(folder)
    ep = checkpoint.ep_size_of(folder)
    if checkpoint.lora_info(folder) is not None:  # a LoRA run: its adapters convert; its base is named, not copied
        checkpoint.lora_base_of(folder)
    if checkpoint.dp_size_of(folder) is None:
        raise UserError(f"checkpoint {folder} has no ZeRO optimizer shards (saved with zero_optimization stage 0?); "
                        "Universal Checkpointing converts checkpoints of ZeRO stage 1 or 2")
    pp = checkpoint.pp_size_of(folder)
    # one model states file per (pipeline stage, EP rank, TP rank) (_saved_rank); each names its rank's parameters
    models = [folder / checkpoint.MODEL_FILE.format(r) for r in range(tp * pp * ep)]
    names: list[set[str]] = []  # per EP rank, as its model names them
    for path in models:
        states = checkpoint.read_file(path, trust, mmap=True)
        if not isinstance(states, dict) or INFO_KEY not in states:
            raise UserError(f"checkpoint file '{path}' carries no {INFO_KEY} (saved by an older neox_fork or by "
                            "gpt-neox); resume it at its own layout and save again to convert it")
        names.append({name for group in states.get("param_shapes", []) for name in group})
    for f in sorted(folder.glob("*optim_states.pt")):
        checkpoint.read_file(f, trust, mmap=True)
    out = checkpoint.universal_dir(folder.parent, n)
    # written inside a private folder, where the converter's own `latest_universal` lands too
    work = Path(tempfile.mkdtemp(prefix=".to_universal.", dir=folder.parent))
    source = sum(f.stat().st_size for f in folder.iterdir() if f.is_file()), f"a copy of {folder.name}"
    with errors.full_disk_is_one_line(out, cleanup=lambda: shutil.rmtree(work, ignore_errors=True), needed=source):
        tmp = work / out.name
        if ep == 1:
            _ds_to_universal(folder, work / "input", tmp, workers, trust)
            _keep_parameters(tmp / "zero", set().union(*names), lambda name: name)
        else:  # each EP rank's files alone, its experts renamed to their global indices (_merge_expert_parallel_rank)
            local = checkpoint.load_config_of(folder).moe_num_experts // ep
            for rank in range(ep):
                part = work / f"ep{rank}"
                _ds_to_universal(folder, work / f"input{rank}", part, workers, trust, ep_rank=rank, tp=tp, ep=ep,
                                 pp=pp)
                _merge_expert_parallel_rank(part, tmp, rank, local, tp, ep, set().union(
                    *(names[i] for i in range(len(names)) if _rank_coordinates(i, tp, ep)[1] == rank)))
        for f in [*checkpoint.rng_files(folder), folder / checkpoint.CONFIG_FILE, folder / checkpoint.LORA_FILE]:
            if f.is_file():
                shutil.copyfile(f, tmp / f.name)
        if (folder / checkpoint.CONFIG_FILE).is_file():
            checkpoint.copy_tokenizer(tmp, checkpoint.tokenizer_of(folder, checkpoint.load_config_of(folder)))
        if (folder / "reference").is_dir():  # DPO/KTO's frozen reference (checkpoint.REFERENCE_DIR), read at any TP
            shutil.copytree(folder / "reference", tmp / "reference")
        checkpoint.fsync_tree(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    shutil.rmtree(work, ignore_errors=True)
    checkpoint.write_atomic(folder.parent / checkpoint.LATEST_UNIVERSAL_FILE, out.name)
    return out


def _ds_to_universal(folder: Path, source_dir: Path, output: Path, workers: int, trust: bool,
                     ep_rank: int | None = None, tp: int = 1, ep: int = 1, pp: int = 1) -> None:
    """DeepSpeed's ds_to_universal on the step's own files (links), not the frozen reference of DPO/KTO (reference/,
    model-states files of another model), copied over by convert. With `ep_rank`: that expert-parallel rank's files
    only, numbered as a run of `pp` stages x `tp` TP ranks numbers them (mp_rank_{stage x TP + TP rank}), its ZeRO
    shards over its expert-data-parallel ranks; the pipeline layer files (written by EP rank 0, every expert under
    its global index) are linked as they are: the converter reads only their names."""
    from deepspeed.checkpoint import ds_to_universal

    source_dir.mkdir()
    for f in folder.iterdir():
        if f.name == "reference":
            continue
        m = _RANK_FILE.fullmatch(f.name)
        if ep_rank is None or m is None:
            (source_dir / f.name).symlink_to(f.resolve())
        elif (rank := _rank_coordinates(int(m[2]), tp, ep))[1] == ep_rank:
            stage, _, tp_rank = rank
            _link_as_tp_group(f, source_dir / f"{m[1]}{stage * tp + tp_rank:02d}{m[3]}", pp, tp, trust)
    args = argparse.Namespace(input_folder=str(source_dir), output_folder=str(output), num_extract_workers=workers,
                              num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    try:
        with safe_unpickling(trust):
            ds_to_universal.main(args)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - DeepSpeed's asserts: one line naming the folder
        if errors.disk_is_full(err, output):
            raise  # the enclosing block says so in its own line
        raise UserError(f"DeepSpeed's ds_to_universal failed on {folder}: {type(err).__name__}: {err}") from None


# a (stage, EP, TP) rank's model states or ZeRO shard: mp_rank_XX is _saved_rank's number
_RANK_FILE = re.compile(r"(.*mp_rank_)(\d+)(_(?:model|optim)_states\.pt)")
# DeepSpeed's record of a model states file's layout (deepspeed.checkpoint.constants), which its converter checks
_PARALLEL_DIMS, _PP_DEGREE, _TP_DEGREE = "checkpoint_parallel_dimensions", "pp_degree", "tp_degree"


def _saved_rank(stage: int, ep_rank: int, tp_rank: int, tp: int, ep: int) -> int:
    """The mp_rank number of a (pipeline stage, EP rank, TP rank)'s files: TP rank + TP x (EP rank + EP x stage).
    Without pipelines parallel.MPU gives DeepSpeed that model-parallel rank; with them DeepSpeed's grid, whose model
    axis is TP x EP ranks (training/pipeline.py's build_pipeline), numbers its (stage, model) ranks so."""
    return tp_rank + tp * (ep_rank + ep * stage)


def _rank_coordinates(saved_rank: int, tp: int, ep: int) -> tuple[int, int, int]:
    """(pipeline stage, EP rank, TP rank) of an mp_rank number: the inverse of _saved_rank."""
    return saved_rank // (tp * ep), saved_rank // tp % ep, saved_rank % tp


def _link_as_tp_group(f: Path, link: Path, pp: int, tp: int, trust: bool) -> None:
    """`link` to `f`, one EP rank's file; a pipelined run's model states file is copied instead, recording `pp`
    stages x `tp` TP ranks where DeepSpeed's grid recorded its model axis (TP x EP): the converter checks that
    record against the number of files it is given."""
    if not link.name.endswith("_model_states.pt") or pp == 1:
        link.symlink_to(f.resolve())
        return
    states = checkpoint.read_file(f, trust)
    states[_PARALLEL_DIMS] = {_PP_DEGREE: pp, _TP_DEGREE: tp}
    torch.save(states, link)


def _keep_parameters(zero: Path, names: set[str], rename) -> None:
    """Drops the converter's fp32 copies of `module` entries (GPT-NeoX's `sequential.*` names, no parameter's:
    never read) and renames the parameters' folders by `rename`."""
    for entry in list(zero.iterdir()):
        if entry.is_dir() and entry.name not in names:
            shutil.rmtree(entry)
        elif entry.is_dir() and rename(entry.name) != entry.name:
            entry.rename(zero / rename(entry.name))


def _merge_expert_parallel_rank(part: Path, out: Path, ep_rank: int, local_experts: int, tp: int, ep: int,
                                names: set[str]) -> None:
    """One EP rank's universal folder into `out`, the folder a one-process (EP = 1) run would give.

    ds_to_universal merges the ZeRO fragments of each name over the data-parallel files it is given, and has no
    notion of the expert-data-parallel group, nor of megatron-core's local expert numbering (local_experts.E names
    another expert on each EP rank): so each EP rank is converted alone (its shards are over its own expert-data-
    parallel ranks; its dense tensors and their Adam moments are those of every EP rank, averaged gradients), its
    experts renamed to their global index (EP rank x local experts + E), its dense tensors taken from EP rank 0.
    The model states files get their saved (stage, EP, TP) numbers back, for the iteration and data position they
    carry."""
    from neox_fork.model.moe import global_expert_names, is_expert

    zero = part / "zero"
    def rename(name: str) -> str:
        return next(iter(global_expert_names({name: None}, ep_rank, local_experts)))

    experts = {name for name in names if is_expert(name)}
    _keep_parameters(zero, names if ep_rank == 0 else experts, rename)
    if ep_rank == 0:
        part.rename(out)
        part = out
    else:
        for entry in zero.iterdir():
            if entry.is_dir():
                entry.rename(out / "zero" / entry.name)
    files = [(int(m[2]), f, m) for f in part.iterdir() if (m := _RANK_FILE.fullmatch(f.name))]
    for n, f, m in sorted(files, key=lambda x: x[0], reverse=True):  # a saved number is never below n: the highest
        f.rename(out / f"{m[1]}{_saved_rank(n // tp, ep_rank, n % tp, tp, ep):02d}{m[3]}")  # first clobber none


# ---------------------------------------------------------------------- loading (load_universal: true)
@contextlib.contextmanager
def safe_unpickling(trust: bool = False):
    """Every torch.load in the block uses the weights-only unpickler allowing safe_unpickle.SAFE_GLOBALS.

    DeepSpeed's universal loader and converter read files with torch.load(weights_only=False), calls that
    its checkpoint engine does not route (so checkpoint.read_file cannot take them over). torch's documented
    TORCH_FORCE_WEIGHTS_ONLY_LOAD switch, set for the block only, makes those loads safe too; the files were
    checked by read_file first (check_folder, convert), which gives the one-line errors.
    """
    if trust:
        yield
        return
    key, old = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(safe_unpickle.allowed_globals()):
            yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def check_folder(folder: Path, params: dict[str, torch.Tensor], tp: int, trust: bool = False,
                 trainable: set[str] | None = None) -> None:
    """Before DeepSpeed reads a universal folder: each file this run reads loads safely (checkpoint.read_file,
    storage mapped, not read) and holds the full size this model needs; anything else is one line. `trainable`:
    the names the optimizer holds when that is not all of `params` (LoRA: the adapters)."""
    zero = folder / "zero"
    if not zero.is_dir():
        raise UserError(f"'{folder}' is not a universal checkpoint (no zero/ folder); make one with "
                        f"python tools/ckpts/to_universal.py --input-dir {folder.parent}")
    checkpoint.read_file(zero / "optimizer_state.pt", trust, mmap=True)
    for name, p in params.items():
        if trainable is not None and name not in trainable:  # LoRA's frozen base: read from its folder, not zero/
            continue
        need = list(p.shape)
        spec = checkpoint.sharding(name, params)
        if spec is not None:
            need[spec[0]] *= tp
        if not (zero / name / "fp32.pt").is_file():
            raise UserError(f"universal checkpoint {folder} does not fit this model: it has no {name} "
                            f"(zero/{name}/fp32.pt); check num_layers and the architecture keys")
        for f in sorted((zero / name).glob("*.pt")):
            state = checkpoint.read_file(f, trust, mmap=True)
            if f.name != "fp32.pt":
                continue
            got = list(state["param"].shape) if isinstance(state, dict) and "param" in state else None
            if got != need and name in _VOCABULARY_PARAMS and got and got[1:] == need[1:]:
                keys = checkpoint.vocab_keys_for(got[0], tp, str(f))
                raise UserError(f"{f}: the checkpoint's vocabulary is padded to {got[0]} rows, this run pads to "
                                f"{need[0]}; set make_vocab_size_divisible_by: {keys['make_vocab_size_divisible_by']}"
                                " to keep the trained padding rows")
            if got != need:
                raise UserError(f"universal checkpoint {folder} does not fit this model: {name} is {got}, the model "
                                f"needs {need}; check num_layers/hidden_size/vocab settings")


def rng_source(tp_rank: int, dp_rank: int, saved_tp: int, saved_dp: int) -> tuple[int, bool]:
    """(the saved global rank whose RNG state the rank at (tp_rank, dp_rank) takes, whether its TP rank is the same).

    The same coordinates when the saved layout has them, else (tp_rank mod saved_tp, dp_rank mod saved_dp);
    ranks are numbered dp_rank x tp + tp_rank (tensor-parallel groups are neighbours, see parallel/groups.py). The
    default generator is seeded and drawn alike on every rank (dropout masks are drawn whole, see
    model.HiddenDropout), so any coordinates continue it; the per-TP-rank "model-parallel" stream is taken only
    from the same TP rank, so TP ranks never share one.
    """
    return (dp_rank % saved_dp) * saved_tp + tp_rank % saved_tp, tp_rank < saved_tp


def resolve_load(c: NeoXConfig) -> NeoXConfig:
    """The config to build the engine with: `load_universal` stays on only while the universal checkpoint is the
    newest in `load`. A regular checkpoint saved after it (by the resumed run, at the new layout) is what a
    restart with the same config must continue from, so it gets a config without load_universal."""
    if not (c.load_universal and c.load):
        return c
    universal_step = checkpoint.read_latest_universal(c.load)
    if universal_step is None:
        raise UserError(f"{c.where('load_universal')}: load_universal is on but '{c.load}' has no "
                        f"{checkpoint.LATEST_UNIVERSAL_FILE} file; make one with python tools/ckpts/to_universal.py "
                        f"--input-dir {c.load}")
    step = checkpoint.read_latest(c.load)
    if step is not None and step > universal_step:
        log.info("load_universal: %s holds step %d, newer than its universal checkpoint (step %d): resuming from "
                 "step %d", c.load, step, universal_step, step)
        return dataclasses.replace(c, load_universal=False)
    return c
