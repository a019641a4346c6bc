"""Checkpoints in DeepSpeed's layout, as GPT-NeoX writes them, plus tensor-parallel merge and split.

    CKPT_DIR/latest                                    -> "global_step{N}"
    CKPT_DIR/global_step{N}/mp_rank_{XX}_model_states.pt   DeepSpeed's engine state of TP rank XX; its
                                                       `module` holds the weights when pipe_parallel_size
                                                       is 0 (GPT-NeoX's `sequential.{idx}.*` names)
                                                       (expert-parallel: of tensor x expert rank XX =
                                                       TP rank + TP x EP rank; EP rank 0's holds every
                                                       expert, the others' only their own, by global index)
    CKPT_DIR/global_step{N}/layer_{II}-model_{XX}-model_states.pt
                                                       layer II's weights of TP rank XX (GPT-NeoX with
                                                       pipe_parallel_size >= 1; see checkpoint/neox_layout.py)
    CKPT_DIR/global_step{N}/*optim_states.pt           ZeRO optimizer shards (written by training)
    CKPT_DIR/global_step{N}/config.yml                 the merged config the run used
    CKPT_DIR/global_step{N}/tokenizer.json             a copy of the tokenizer's files, when the config names
                                                       them (tokenizer.json, vocab.json + merges.txt,
                                                       tokenizer.model, *.tiktoken: TokenizerSource.saved_names)
    CKPT_DIR/global_step{N}/tokenizer_config.json,     the chat template and special tokens of the transformers
        chat_template.jinja, special_tokens_map.json   folder the tokenizer.json came from, when it has a chat
                                                       template (TokenizerSource.chat_files): the step folder
                                                       is then itself a folder AutoTokenizer loads

We write GPT-NeoX's layout for the configured pipe_parallel_size and read both of its layouts and the
one this project wrote before (`layers.N.*` names in `module`). A step folder is written under a
temporary name and renamed when complete, and `latest` is replaced atomically afterwards, so a crash
mid-save never leaves a half checkpoint that `latest` points to. Every writer here removes what it half
wrote on failure; a full filesystem is one line (errors.full_disk_is_one_line).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch
import yaml

from neox_fork.checkpoint import atomic
from neox_fork.checkpoint import names as checkpoint_names
from neox_fork.checkpoint import neox_layout
from neox_fork.checkpoint import safe_unpickle
from neox_fork.checkpoint.names import (LATEST_FILE, LATEST_UNIVERSAL_FILE, OLD_SUFFIX, PARTIAL_SUFFIX,
                                        REFERENCE_DIR, UNIVERSAL_SUFFIX, folder_step, partial_dir, pointed_step,
                                        saved_steps, step_dir, step_name, step_of)
from neox_fork.config.neox_config import NeoXConfig
from neox_fork.config.loading import from_dict
from neox_fork.checkpoint.atomic import fsync, fsync_tree, write_atomic
from neox_fork.errors import UserError, full_disk_is_one_line

MODEL_FILE = "mp_rank_{:02d}_model_states.pt"
LAYER_FILE = "layer_{:02d}-model_{:02d}-model_states.pt"  # GPT-NeoX with pipe_parallel_size >= 1
_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")
_ZERO_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")  # DeepSpeed's ZeRO shards
CONFIG_FILE = "config.yml"
CONFIGS_DIR = "configs"  # the run's config files as given, as GPT-NeoX keeps them
TOKENIZER_FILE = "tokenizer.json"

log = logging.getLogger("neox_fork")

# How each parameter is split over tensor-parallel ranks: (dim, stride) or None when replicated (norms, row-
# parallel biases, learned positions). Column-parallel biases split as their weights. The fused QKV is one
# block of rows per key/value head, so grouped-query attention splits by whole groups with stride 1.
# "mlp": linear1 has stride 2 when the MLP is gated (each rank holds [up_r; gate_r], so the merged weight
# is [up; gate]) and 1 when it is not; which one is read from the shapes (see _mlp_stride).
_SHARDING = [
    (r"word_embeddings\.weight", (0, 1)),
    (r"output_layer\.weight", (0, 1)),
    (r"layers\.\d+\.attention\.query_key_value\.(weight|bias)", (0, 1)),
    (r"layers\.\d+\.mlp\.linear1\.(weight|bias)", (0, "mlp")),
    (r"layers\.\d+\.attention\.qk_layernorm\.(weight|bias|scale)", (0, 1)),  # [heads, head_dim] by heads
    (r"layers\.\d+\.attention\.dense\.weight", (1, 1)),
    (r"layers\.\d+\.mlp\.linear2\.weight", (1, 1)),
    # MoE experts split over TP as the dense MLP (megatron-core's expert tensor parallel size = TP); router whole
    (r"layers\.\d+\.mlp\.moe\.experts\.local_experts\.\d+\.linear_fc1\.weight", (0, "mlp")),
    (r"layers\.\d+\.mlp\.moe\.experts\.local_experts\.\d+\.linear_fc2\.weight", (1, 1)),
    # LoRA adapters (model/adapters.py): B split as a column-parallel W's rows, A as a row-parallel W's columns;
    # the other factor whole on every rank
    (r"layers\.\d+\.attention\.query_key_value\.lora\.B", (0, 1)),
    (r"layers\.\d+\.mlp\.linear1\.lora\.B", (0, "mlp")),
    (r"layers\.\d+\.(attention\.dense|mlp\.linear2)\.lora\.A", (1, 1)),
]


def _mlp_stride(name: str, state: dict[str, torch.Tensor]) -> int:
    """2 for a gated MLP (linear1 gives twice linear2's inputs), 1 for a plain one; the same on any shard."""
    if ".linear_fc1." in name:  # an MoE expert
        fc1, fc2 = name, name.replace(".linear_fc1.", ".linear_fc2.")
    else:
        layer = name.rsplit(".mlp.", 1)[0]
        fc1, fc2 = f"{layer}.mlp.linear1.weight", f"{layer}.mlp.linear2.weight"
    return 2 if state[fc1].shape[0] == 2 * state[fc2].shape[1] else 1


def sharding(name: str, state: dict[str, torch.Tensor] | None = None) -> tuple[int, int] | None:
    """(dim, stride) of `name` over tensor-parallel ranks, None when replicated; `state` (any shard or the
    merged state) resolves the MLP's stride."""
    for pattern, (dim, stride) in _SHARDING:
        if re.fullmatch(pattern, name):
            if stride == "mlp":  # without a state only "split or not" is known
                stride = _mlp_stride(name, state) if state is not None else None
            return dim, stride
    return None


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors without megatron-core's empty `_extra_state` entries."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def merge_tp_shards(shards: list[dict[str, torch.Tensor]], specs: dict | None = None) -> dict[str, torch.Tensor]:
    """Per-rank states -> the state a TP=1 model would have. `specs` ({name: (dim, stride) or None}) gives the split
    of names the table does not know (LoRA adapters: model/adapters.py)."""
    merged = {}
    for name, first in shards[0].items():
        spec = specs[name] if specs and name in specs else sharding(name, shards[0])
        if spec is None or len(shards) == 1:
            merged[name] = first
            continue
        dim, stride = spec
        pieces = [s[name].chunk(stride, dim=dim) for s in shards]
        merged[name] = torch.cat([p[j] for j in range(stride) for p in pieces], dim=dim)
    return merged


def split_tp(full: dict[str, torch.Tensor], tp: int, specs: dict | None = None) -> list[dict[str, torch.Tensor]]:
    """A TP=1 state -> the states of `tp` ranks (the inverse of merge_tp_shards)."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for name, tensor in full.items():
        spec = specs[name] if specs and name in specs else sharding(name, full)
        for rank in range(tp):
            if spec is None:
                shards[rank][name] = tensor
                continue
            dim, stride = spec
            if tensor.shape[dim] % (tp * stride):
                raise UserError(f"cannot split {name} of shape {tuple(tensor.shape)} over {tp} tensor-parallel "
                                f"ranks; dim {dim} must be divisible by {tp * stride}")
            parts = [c.chunk(tp, dim=dim)[rank] for c in tensor.chunk(stride, dim=dim)]
            shards[rank][name] = torch.cat(parts, dim=dim).clone()
    return shards


# ---------------------------------------------------------------------- names
# The on-disk names are neox_fork.checkpoint.names's; these stay reachable here for the modules that use them.
RNG_FILE, rng_files = checkpoint_names.RNG_FILE, checkpoint_names.rng_files
universal_dir = checkpoint_names.universal_dir


# ---------------------------------------------------------------------- locating checkpoints
def read_latest(ckpt_dir: str | os.PathLike) -> int | None:
    return _pointed_step(Path(ckpt_dir) / LATEST_FILE)


def read_latest_universal(ckpt_dir: str | os.PathLike) -> int | None:
    """The step of the universal checkpoint `latest_universal` names; None when there is none."""
    return _pointed_step(Path(ckpt_dir) / LATEST_UNIVERSAL_FILE, UNIVERSAL_SUFFIX)


def _pointed_step(pointer: Path, suffix: str = "") -> int | None:
    """checkpoint_names.pointed_step, whose refusal becomes one line; a `latest` naming something else also
    lists the step folders that do load."""
    try:
        return pointed_step(pointer, suffix)
    except ValueError as err:
        note = "" if suffix else _loadable_note(pointer.parent)
        raise UserError(f"{pointer}: expected 'global_stepN{suffix}', found {err.args[0]!r}{note}") from None


def published_dir(ckpt_dir: str | os.PathLike, step: int) -> Path:
    """Step `step`'s folder; its previous copy if a crash hit while it was being replaced (see publish)."""
    final = step_dir(ckpt_dir, step)
    old = final.with_name(final.name + OLD_SUFFIX)
    return old if not final.exists() and old.is_dir() else final


def resolve(path: str | os.PathLike, step: int | None = None) -> Path:
    """A checkpoint folder (with `latest`) or one of its global_step folders -> the step folder to read."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint '{path}' not found")
    if (path / MODEL_FILE.format(0)).is_file() or (step is None and step_of(path.name) is not None):
        return path
    if step is None:
        step = read_latest(path)
        if step is None:
            raise UserError(f"'{path}' holds no checkpoint: no 'latest' file and no {MODEL_FILE.format(0)}"
                            f"{_loadable_note(path)}")
    found = published_dir(path, step)
    if not found.is_dir():
        raise UserError(f"checkpoint step folder '{found}' is missing{_loadable_note(path)}")
    return found


def load_config_of(folder: Path) -> NeoXConfig:
    """The step folder's config.yml; for a GPT-NeoX checkpoint, the files it keeps under configs/."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        upstream = sorted(p for p in (folder / CONFIGS_DIR).glob("*") if p.suffix in (".yml", ".yaml", ".json"))
        if upstream:
            from neox_fork.config.loading import load_config

            return load_config(*upstream)
        raise UserError(f"checkpoint '{folder}' has no {CONFIG_FILE} (nor GPT-NeoX's configs/ folder)"
                        f"{_loadable_note(folder.parent)}")
    try:
        keys = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not readable YAML ({str(err).splitlines()[0]}){_loadable_note(folder.parent)}") \
            from None
    if not isinstance(keys, dict):
        raise UserError(f"{path}: expected a mapping of config keys{_loadable_note(folder.parent)}")
    return from_dict(keys, source=str(path))


def tokenizer_of(folder: Path, config: NeoXConfig):
    """The config's tokenizer (a data.tokenizer.TokenizerSource) read from the copies saved with the checkpoint,
    else from the files the config names; None when neither is there."""
    from neox_fork.data.tokenizer import TokenizerSource

    named = TokenizerSource.of_config(config)
    for source in (named.in_folder(folder), named):
        if source.exists():
            return source
    return None


def tp_size_of(folder: Path) -> int:
    """The tensor-parallel size a step folder was saved at; a missing rank file is one clear line."""
    ranks = sorted(int(m[1]) for p in folder.glob("mp_rank_*_model_states.pt")
                   if (m := re.fullmatch(r"mp_rank_(\d+)_model_states\.pt", p.name)))
    # pipelined: one mp_rank file per (stage, TP rank); expert-parallel: per (EP rank, TP rank)
    expected, pp = _saved_tp(folder), pp_size_of(folder) * ep_size_of(folder)
    files = max((expected or 1) * pp, ranks[-1] + 1 if ranks else 1)
    n = max(files // pp, 1)
    missing = [r for r in range(files) if r not in ranks]
    if missing:
        stages = f" x {pp} pipeline stages" if pp > 1 else ""
        raise UserError(f"checkpoint file '{folder / MODEL_FILE.format(missing[0])}' is missing (the checkpoint has "
                        f"{n} tensor-parallel ranks{stages}){_loadable_note(folder.parent, folder)}")
    layers = _layer_files(folder)
    if layers:  # GPT-NeoX's per-layer files: every rank has every layer index
        indices = set().union(*(set(files) for files in layers.values()))
        for rank in range(n):
            for idx in sorted(indices - set(layers.get(rank, {}))):
                raise UserError(f"checkpoint file '{folder / LAYER_FILE.format(idx, rank)}' is missing"
                                f"{_loadable_note(folder.parent, folder)}")
    return n


def dp_size_of(folder: Path) -> int | None:
    """The data-parallel size a step folder's ZeRO shards were saved at; None without ZeRO shards (stage 0).
    Expert-parallel: each (EP, TP) rank's shards are over the expert-data-parallel ranks, EP of them in DP."""
    return len(_zero_shards(folder).get(0, ())) * ep_size_of(folder) or None


def ep_size_of(folder: Path) -> int:
    """expert_model_parallel_size a step folder was saved at (1 without expert parallelism)."""
    return max(_saved_key(folder, "expert_model_parallel_size") or 1, 1)


def _zero_shards(folder: Path) -> dict[int, set[int]]:
    """{tp rank: {dp ranks}} of the ZeRO optimizer shards in a step folder."""
    shards: dict[int, set[int]] = {}
    for f in folder.glob("*optim_states.pt"):
        if m := _ZERO_FILE.fullmatch(f.name):
            shards.setdefault(int(m[2]), set()).add(int(m[1]))
    return shards


def _layer_files(folder: Path) -> dict[int, dict[int, Path]]:
    """{tp rank: {layer index: file}} of GPT-NeoX's per-layer files in a step folder."""
    found: dict[int, dict[int, Path]] = {}
    for p in folder.glob("layer_*-model_*-model_states.pt"):
        if m := _LAYER_FILE.fullmatch(p.name):
            found.setdefault(int(m[2]), {})[int(m[1])] = p
    return found


def _saved_key(folder: Path, key: str) -> int | None:
    """An integer key from the step folder's config.yml, without validating the whole config."""
    try:
        keys = yaml.safe_load((folder / CONFIG_FILE).read_text())
        value = keys.get(key, keys.get(key.replace("_", "-")))
        return int(value) if value else None
    except Exception:  # noqa: BLE001 - no or unreadable config: count the files instead
        return None


def _saved_tp(folder: Path) -> int | None:
    """model_parallel_size from the step folder's config.yml."""
    return _saved_key(folder, "model_parallel_size")


def pp_size_of(folder: Path) -> int:
    """The number of pipeline stages a step folder was saved with (1 for pipe_parallel_size 0 or 1)."""
    return max(_saved_key(folder, "pipe_parallel_size") or 1, 1)


# ---------------------------------------------------------------------- reading without running code
def read_file(path: str | os.PathLike, trust: bool = False, mmap: bool = False):
    """The one place a checkpoint file (ours, DeepSpeed's, GPT-NeoX's) is unpickled: safe_unpickle.read_file,
    whose refusals and one-line errors this keeps, with the step folders that do load named when the file
    is missing, truncated or foreign."""
    try:
        return safe_unpickle.read_file(path, trust, mmap)
    except safe_unpickle.UnreadableFile as err:
        raise UserError(f"{err}{_loadable_note(*_context(Path(path)))}") from None


def _context(path: Path) -> tuple[Path, Path | None]:
    """(checkpoint folder, the step folder holding `path`) for error notes."""
    folder = path.parent
    if folder_step(folder) is not None:
        return folder.parent, folder
    return folder, None


def step_is_intact(folder: Path) -> bool:
    """Cheap check that a step folder would load: every rank's model file is present and every .pt file
    is a complete zip archive (a truncated one loses its central directory at the end)."""
    try:
        tp_size_of(folder)
    except UserError:
        return False
    files = list(folder.glob("*.pt"))
    if not files or not all(zipfile.is_zipfile(f) or safe_unpickle.looks_like_legacy_torch(f) for f in files):
        return False
    shards = _zero_shards(folder)  # every TP rank has DP ranks 0..D-1
    return all(dp == set(range(len(dp))) for dp in shards.values()) and len({len(d) for d in shards.values()}) <= 1


def _loadable_note(ckpt_dir: Path, broken: Path | None = None) -> str:
    """'; step folders in DIR that load: ...' for an error message."""
    try:
        good = [step_name(s) for s in saved_steps(ckpt_dir)
                if step_dir(ckpt_dir, s) != broken and step_is_intact(step_dir(ckpt_dir, s))]
    except OSError:
        return ""
    if not good:
        return f"; no step folder in '{ckpt_dir}' loads" if saved_steps(ckpt_dir) else ""
    return f"; step folders in '{ckpt_dir}' that load: {', '.join(good)} (pick one with --step or 'latest')"


# ---------------------------------------------------------------------- LoRA checkpoints
# A LoRA run (adapter: lora, model/adapters.py) saves only its adapter tensors (in our names, in each mp_rank file's
# `module`) and this file, naming the step folder of the frozen base weights and how each adapter tensor splits
# over TP ranks; readers below return base + adapters, so a LoRA step folder reads like any other.
LORA_FILE = "lora_adapters.json"


def lora_info(folder: Path) -> dict | None:
    """{"base": base step folder, "sharding": {name: [dim, stride] or None}} of a LoRA step folder; None otherwise."""
    import json

    path = Path(folder) / LORA_FILE
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    info["sharding"] = {k: tuple(v) if v else None for k, v in info["sharding"].items()}
    return info


def lora_base_of(folder: Path) -> Path:
    """The base weights' step folder of a LoRA step folder (one line when it is gone)."""
    base = Path(lora_info(folder)["base"])
    if not base.is_dir():
        raise UserError(f"{Path(folder) / LORA_FILE}: the base checkpoint {base} it adapts is missing; a LoRA "
                        "checkpoint holds only its adapters: restore the base folder there")
    return base


def save_lora_info(folder: Path, base: Path, sharding: dict) -> None:
    import json

    (Path(folder) / LORA_FILE).write_text(json.dumps({"base": str(Path(base).resolve()), "sharding": sharding},
                                                     indent=1, sort_keys=True) + "\n")


def _specs(folder: Path) -> dict | None:
    info = lora_info(folder)
    return info["sharding"] if info else None


def _load_shard(folder: Path, rank: int, trust: bool = False) -> dict[str, torch.Tensor]:
    """TP rank `rank`'s weights in our names, from any of the three layouts (see module docstring); a LoRA
    folder's are its base's at this TP size plus its adapters."""
    adapters = _load_own_shard(folder, rank, trust)
    if lora_info(folder) is None:
        return adapters
    return {**load_rank_shard(lora_base_of(folder), tp_size_of(folder), rank, trust), **adapters}


def _load_own_shard(folder: Path, rank: int, trust: bool = False) -> dict[str, torch.Tensor]:
    layer_files = _layer_files(folder).get(rank)
    if layer_files:
        return neox_layout.from_neox({idx: _tensors(read_file(path, trust), path) for idx, path in layer_files.items()},
                                     _qkv_of(folder))
    path = folder / MODEL_FILE.format(rank)
    states = read_file(path, trust)
    return weights_of_module(states.get("module") if isinstance(states, dict) else None, path)


def weights_of_module(module, path: Path) -> dict[str, torch.Tensor]:
    """The `module` of an mp_rank file (our names or GPT-NeoX's `sequential.{idx}.*`) in our names."""
    if not isinstance(module, dict) or not module:
        raise UserError(f"checkpoint file '{path}' holds no model weights (no 'module' state dict, no layer_* "
                        f"files beside it); it is not a model states file{_loadable_note(*_context(path))}")
    layers = neox_layout.from_sequential(_tensors(module, path))
    state = neox_layout.from_neox(layers, _qkv_of(path.parent)) if layers is not None else module
    return {k: v for k, v in state.items() if not k.endswith("_extra_state")}


def _tensors(states, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(states, dict) or not all(isinstance(v, torch.Tensor) or v is None for v in states.values()):
        raise UserError(f"checkpoint file '{path}' does not hold a state dict of tensors"
                        f"{_loadable_note(*_context(path))}")
    return {k: v for k, v in states.items() if v is not None}


def load_model_shards(folder: Path, trust: bool = False) -> list[dict[str, torch.Tensor]]:
    return [_load_shard(folder, rank, trust) for rank in range(tp_size_of(folder))]


def load_rank_shard(folder: Path, tp: int, rank: int, trust: bool = False) -> dict[str, torch.Tensor]:
    """TP rank `rank`'s weights for a run at TP size `tp`: its own file when the checkpoint was saved at
    that size, else the merged weights split again."""
    if tp_size_of(folder) == tp:
        return _load_shard(folder, rank, trust)
    specs = _specs(folder)
    return split_tp(merge_tp_shards(load_model_shards(folder, trust), specs), tp, specs)[rank]


def load_merged(path: str | os.PathLike, step: int | None = None, trust: bool = False):
    """(merged TP=1 state, config, step folder) of a checkpoint saved at any TP size."""
    folder = resolve(path, step)
    config = load_config_of(folder)
    return merge_tp_shards(load_model_shards(folder, trust), _specs(folder)), config, folder


# ---------------------------------------------------------------------- writing
# The project's atomic file writes are neox_fork.checkpoint.atomic's; these names stay here for the modules that write
# through this one.
atomic_path, commit_temp, temp_path_for = atomic.atomic_path, atomic.commit_temp, atomic.temp_path_for


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, needed: tuple[int, str] | None = None):
    """An empty temporary folder that replaces the folder `path` whole when the block succeeds; `needed`
    (bytes, what) goes into the message when the filesystem fills up."""
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with full_disk_is_one_line(path, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True), needed=needed):
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    fsync(path.parent)


def save_config(folder: Path, config: NeoXConfig) -> None:
    """The merged config (no nulls, so upstream's tools read it) and, under configs/, each file as given."""
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=True))
    if config.given_files:
        (folder / CONFIGS_DIR).mkdir(exist_ok=True)
        for name, data in config.given_files.items():
            (folder / CONFIGS_DIR / name).write_bytes(data)


