"""The on-disk names of checkpoints, in the one place they live: step folders, pointer files, RNG files.

Everything else calls these (neox_fork.checkpoint.store re-exports them). This module reads no file but the pointer
files and imports nothing of the package, so configuration can ask which step a run resumes from.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


LATEST_FILE = "latest"
PARTIAL_SUFFIX = ".partial"  # a step folder being written
OLD_SUFFIX = ".old"  # the previous copy of a step folder while it is being replaced
RNG_FILE = "rng_state_{:05d}.pt"
LATEST_UNIVERSAL_FILE = "latest_universal"  # DeepSpeed's ds_to_universal writes and reads this name
UNIVERSAL_SUFFIX = "_universal"  # global_stepN_universal: step N converted by tools/ckpts/to_universal.py
REFERENCE_DIR = "reference"  # in a DPO/KTO step folder: the frozen reference model, written as the policy is


def step_name(step: int) -> str:
    """The tag and folder name of a step, as DeepSpeed and GPT-NeoX spell it."""
    return f"global_step{step}"


def step_dir(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / step_name(step)


def rng_files(folder: Path) -> list[Path]:
    """The per-rank RNG state files of a step folder (one per global rank that saved)."""
    return sorted(folder.glob(RNG_FILE.replace("{:05d}", "*")))


def universal_dir(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / (step_name(step) + UNIVERSAL_SUFFIX)


def partial_dir(ckpt_dir: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_dir) / (step_name(step) + PARTIAL_SUFFIX)


def step_of(tag: str) -> int | None:
    """The N of a 'global_stepN' tag or folder name; None for anything else (e.g. a .partial folder)."""
    m = re.fullmatch(r"global_step(\d+)", tag)
    return int(m[1]) if m else None


def folder_step(folder: str | os.PathLike) -> int | None:
    """The step a step folder holds (also its `.old` copy, see checkpoint.publish); None for other folders."""
    return step_of(Path(folder).name.removesuffix(OLD_SUFFIX))


def saved_steps(ckpt_dir: str | os.PathLike) -> list[int]:
    """The steps of the complete step folders in a checkpoint folder, oldest first."""
    return sorted(n for p in Path(ckpt_dir).glob("global_step*") if (n := step_of(p.name)) is not None)


def pointed_step(pointer: Path, suffix: str = "") -> int | None:
    """The N of the 'global_stepN<suffix>' a pointer file (`latest`, `latest_universal`) names; None without
    the file; ValueError(the tag it holds) when it names something else (checkpoint.read_latest makes that
    one line naming the step folders that load)."""
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    step = step_of(tag.removesuffix(suffix)) if tag.endswith(suffix) else None
    if step is None:
        raise ValueError(tag)
    return step
