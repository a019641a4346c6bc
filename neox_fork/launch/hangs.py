"""Hangs found with evidence: where every rank's Python stacks go, and how deepy and slurm/common.sh read them.

Each rank keeps a deadline for the phase it is in (training/watchdog.py: start-up and first step, a step, a save,
an evaluation). When one passes, faulthandler's own thread, which needs no GIL, writes every thread's Python stack
to STACKS_DIR/rankNNNNN.txt below a header naming the phase and its limit, and ends the rank. SIGUSR2 makes a rank
add its stacks to the same file at any time; deepy sends it (with SIGCONT, for a stopped process) to the ranks
still alive before it ends them. A rank that stopped answering (stuck outside any collective, stopped, in an
endless read) is told apart from its peers, which time out waiting for it inside a collective.

deepy then exits HANG_STATUS, which slurm/common.sh requeues a bounded number of times: a hang is usually the node
(a GPU, a NIC, a filesystem), not the code. Under srun (Slurm's multi-node launch) srun ends the job when the first
rank exits, and `python -m neox_fork.launch hung CONFIGS...` reads the same files for common.sh.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

HANG_STATUS = 75  # EX_TEMPFAIL ("try again later"): a hang; slurm/common.sh requeues it
STACKS_ENV = "NEOX_FORK_STACKS_DIR"  # set by deepy for its ranks; else SAVE/stacks
HEADER_BYTES = 256  # each rank's file starts with its current phase, rewritten in place (watchdog.Watchdog.arm)
_TIMEOUT_MARK = "Timeout ("  # the first line faulthandler.dump_traceback_later writes
_COLLECTIVE_FRAMES = ("torch/distributed/", "deepspeed/comm/", "megatron/core/tensor_parallel/mappings")


def stacks_dir(save: str | None, environ=None) -> Path | None:
    """Where the ranks of a run write their stacks: deepy's choice, else SAVE/stacks; None without either."""
    environ = os.environ if environ is None else environ
    if environ.get(STACKS_ENV):
        return Path(environ[STACKS_ENV])
    return Path(save) / "stacks" if save else None


def stacks_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"rank{rank:05d}.txt"


FINISHED = "finished"  # the phase of a rank whose work is over (watchdog.Watchdog.close)


def header(rank: int, phase: str, seconds: float, key: str) -> bytes:
    """The fixed-width first line of a rank's stacks file while it is in `phase`."""
    text = f"rank {rank}: {phase}" if not seconds else (
        f"rank {rank}: {phase}, limit {seconds:g} s ({key}), since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return text.encode()[:HEADER_BYTES - 1].ljust(HEADER_BYTES - 1) + b"\n"


@dataclass
class RankStacks:
    rank: int
    phase: str  # the header: what the rank was doing, its limit and since when
    timed_out: bool  # its own deadline passed (faulthandler's "Timeout (...)!" dump)
    in_collective: bool  # a dumped frame is a collective: it was waiting for the others
    modified: float  # the file's mtime


def read_stacks(folder: Path, rank: int) -> RankStacks | None:
    """What rank `rank` left in its stacks file; None when it has none."""
    path = stacks_file(folder, rank)
    try:
        text = path.read_text(errors="replace")
        modified = path.stat().st_mtime
    except OSError:
        return None
    head, _, dump = text.partition("\n")
    return RankStacks(rank, head.strip(), _TIMEOUT_MARK in dump, any(f in dump for f in _COLLECTIVE_FRAMES), modified)


def culprits(reports: list[RankStacks], alive: list[int]) -> list[int]:
    """The ranks that stopped answering: those still alive after their peers timed out (stopped, or stuck where
    their own deadline could not fire), else those that timed out outside a collective, else those a launcher
    ended before their deadline (srun kills the others when one exits), else (every rank timed out waiting in a
    collective) the first to time out."""
    if alive:
        return sorted(alive)
    outside = [r.rank for r in reports if r.timed_out and not r.in_collective]
    if outside:
        return sorted(outside)
    ended = [r.rank for r in reports if not r.timed_out and not r.phase.endswith(FINISHED)]
    if ended:
        return sorted(ended)
    timed_out = sorted((r for r in reports if r.timed_out), key=lambda r: (r.modified, r.rank))
    return [timed_out[0].rank] if timed_out else []


def hang_line(folder: Path, reports: list[RankStacks], stuck: list[int]) -> str:
    """deepy's (and common.sh's) one line about a hang."""
    by_rank = {r.rank: r for r in reports}
    first = by_rank.get(stuck[0]) if stuck else None
    where = first.phase.split(": ", 1)[-1] if first and first.phase else None
    if where is None:
        waited = next((r for r in reports if r.timed_out), None)
        where = f"its peers timed out in {waited.phase.split(': ', 1)[-1]}" if waited else "no report"
    names = ", ".join(map(str, stuck)) or "unknown"
    return (f"hang: rank {names} stopped answering ({where}); every rank's Python stacks are in {folder}; "
            f"exiting with status {HANG_STATUS} (slurm/common.sh requeues)")


def find_hang(folder: Path | None, since: float) -> str | None:
    """The hang line for a run whose ranks have all ended, when one of them timed out after `since` (a time.time()):
    for slurm/common.sh after srun, where no supervisor watched the ranks."""
    if folder is None or not Path(folder).is_dir():
        return None
    ranks = sorted(int(p.stem[4:]) for p in Path(folder).glob("rank*.txt") if p.stem[4:].isdigit())
    reports = [r for rank in ranks if (r := read_stacks(folder, rank)) is not None and r.modified >= since]
    if not any(r.timed_out for r in reports):
        return None
    return hang_line(folder, reports, culprits(reports, []))
