"""Checkpoints in DeepSpeed's layout, as GPT-NeoX writes them, plus tensor-parallel merge and split.

    CKPT_DIR/latest                                    -> "global_step{N}"
    CKPT_DIR/global_step{N}/mp_rank_{XX}_model_states.pt   {"module": state of TP rank XX, ...}
    CKPT_DIR/global_step{N}/*optim_states.pt           ZeRO optimizer shards (written by training)
    CKPT_DIR/global_step{N}/config.yml                 the merged config the run used
    CKPT_DIR/global_step{N}/tokenizer.json             a copy of the tokenizer, when the config names one

A step folder is written under a temporary name and renamed when complete, and `latest` is replaced
atomically afterwards, so a crash mid-save never leaves a half checkpoint that `latest` points to.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import torch
import yaml

from neox_fork.config import NeoXConfig, from_dict
from neox_fork.errors import UserError

MODEL_FILE = "mp_rank_{:02d}_model_states.pt"
CONFIG_FILE = "config.yml"
TOKENIZER_FILE = "tokenizer.json"

# How each parameter is split over tensor-parallel ranks: (dim, stride) or None when replicated.
# stride 2 for linear1: each rank holds [up_r; gate_r], so the merged weight is [up; gate].
_SHARDING = [
    (r"word_embeddings\.weight", (0, 1)),
    (r"output_layer\.weight", (0, 1)),
    (r"layers\.\d+\.attention\.query_key_value\.weight", (0, 1)),
    (r"layers\.\d+\.mlp\.linear1\.weight", (0, 2)),
    (r"layers\.\d+\.attention\.dense\.weight", (1, 1)),
    (r"layers\.\d+\.mlp\.linear2\.weight", (1, 1)),
]


def sharding(name: str) -> tuple[int, int] | None:
    for pattern, spec in _SHARDING:
        if re.fullmatch(pattern, name):
            return spec
    return None


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's tensors without megatron-core's empty `_extra_state` entries."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def merge_tp_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-rank states -> the state a TP=1 model would have."""
    merged = {}
    for name, first in shards[0].items():
        spec = sharding(name)
        if spec is None or len(shards) == 1:
            merged[name] = first
            continue
        dim, stride = spec
        pieces = [s[name].chunk(stride, dim=dim) for s in shards]
        merged[name] = torch.cat([p[j] for j in range(stride) for p in pieces], dim=dim)
    return merged


def split_tp(full: dict[str, torch.Tensor], tp: int) -> list[dict[str, torch.Tensor]]:
    """A TP=1 state -> the states of `tp` ranks (the inverse of merge_tp_shards)."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for name, tensor in full.items():
        spec = sharding(name)
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


# ---------------------------------------------------------------------- locating checkpoints
def step_dir(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / f"global_step{step}"


def step_of(tag: str) -> int | None:
    """The N of a 'global_stepN' tag or folder name; None for anything else (e.g. a .partial folder)."""
    m = re.fullmatch(r"global_step(\d+)", tag)
    return int(m[1]) if m else None


def saved_steps(ckpt_dir: str | os.PathLike) -> list[int]:
    """The steps of the complete step folders in a checkpoint folder, oldest first."""
    return sorted(n for p in Path(ckpt_dir).glob("global_step*") if (n := step_of(p.name)) is not None)


def read_latest(ckpt_dir: str | os.PathLike) -> int | None:
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    step = step_of(tag)
    if step is None:
        raise UserError(f"{latest}: expected 'global_stepN', found {tag!r}")
    return step


def resolve(path: str | os.PathLike, step: int | None = None) -> Path:
    """A checkpoint folder (with `latest`) or one of its global_step folders -> the step folder to read."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint '{path}' not found")
    if (path / MODEL_FILE.format(0)).is_file():
        return path
    if step is None:
        step = read_latest(path)
        if step is None:
            raise UserError(f"'{path}' holds no checkpoint: no 'latest' file and no {MODEL_FILE.format(0)}")
    found = step_dir(path, step)
    if not (found / MODEL_FILE.format(0)).is_file():
        raise UserError(f"checkpoint step folder '{found}' is missing or has no {MODEL_FILE.format(0)}")
    return found


def load_config_of(folder: Path) -> NeoXConfig:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"checkpoint '{folder}' has no {CONFIG_FILE}; it was not written by neox_fork")
    return from_dict(yaml.safe_load(path.read_text()), source=str(path))


