"""The project's one write-to-temp-then-rename: readers see a file's old content or its new one, never a part,
even after a crash or a power loss. Used for checkpoints (neox_fork.checkpoint.store, which re-exports these), data,
tokenizers and exports; a full filesystem is one line (errors.full_disk_is_one_line) and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from neox_fork.errors import full_disk_is_one_line


def fsync(path: Path) -> None:
    """Flush one file or folder to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file of a folder and the folder itself to disk (before anything points at it)."""
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            fsync(f)
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        fsync(d)
    fsync(folder)


def temp_path_for(path: str | os.PathLike) -> Path:
    """Where to write `path`'s new content before commit_temp moves it into place."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def commit_temp(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Flush a completely written temporary file to disk, rename it over `path`, flush the rename."""
    fsync(Path(tmp))
    os.replace(tmp, path)
    fsync(Path(path).parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """A temporary path to write `path` to; committed when the block succeeds, removed when it fails."""
    tmp = temp_path_for(path)
    with full_disk_is_one_line(path, cleanup=lambda: tmp.unlink(missing_ok=True)):
        yield tmp
        commit_temp(tmp, path)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
