"""Each rank's deadline for the phase it is in: a rank that stops making progress leaves its stacks and ends.

faulthandler's watchdog is a C thread: it fires while the GIL is held (a stuck C call, a regex that never ends)
and while the main thread waits in a collective, which a Python timer thread could not promise. The deadline is
re-armed at each phase boundary (launch/hangs.py says where the stacks go and how deepy reads them):

    start-up and the first step   init_timeout_seconds
    each later step                train_timeout_seconds
    a checkpoint save              save_timeout_seconds
    an evaluation                  eval_timeout_seconds
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal

from neox_fork.launch import hangs

log = logging.getLogger("neox_fork")


class Watchdog:
    """Arms faulthandler.dump_traceback_later for each phase; SIGUSR2 adds this rank's stacks to its file."""

    def __init__(self, c, rank: int):
        self.rank = rank
        self.limits = {"init": (c.init_timeout_seconds, "init_timeout_seconds"),
                       "train": (c.train_timeout_seconds, "train_timeout_seconds"),
                       "save": (c.save_timeout_seconds, "save_timeout_seconds"),
                       "eval": (c.eval_timeout_seconds, "eval_timeout_seconds")}
        folder = hangs.stacks_dir(c.save)
        self.file = None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            path = hangs.stacks_file(folder, rank)
            if path.is_file() and path.stat().st_size > hangs.HEADER_BYTES:  # a dump of an earlier run: keep it
                path.rename(path.with_name(f"{path.stem}-{int(path.stat().st_mtime)}.txt"))
            self.file = open(path, "wb")  # noqa: SIM115 - kept open for faulthandler's thread
            self.file.write(hangs.header(rank, "starting", 0, ""))
            self.file.flush()
            faulthandler.register(signal.SIGUSR2, file=self.file, all_threads=True, chain=False)

    def arm(self, kind: str, phase: str) -> None:
        """From now on, `phase` (of the kind init, train, save or eval) must end within its limit."""
        seconds, key = self.limits[kind]
        faulthandler.cancel_dump_traceback_later()
        if self.file is not None:
            os.pwrite(self.file.fileno(), hangs.header(self.rank, phase, seconds, key), 0)
        if seconds > 0:
            faulthandler.dump_traceback_later(seconds, exit=True, **({"file": self.file} if self.file else {}))

    def close(self) -> None:
        """Work is over: no deadline, and the file says so."""
        faulthandler.cancel_dump_traceback_later()
        if self.file is not None:
            faulthandler.unregister(signal.SIGUSR2)
            os.pwrite(self.file.fileno(), hangs.header(self.rank, hangs.FINISHED, 0, ""), 0)
            self.file.close()
            self.file = None


# Test-only: NEOX_FORK_TEST_HANG="RANK:STEP:HOW[,...]" makes global rank RANK stop answering after step STEP (HOW:
# sleep, a Python sleep; gil, a regular expression that holds the GIL for hours; stop, SIGSTOP to itself) or, with
# "RANK:STEP:slowsave:SECONDS", take SECONDS longer over that step's save (tests/test_train_hangs_*.py); not in a
# requeued Slurm job.
TEST_HANG_ENV = "NEOX_FORK_TEST_HANG"


def hang_if_asked(rank: int, step: int, where: str) -> None:
    if os.environ.get("SLURM_RESTART_COUNT", "0") != "0":  # a requeued Slurm job runs clean (the requeue test)
        return
    for spec in filter(None, os.environ.get(TEST_HANG_ENV, "").split(",")):
        fields = spec.split(":")
        if int(fields[0]) == rank and int(fields[1]) == step:
            _hang(fields[2], fields[3:], where)


def _hang(how: str, args: list[str], where: str) -> None:
    import re
    import time

    if where == "save" and how == "slowsave":
        time.sleep(float(args[0]))
    elif where == "step" and how == "sleep":
        time.sleep(10**6)
    elif where == "step" and how == "gil":
        re.match(r"(a+)+$", "a" * 64 + "b")  # catastrophic backtracking: hours inside re, the GIL held
    elif where == "step" and how == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
