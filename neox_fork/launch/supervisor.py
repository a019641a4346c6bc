"""deepy's supervision of the ranks of a one-node run (plan mode "local").

DeepSpeed's runner dies on SIGUSR1 and leaves its ranks training on as orphans, and its launch.py
SIGKILLs the ranks 30 s after SIGTERM, too soon for a large checkpoint. Here deepy itself is the parent
of every rank:

* SIGUSR1, SIGTERM and SIGINT to deepy go to every rank; each saves at its next step boundary and exits 0
  (training.StopSignal); deepy exits 0 once all have, so "saved and stopped on a signal" is status 0
  (slurm/common.sh then requeues if `latest` moved and train_iters is not reached).
* Ranks still running `signal_grace_seconds` after the first signal are SIGKILLed. A second SIGINT
  (Ctrl-C twice) kills them at once.
* A rank that fails stops the others (SIGTERM, SIGKILL after FAILURE_GRACE_SECONDS: no save can complete
  without the failed rank, and a rank blocked in a collective with it cannot act on SIGTERM) and deepy exits
  with that rank's status: its exit code, or 128 + N for a rank ended by signal N. deepy's line names the
  rank and its cause, which each rank leaves in a file deepy names (errors.ERROR_FILE_ENV); when several
  have failed by the time deepy looks, the one that failed first is named (a peer's failure makes the
  others fail too).
* A rank whose phase deadline passed (a hang: launch/hangs.py) leaves its stacks and ends; deepy waits up to
  HANG_SETTLE_SECONDS for its peers' own deadlines, asks the ranks still alive for their stacks (SIGUSR2, and
  SIGCONT for a stopped one), ends them, names the rank(s) that stopped answering and exits hangs.HANG_STATUS.
* Ranks run in their own process group (a terminal's Ctrl-C reaches deepy, which passes one SIGINT on) and
  get SIGTERM if deepy itself dies (PR_SET_PDEATHSIG), so none trains on as an orphan.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from neox_fork.errors import ERROR_FILE_ENV
from neox_fork.launch import hangs

FORWARDED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
FAILURE_GRACE_SECONDS = 10.0
HANG_SETTLE_SECONDS = 15.0  # after one rank's deadline passed, how long its peers get for theirs (same limits)
STACKS_WAIT_SECONDS = 3.0  # how long a rank asked with SIGUSR2 gets to write its stacks
POLL_SECONDS = 0.2
_PR_SET_PDEATHSIG = 1


def _say(message: str) -> None:
    print(f"deepy: {message}", file=sys.stderr, flush=True)


def die_with_parent(signum: int) -> None:
    """Have the kernel send this process `signum` when its parent dies (Linux's PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _rank_preexec() -> None:
    """In each rank before exec: its own process group, so a terminal's Ctrl-C reaches deepy alone (which
    passes one SIGINT on), and SIGTERM when deepy dies."""
    os.setpgid(0, 0)
    die_with_parent(signal.SIGTERM)


def exit_status(returncode: int) -> int:
    """A Popen return code as a shell reports it: 128 + N for a process ended by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    """The ranks of one plan, started together, signalled together, and waited for."""

    def __init__(self, plan):
        self.plan = plan
        self.grace = float(plan.grace_seconds or 600.0)
        self.procs: dict[int, subprocess.Popen] = {}
        self.received: list[int] = []
        self.kill_at: float | None = None
        self.error_dir = Path(tempfile.mkdtemp(prefix="deepy-errors-"))
        # every rank's watchdog writes its stacks here (SAVE/stacks; without `save`, a folder deepy keeps)
        self.stacks_dir = Path(plan.stacks_dir or tempfile.mkdtemp(prefix="neox_fork-stacks-"))

    def error_file(self, rank: int) -> Path:
        return self.error_dir / f"rank{rank}.json"

    def cause(self, rank: int) -> tuple[float, str]:
        """(when, what) a failed rank reported (errors.report_failure); (inf, "") when it could not."""
        try:
            report = json.loads(self.error_file(rank).read_text())
            return float(report["time"]), str(report["cause"])
        except (OSError, ValueError, KeyError, TypeError):
            return float("inf"), ""

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received and signum == signal.SIGINT:
            _say(f"second {name}: killing the ranks now")
            self.kill_at = time.monotonic()
        elif not self.received:
            self.kill_at = time.monotonic() + self.grace
            _say(f"received {name}: passing it to {len(self.procs)} rank(s); each saves at its next step and "
                 f"stops; ranks still running in {self.grace:g} s are killed (signal_grace_seconds)")
        self.received.append(signum)
        self._send(signum)

    def _send(self, signum: int) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    def start(self) -> None:
        base = self.plan.environment()
        for info in self.plan.ranks():
            env = dict(base, **self.plan.rank_env(info), **{ERROR_FILE_ENV: str(self.error_file(info.rank)),
                                                             hangs.STACKS_ENV: str(self.stacks_dir)})
            command = [*self.plan.command, f"--local_rank={info.local_rank}"]
            self.procs[info.rank] = subprocess.Popen(command, env=env, preexec_fn=_rank_preexec)
            if self.received:  # a signal that came while ranks were starting reaches the late ones too
                self.procs[info.rank].send_signal(self.received[0])

    def _report(self, rank: int, code: int, running: list) -> None:
        """deepy's one line about the failed rank: its status and cause."""
        cause = self.cause(rank)[1]
        if not cause and code < 0:
            cause = f"killed by {signal.Signals(-code).name}"
        line = f"rank {rank} failed with status {exit_status(code)}" + (f": {cause}" if cause else "")
        if running:
            line += f"; stopping the other {len(running)} rank(s)"
        _say(line)

    def _timed_out(self, rank: int) -> bool:
        report = hangs.read_stacks(self.stacks_dir, rank)
        return report is not None and report.timed_out

    def _end_hang(self, first: int) -> int:
        """Rank `first` timed out: let its peers' deadlines pass, collect every rank's stacks, end the ranks, say
        which stopped answering; returns hangs.HANG_STATUS."""
        settle = time.monotonic() + HANG_SETTLE_SECONDS
        while time.monotonic() < settle and any(p.poll() is None for p in self.procs.values()):
            time.sleep(POLL_SECONDS)
        alive = [r for r, p in self.procs.items() if p.poll() is None]
        for rank in alive:  # their stacks too: SIGUSR2 runs faulthandler's dump; SIGCONT wakes a stopped rank
            with contextlib.suppress(ProcessLookupError):
                self.procs[rank].send_signal(signal.SIGUSR2)
                self.procs[rank].send_signal(signal.SIGCONT)
        if alive:
            time.sleep(STACKS_WAIT_SECONDS)
        reports = [r for rank in self.procs if (r := hangs.read_stacks(self.stacks_dir, rank)) is not None]
        stuck = hangs.culprits(reports, alive)
        for rank in alive:
            with contextlib.suppress(ProcessLookupError):
                self.procs[rank].kill()
        for proc in self.procs.values():
            proc.wait()
        _say(hangs.hang_line(self.stacks_dir, reports, stuck or [first]))
        return hangs.HANG_STATUS

    def wait(self) -> int:
        """Until every rank has exited; returns deepy's exit status."""
        failed: tuple[int, int] | None = None
        killed = False
        while True:
            running = [p for p in self.procs.values() if p.poll() is None]
            if failed is None:
                ended = [r for r, p in self.procs.items() if p.returncode not in (None, 0)]
                hung = [r for r in ended if self._timed_out(r)]
                if hung and not self.received:
                    return self._end_hang(min(hung, key=lambda r: hangs.read_stacks(self.stacks_dir, r).modified))
                if ended:
                    rank = min(ended, key=lambda r: self.cause(r)[0])  # the first to fail; ties: lowest rank
                    failed = rank, self.procs[rank].returncode
                    self._report(rank, failed[1], running)
                if failed is not None and running:
                    for proc in running:
                        proc.terminate()
                    now = time.monotonic()
                    self.kill_at = min(self.kill_at or float("inf"), now + FAILURE_GRACE_SECONDS)
            if not running:
                break
            if not killed and self.kill_at is not None and time.monotonic() >= self.kill_at:
                ranks = [r for r, p in self.procs.items() if p.poll() is None]
                _say(f"rank(s) {', '.join(map(str, ranks))} still running: SIGKILL")
                for proc in running:
                    proc.kill()
                killed = True
            time.sleep(POLL_SECONDS)
        if failed is not None:
            return exit_status(failed[1])
        if self.received:
            _say(f"all {len(self.procs)} rank(s) saved and stopped on {signal.Signals(self.received[0]).name}")
        return 0


def supervise(plan) -> int:
    """Start the plan's ranks on this machine and wait for them; returns deepy's exit status."""
    sup = Supervisor(plan)
    _say(f"{plan.world_size} rank(s) on this machine, rendezvous {plan.master_addr}:{plan.master_port}; "
         f"grace after a stop signal {sup.grace:g} s (signal_grace_seconds)")
    previous = {sig: signal.signal(sig, sup._on_signal) for sig in FORWARDED}
    try:
        sup.start()
        return sup.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in sup.procs.values():  # only reached with ranks alive if deepy itself failed
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(sup.error_dir, ignore_errors=True)
        if not sup.plan.stacks_dir and all(f.stat().st_size <= hangs.HEADER_BYTES for f in sup.stacks_dir.glob("*")):
            shutil.rmtree(sup.stacks_dir, ignore_errors=True)
