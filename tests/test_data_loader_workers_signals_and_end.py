"""Data-loader workers (data/loader_workers.py): SIGTERM, SIGINT and SIGUSR1 from anyone but their rank leave
them serving batches; a SIGTERM from the rank itself (what multiprocessing's exit and torch's fallback send)
ends one at once, with status 0; `ends_loader_workers` ends the workers of the iterators its call built even
while something else still holds them (as DeepSpeed's pipeline engine does), and no others."""

import os
import signal
import subprocess
import time

import torch

from neox_fork.data.datasets import build_batch_iterator
from neox_fork.data.loader_workers import ends_loader_workers

SETTLE = 0.5  # seconds a signal gets to act (a dropped one does nothing; the rank's ends the worker in ms)


class Samples(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return {"tokens": torch.full((4,), i), "labels": torch.full((4,), i), "loss_mask": torch.ones(4)}


def batches():
    return build_batch_iterator(Samples(), consumed_samples=0, micro_batch_size=2, data_parallel_rank=0,
                                data_parallel_size=1, num_workers=1)


def _exit_code(worker, timeout=10.0):
    worker.join(timeout)
    return worker.exitcode


def test_stop_signals_from_others_are_dropped_and_the_ranks_sigterm_ends_the_worker():
    it = batches()
    assert next(it)["tokens"][0, 0] == 0
    worker = it._workers[0]
    for sig in ("TERM", "INT", "USR1"):  # sent by another process, as scancel's reach every process of a job
        subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
    time.sleep(SETTLE)
    assert worker.is_alive()
    assert next(it)["tokens"][0, 0] == 2  # still serving
    os.kill(worker.pid, signal.SIGTERM)  # from its rank: this process
    assert _exit_code(worker) == 0
    it._shutdown_workers()


def test_a_call_ends_the_workers_it_started_however_their_iterator_is_held():
    held = []  # outlives the call, as DeepSpeed's pipeline engine keeps its last data iterator

    @ends_loader_workers
    def work():
        it = batches()
        held.append(it)
        return next(it)

    before = batches()
    next(before)
    work()
    assert _exit_code(held[0]._workers[0]) == 0  # told to stop and joined
    assert before._workers[0].is_alive()  # built before the call: not its to end
    assert next(before)["tokens"][0, 0] == 2
    before._shutdown_workers()
