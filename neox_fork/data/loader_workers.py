"""Data-loader worker processes: their signal policy, and their end when the work that started them ends.

Two rules, and why each is needed (issue 35: a pipeline-parallel run trained, saved, and then every rank
stayed alive forever):

1. **Stop signals are the rank's; its own SIGTERM ends a worker.** Slurm's scancel (and a shell's
   `kill -- -PGID`) signals every process of the job, and the rank must outlive its workers long enough to
   save at its next step boundary, so a worker drops SIGINT, SIGUSR1 and any SIGTERM that another process
   sent. A SIGTERM sent by the worker's parent, the rank, ends it at once (status 0): only the rank itself
   sends one, when it means the worker to end (multiprocessing's exit, which SIGTERMs every daemonic child
   and then joins it, or torch's fallback `terminate()` when a worker does not stop on request). A worker
   that ignored every SIGTERM made that join wait forever. The sender is read with sigwaitinfo() on a
   thread of the worker (SIGTERM blocked in every thread, so none other takes it); status 0 rather than
   death by signal, so torch's SIGCHLD check in the rank does not report a worker "killed by signal".
   Workers are forked with SIGTERM blocked (`start_workers`), so one that comes before the worker has set
   this up waits for that thread; unblocked, it would run the rank's handler copied by fork and be lost.
   The kernel still kills a worker when its rank dies, however it dies (PR_SET_PDEATHSIG), and a failing
   rank kills its workers itself (errors.end_now).

2. **Whoever started an iterator's workers ends them when its work ends** (`ends_loader_workers`: training,
   each evaluation). Left to garbage collection they outlive the work whenever something else still holds
   the iterator: DeepSpeed's pipeline engine keeps the last one it was given (`engine.data_iterator`), and
   the engine is not freed when training returns, not even by a full garbage collection (DeepSpeed's ZeRO
   gradient hooks on the parameters hold it from inside autograd, where the collector cannot follow).
   torch's own `__del__` shutdown does nothing once the interpreter is exiting
   (`torch.utils.data._utils.python_exit_status`), so at exit only rule 1 could end them.
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import threading
import weakref

_STOP_SIGNALS = (signal.SIGINT, signal.SIGUSR1)

# iterators with worker processes built in this process (datasets.build_batch_iterator), by creation number
_live: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_numbers = itertools.count()


def _end_on_the_ranks_sigterm(rank: int) -> None:
    """On a worker's thread: wait for SIGTERM (blocked in every thread); the rank's ends the worker."""
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == rank:
            os._exit(0)


def leave_signals_to_the_rank(worker_id: int) -> None:
    """A DataLoader worker_init_fn: the worker's signal policy (the module's docstring, rule 1)."""
    from neox_fork.launch.supervisor import die_with_parent

    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    # blocked since the fork when start_workers forked it; in the only thread so far: the threads started
    # later (the result queue's feeder) inherit it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_the_ranks_sigterm, args=(os.getppid(),), name="end-on-the-ranks-sigterm",
                     daemon=True).start()
    die_with_parent(signal.SIGKILL)


def start_workers(loader):
    """iter(loader), its worker processes forked with SIGTERM blocked (the module's docstring, rule 1) and
    registered for `end_loader_workers`."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        iterator = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if hasattr(iterator, "_shutdown_workers"):  # one with worker processes
        _live[next(_numbers)] = iterator
    return iterator


def end_loader_workers(since: int = 0) -> None:
    """End the worker processes of the tracked iterators still alive (those created from number `since` on):
    torch's own shutdown (each worker told to stop, joined, terminated if it does not stop). Holders of
    these iterators get no more batches from them."""
    for number, iterator in sorted(_live.items()):
        if number >= since:
            iterator._shutdown_workers()
            _live.pop(number, None)


def ends_loader_workers(work):
    """Decorate `work` so that the workers of every iterator it started end when it returns or raises,
    whoever still holds those iterators (the module's docstring, rule 2)."""

    @functools.wraps(work)
    def wrapper(*args, **kwargs):
        first = next(_numbers)  # numbers of the iterators `work` creates are above this one
        try:
            return work(*args, **kwargs)
        finally:
            end_loader_workers(first)

    return wrapper