def tokenizer_of(folder: Path, config: NeoXConfig) -> Path | None:
    """The tokenizer saved with the checkpoint, else the config's vocab_file if it exists."""
    if (folder / TOKENIZER_FILE).is_file():
        return folder / TOKENIZER_FILE
    if config.vocab_file and Path(config.vocab_file).is_file():
        return Path(config.vocab_file)
    return None


def tp_size_of(folder: Path) -> int:
    return len(list(folder.glob("mp_rank_*_model_states.pt")))


def read_file(path: str | os.PathLike):
    """The one place a checkpoint file (ours, DeepSpeed's, GPT-NeoX's) is unpickled."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file
        raise UserError(f"cannot read checkpoint file '{path}': {err}") from None


def _load_shard(folder: Path, rank: int) -> dict[str, torch.Tensor]:
    states = read_file(folder / MODEL_FILE.format(rank))
    return {k: v for k, v in states["module"].items() if not k.endswith("_extra_state")}


def load_model_shards(folder: Path) -> list[dict[str, torch.Tensor]]:
    return [_load_shard(folder, rank) for rank in range(tp_size_of(folder))]


def load_rank_shard(folder: Path, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """TP rank `rank`'s weights for a run at TP size `tp`: its own file when the checkpoint was saved at
    that size, else the merged weights split again."""
    if tp_size_of(folder) == tp:
        return _load_shard(folder, rank)
    return split_tp(merge_tp_shards(load_model_shards(folder)), tp)[rank]


def load_merged(path: str | os.PathLike, step: int | None = None):
    """(merged TP=1 state, config, step folder) of a checkpoint saved at any TP size."""
    folder = resolve(path, step)
    return merge_tp_shards(load_model_shards(folder)), load_config_of(folder), folder


# ---------------------------------------------------------------------- writing
def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_config(folder: Path, config: NeoXConfig) -> None:
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=True))


def copy_tokenizer(folder: Path, tokenizer_file: str | os.PathLike | None) -> None:
    if tokenizer_file and Path(tokenizer_file).is_file():
        shutil.copyfile(tokenizer_file, folder / TOKENIZER_FILE)


def publish(tmp_folder: Path, final_folder: Path, ckpt_dir: Path, step: int) -> None:
    """Move a completely written step folder into place, then point `latest` at it."""
    if final_folder.exists():
        old = final_folder.with_name(final_folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_folder, old)
        os.replace(tmp_folder, final_folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_folder, final_folder)
    write_atomic_text(ckpt_dir / "latest", f"global_step{step}")


def save_model_checkpoint(ckpt_dir: str | os.PathLike, step: int, shards: list[dict[str, torch.Tensor]],
                          config: NeoXConfig, tokenizer_file: str | os.PathLike | None = None) -> Path:
    """Write model states only (no optimizer), e.g. for a converted Hugging Face model."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = step_dir(ckpt_dir, step)
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for rank, shard in enumerate(shards):
            torch.save({"module": shard, "iteration": step, "mp_world_size": len(shards), "dp_world_size": 1},
                       tmp / MODEL_FILE.format(rank))
        save_config(tmp, config)
        copy_tokenizer(tmp, tokenizer_file)
        publish(tmp, final, ckpt_dir, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ---------------------------------------------------------------------- resharding
def vocab_keys_for(vocab: int, tp: int, where: str) -> dict:
    """Config keys that keep an already padded vocabulary of `vocab` rows unchanged at TP size `tp`."""
    if vocab % tp:
        raise UserError(f"{where}: a vocabulary of {vocab} rows cannot be split over {tp} tensor-parallel ranks; "
                        f"use a tensor-parallel size that divides {vocab}")
    return {"vocab_size": vocab, "make_vocab_size_divisible_by": math.gcd(vocab // tp, 128),
            "model_parallel_size": tp}


def reshard(path: str | os.PathLike, output_dir: str | os.PathLike, tp: int, step: int | None = None) -> Path:
    """Write the weights of a checkpoint (any TP size) split for `tp` ranks, with a matching config.

    Weights only, for fine-tuning (`finetune: true`), generation and evaluation at the new size; a full
    training state moves to another TP size on load instead (`save_universal: true`, see training.py).
    """
    state, config, folder = load_merged(path, step)
    keys = config.to_dict()
    keys.update(vocab_keys_for(state["word_embeddings.weight"].shape[0], tp, str(folder)))
    keys.update(num_gpus=None, num_nodes=-1, load=None)  # launch settings belong to the next run
    new_config = from_dict(keys, source=str(folder / CONFIG_FILE))
    return save_model_checkpoint(output_dir, step_of(folder.name) or 0, split_tp(state, tp), new_config,
                                 tokenizer_of(folder, config))