def copy_tokenizer(folder: Path, tokenizer) -> None:
    """Copy a tokenizer's files into a step folder: `tokenizer` is a data.tokenizer.TokenizerSource or the path
    of a tokenizer.json (HFTokenizer), with its folder's chat files when it has a chat template; nothing when
    its files are not there."""
    from neox_fork.data.tokenizer import TokenizerSource

    if not tokenizer:
        return
    source = tokenizer if isinstance(tokenizer, TokenizerSource) else TokenizerSource("HFTokenizer", str(tokenizer))
    if not source.exists():
        return
    for key, name in source.saved_names().items():
        path = Path(getattr(source, key))
        if path.is_dir():
            shutil.copytree(path, folder / name, dirs_exist_ok=True)
        else:
            shutil.copyfile(path, folder / name)
    for path in source.chat_files():
        shutil.copyfile(path, folder / path.name)


def _no_fault(stage: str) -> None:
    pass


def publish(tmp_folder: Path, ckpt_dir: Path, step: int, fault=_no_fault) -> Path:
    """Move a completely written step folder into place, then point `latest` at it.

    Order: flush the files and folder to disk, rename into place (an existing folder of that step is
    moved aside first and deleted last), flush the parent, then replace `latest` atomically. A crash at
    any point leaves `latest` naming a complete folder: while a step is being replaced, readers use its
    `.old` copy (published_dir). `fault(stage)` is called between the stages, so tests can crash there.
    """
    final = step_dir(ckpt_dir, step)
    fsync_tree(tmp_folder)
    fault("before_rename")
    old = final.with_name(final.name + OLD_SUFFIX)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        fault("replacing")
        os.replace(tmp_folder, final)
    else:
        os.replace(tmp_folder, final)
    fsync(Path(ckpt_dir))
    fault("before_latest")
    write_atomic(Path(ckpt_dir) / LATEST_FILE, step_name(step))
    shutil.rmtree(old, ignore_errors=True)
    return final


