"""Checkpoint files written in a background thread from copies taken at save time (`async_save: true`).

At the save, every object a file will hold is copied to host memory (tensors cloned, each to its own bytes; other
values deep-copied), so the next steps may change the live weights and optimizer states; the thread then writes
the files with torch.save and flushes each to disk. Publishing the step folder (and moving `latest`) stays with
the caller, after every rank's writer is done (training/state.py), so `latest` only ever names a complete step.

Why not DeepSpeed's decoupled checkpoint engine or torch.distributed.checkpoint.async_save: the first (DeepSpeed
0.19) sends the state to a subprocess by pickling it, which refuses ZeRO-1's optimizer state ("Cowardly refusing
to serialize non-leaf tensor which requires_grad"), and needs DeepSpeed's aio op; the second writes its own
`.distcp` format, not GPT-NeoX's layer files and DeepSpeed's ZeRO shards that every reader here, upstream's tools
and ds_to_universal read. This writer keeps the files byte-for-byte what a synchronous save writes.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import torch

from neox_fork.checkpoint.atomic import fsync


def snapshot(tree, memo: dict | None = None):
    """`tree` with every tensor copied to host memory (only its own elements) and every other value deep-copied;
    a tensor met twice stays one tensor (tied weights), as torch.save would store it."""
    memo = {} if memo is None else memo
    if isinstance(tree, torch.Tensor):
        if id(tree) not in memo:
            memo[id(tree)] = tree.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
        return memo[id(tree)]
    if isinstance(tree, dict):
        return type(tree)((k, snapshot(v, memo)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(snapshot(v, memo) for v in tree)
    return copy.deepcopy(tree)


class AsyncWriter:
    """Files to write: add() copies now, start() writes them all in one background thread, wait() joins it (and
    raises what the writing raised)."""

    def __init__(self):
        self.files: list[tuple[object, Path]] = []
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def add(self, tree, path) -> None:
        self.files.append((snapshot(tree), Path(path)))

    def start(self, delay: float = 0.0) -> None:
        """Write in the background; `delay` seconds first (tests: a save that takes a while)."""
        self.thread = threading.Thread(target=self._write, args=(delay,), name="neox_fork-async-save", daemon=True)
        self.thread.start()

    def _write(self, delay: float) -> None:
        try:
            time.sleep(delay)
            for tree, path in self.files:
                torch.save(tree, path)
                fsync(path)
            self.files = []  # the copies' memory goes back as soon as they are on disk
        except BaseException as err:  # noqa: BLE001 - raised in the training thread by wait()
            self.error = err

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error