def recover(ckpt_dir: str | os.PathLike) -> None:
    """Finish what a crashed publish left: a step folder moved aside (`.old`) goes back where its new copy
    never arrived, or is deleted where it did; half-written `.partial` folders are deleted."""
    for old in Path(ckpt_dir).glob(f"global_step*{OLD_SUFFIX}"):
        final = old.with_name(old.name.removesuffix(OLD_SUFFIX))
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)
    for partial in Path(ckpt_dir).glob(f"global_step*{PARTIAL_SUFFIX}"):
        shutil.rmtree(partial, ignore_errors=True)


def start_partial(ckpt_dir: str | os.PathLike, step: int) -> Path:
    """A fresh, empty folder to write step `step` into, after recovering from any crashed save."""
    recover(ckpt_dir)
    tmp = partial_dir(ckpt_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def qkv_groups(config: NeoXConfig, tp: int) -> neox_layout.QKVGroups:
    """One TP rank's fused-QKV geometry (GPT-NeoX orders those rows differently under grouped-query attention)."""
    return neox_layout.QKVGroups(config.kv_heads // tp, config.num_attention_heads // config.kv_heads,
                                 config.head_dim)


def _qkv_of(folder: Path) -> neox_layout.QKVGroups | None:
    """The QKV geometry of a step folder's ranks; None when it has no config (nothing to reorder without one)."""
    try:
        return qkv_groups(load_config_of(folder), tp_size_of(folder))
    except UserError:
        return None


def neox_weights(state: dict[str, torch.Tensor], config: NeoXConfig, tp: int) -> tuple[dict, dict[int, dict]]:
    """A rank's weights as GPT-NeoX writes them: (the mp_rank file's `module`, {layer index: tensors} for
    layer files). pipe_parallel_size >= 1: layer files, and an empty module (DeepSpeed's zero_to_fp32
    expects a dict there); 0: `sequential.{idx}.*` keys in the module, no layer files."""
    layers = neox_layout.to_neox(state, config.num_layers, qkv=qkv_groups(config, tp))
    if config.pipe_parallel_size >= 1:
        return {}, layers
    return neox_layout.to_sequential(layers), {}


# What share of a storage the tensors viewing it must cover before a save may write that storage whole: torch.save
# writes every storage a tensor views in full, so a layer's weights viewing DeepSpeed's flat parameter buffer would
# write the whole buffer into each layer's file. Below this share the views are copied out first (compact).
_COVERED = 0.97


def compact(tree):
    """`tree` (tensors in dicts, lists and tuples) with the tensors that view a storage mostly not theirs replaced by
    copies of their own bytes, so that torch.save writes only them (at most 1/_COVERED of their bytes). Views that
    together cover their storage (all of a flat buffer's parameters in one file) are kept: no copy is made."""
    views: dict[int, dict[tuple, torch.Tensor]] = {}  # storage -> distinct views of it

    def collect(node):
        if isinstance(node, torch.Tensor):
            key = (node.data_ptr(), tuple(node.shape), node.stride(), node.dtype)
            views.setdefault(node.untyped_storage().data_ptr(), {})[key] = node
        elif isinstance(node, dict):
            for value in node.values():
                collect(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                collect(value)

    collect(tree)
    copied: dict[int, torch.Tensor] = {}  # id(view) -> its copy
    for group in views.values():
        first = next(iter(group.values()))
        own = sum(t.numel() * t.element_size() for t in group.values())
        if own < _COVERED * first.untyped_storage().nbytes():
            copied.update({id(t): t.clone(memory_format=torch.contiguous_format) for t in group.values()})

    def rebuild(node):
        if isinstance(node, torch.Tensor):
            return copied.get(id(node), node)
        if isinstance(node, dict):
            return type(node)((k, rebuild(v)) for k, v in node.items())
        if isinstance(node, (list, tuple)):
            return type(node)(rebuild(v) for v in node)
        return node

    return rebuild(tree) if copied else tree


def save_tensors(tree, path: str | os.PathLike, writer=None) -> None:
    """torch.save of `tree` writing only its tensors' own bytes (compact): every weights file goes through here.
    With `writer` (an async_writer.AsyncWriter) the file is copied now and written by the writer's thread."""
    if writer is not None:
        writer.add(tree, path)
    else:
        torch.save(compact(tree), path)


def save_layer_files(folder: Path, rank: int, layers: dict[int, dict[str, torch.Tensor]], writer=None) -> None:
    for idx, tensors in layers.items():
        save_tensors(tensors, folder / LAYER_FILE.format(idx, rank), writer)


def save_model_checkpoint(ckpt_dir: str | os.PathLike, step: int, shards: list[dict[str, torch.Tensor]],
                          config: NeoXConfig, tokenizer_file=None, lora: tuple[Path, dict] | None = None) -> Path:
    """Write model states only (no optimizer), e.g. for a converted Hugging Face model. `lora` (base step folder,
    adapter sharding): the shards are LoRA adapters on that base, written as a LoRA run saves them."""
    ckpt_dir = Path(ckpt_dir)
    tmp = start_partial(ckpt_dir, step)
    needed = sum(t.numel() * t.element_size() for shard in shards for t in shard.values()), "the converted model"
    with full_disk_is_one_line(ckpt_dir, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True), needed=needed):
        for rank, shard in enumerate(shards):
            module, layers = (shard, {}) if lora else neox_weights(shard, config, len(shards))
            save_tensors({"module": module, "iteration": step, "mp_world_size": len(shards), "dp_world_size": 1},
                         tmp / MODEL_FILE.format(rank))
            save_layer_files(tmp, rank, layers)
        save_config(tmp, config)
        if lora:
            save_lora_info(tmp, *lora)
        copy_tokenizer(tmp, tokenizer_file)
        return publish(tmp, ckpt_dir, step)


# ---------------------------------------------------------------------- resharding
def vocab_keys_for(vocab: int, tp: int, where: str) -> dict:
    """Config keys that keep an already padded vocabulary of `vocab` rows unchanged at TP size `tp`."""
    if vocab % tp:
        raise UserError(f"{where}: a vocabulary of {vocab} rows cannot be split over {tp} tensor-parallel ranks; "
                        f"use a tensor-parallel size that divides {vocab}")
    return {"vocab_size": vocab, "make_vocab_size_divisible_by": math.gcd(vocab // tp, 128),
            "model_parallel_size": tp}


def reshard(path: str | os.PathLike, output_dir: str | os.PathLike, tp: int, step: int | None = None,
            trust: bool = False) -> Path:
    """Write the weights of a checkpoint (any TP size) split for `tp` ranks, with a matching config.

    Weights only, for fine-tuning (`finetune: true`), generation and evaluation at the new size (a LoRA checkpoint:
    its adapters, naming the same base, read at any TP size); a full training state moves to another layout
    through DeepSpeed's Universal Checkpointing (checkpoint/universal.py).
    """
    state, config, folder = load_merged(path, step, trust)
    info = lora_info(folder)
    keys = config.to_dict()
    keys.update(vocab_keys_for(state["word_embeddings.weight"].shape[0], tp, str(folder)))
    keys.update(num_gpus=None, num_nodes=-1, load=None)  # launch settings belong to the next run
    if info is not None:  # a LoRA checkpoint: its adapters split for `tp` (in the mp_rank files), on the same base
        keys.update(pipe_parallel_size=min(config.pipe_parallel_size, 1))
        new_config = from_dict(keys, source=str(folder / CONFIG_FILE))
        adapters = {k: v for k, v in state.items() if k in info["sharding"]}
        return save_model_checkpoint(output_dir, folder_step(folder) or 0, split_tp(adapters, tp, info["sharding"]),
                                     new_config, tokenizer_of(folder, config), lora=(lora_base_of(folder),
                                                                                     info["sharding"]))
    new_config = from_dict(keys, source=str(folder / CONFIG_FILE))
    return save_model_checkpoint(output_dir, folder_step(folder) or 0, split_tp(state, tp), new_config,
                                 tokenizer_of(folder, config))


def save_reference(step_folder: Path, reference: torch.nn.Module, c: NeoXConfig, tp_size: int, tp_rank: int,
                   writer=None) -> None:
    """This TP rank's reference weights into STEP/reference/, written as the policy's are (GPT-NeoX's layout,
    with the config), so load_rank_shard reads them back at any tensor-parallel size."""
    folder = Path(step_folder) / REFERENCE_DIR
    folder.mkdir(exist_ok=True)
    module, layers = neox_weights(model_state(reference), c, tp_size)
    save_tensors({"module": module}, folder / MODEL_FILE.format(tp_rank), writer)
    if layers:
        save_layer_files(folder, tp_rank, {**layers, 1: {}}, writer)
    if tp_rank == 0:
        save_config(folder, c)
