"""Launches across several hosts: what runs on each host, and deepy's side of it.

* `watch_rank` (`python -m neox_fork.launch watch --job TOKEN SCRIPT ...`): how DeepSpeed's launcher starts
  each rank of a hostfile launch, so that a rank that dies, however it dies, is named with its host.
* `relay_signals`: deepy's INT/TERM/USR1 passed on to every rank of every host of a pdsh launch.
* `missing_tools`: one line naming what a multi-node launcher lacks, instead of DeepSpeed's traceback.

The plan itself (hostfile, selection, runner arguments) stays in `neox_fork.launch`, which imports this module
(never the reverse); what every rank's environment gets (`RANK_ENV_DEFAULTS`, `mpi_environment`) is here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import typing

from neox_fork.errors import UserError

# A neox_fork.launch.launcher.LaunchPlan. launch imports this module, so this one does not import launch (imports point
# one way: tests/test_package_imports_point_one_way.py); the name stands for the type.
LaunchPlan = typing.Any

# Set for the ranks unless the user already set them: a dead peer then raises instead of hanging in
# NCCL forever (the collective timeout itself is `distributed_timeout_minutes`, read by train.py).
RANK_ENV_DEFAULTS = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_ASYNC_ERROR_HANDLING": "1",  # the same switch under torch < 2.2's name
    "PYTHONFAULTHANDLER": "1",  # a rank killed by a fatal signal prints its Python stack
}

# What each multi-node launcher runs on this machine, and where it comes from.
LAUNCHER_TOOLS = {
    "pdsh": [("pdsh", "apt-get install pdsh"), ("ssh", "apt-get install openssh-client")],
    "openmpi": [("mpirun", "apt-get install openmpi-bin"), ("ompi_info", "apt-get install openmpi-bin"),
                ("ssh", "apt-get install openssh-client")],
    "mvapich": [("mpiname", "MVAPICH2-GDR, which Debian does not package"),
                ("mpirun", "MVAPICH2-GDR, which Debian does not package")],
}


def missing_tools(plan: LaunchPlan) -> None:
    """One line naming what a multi-node launcher lacks here, instead of DeepSpeed's traceback."""
    launcher = plan.command[plan.command.index("--launcher") + 1] if "--launcher" in plan.command else "pdsh"
    if plan.mode != "deepspeed" or (len(plan.resources) < 2 and launcher == "pdsh"):
        return
    missing = [(tool, where) for tool, where in LAUNCHER_TOOLS.get(launcher, []) if not shutil.which(tool)]
    if missing:
        hints = "; ".join(dict.fromkeys(where for _, where in missing))
        raise UserError(f"launcher {launcher} needs {', '.join(t for t, _ in missing)} on PATH here and on every "
                        f"host of the hostfile ({hints}); or use another launcher")


def mpi_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """RANK/LOCAL_RANK/WORLD_SIZE from Open MPI's variables (launcher openmpi/mvapich, deepspeed_mpi)."""
    env = os.environ if environ is None else environ
    names = {"RANK": ("OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK"),
             "LOCAL_RANK": ("OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"),
             "WORLD_SIZE": ("OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE")}
    mapped = {}
    for ours, theirs in names.items():
        found = next((env[n] for n in theirs if n in env), None)
        if found is not None and ours not in env:
            mapped[ours] = found
    return mapped


def job_token() -> str:
    """Identifies one hostfile launch's ranks on every host (deepy's host and pid)."""
    return re.sub(r"[^A-Za-z0-9]", "_", f"{socket.gethostname()}_{os.getpid()}")


def relays_signals(plan: LaunchPlan) -> bool:
    """A pdsh launch over several hosts: deepy stays the runner's parent and passes signals to every rank."""
    return (plan.mode == "deepspeed" and len(plan.resources) > 1 and "--job" in plan.command
            and plan.command[plan.command.index("--launcher") + 1] == "pdsh")


def relay_signals(plan: LaunchPlan) -> int:
    """Run DeepSpeed's runner as a child and pass INT/TERM/USR1 sent to deepy on to every rank of every host.

    DeepSpeed's runner would die of USR1 (leaving the ranks training with no checkpoint) and turns INT/TERM
    into a kill of every rank; here each rank gets the signal itself, through ssh to every host (pdsh), saves
    at its next step and exits, and the runner ends with them. The runner runs in its own session, so a
    terminal's Ctrl-C reaches deepy alone; a second signal stops the job at once the runner's way (TERM).
    """
    import signal

    token = plan.command[plan.command.index("--job") + 1]
    hosts = ",".join(plan.resources)
    pattern = rf"^[^ ]+ -u -m neox_fork[.]launch --local_rank=[0-9]+ watch --job {token} "  # the watchers only
    env = plan.environment()
    runner = subprocess.Popen(plan.command, env=env, start_new_session=True)
    received: list[int] = []

    def relay(signum, frame):
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) > 1:
            print(f"deepy: second signal ({name}): stopping every rank now", file=sys.stderr, flush=True)
            runner.send_signal(signal.SIGTERM)
            return
        print(f"deepy: {name}: passing it to every rank on {hosts}; they save at their next step and stop",
              file=sys.stderr, flush=True)
        # on each host, only processes in the network namespace of the ssh session that runs pkill: the ranks
        # that host's sshd started (hosts simulated on one machine share one process table)
        subprocess.Popen(["pdsh", "-S", "-w", hosts, "pkill", "--ns", "$$", "--nslist", "net", f"-{name[3:]}", "-f",
                          shlex.quote(pattern)], env={**env, "PDSH_RCMD_TYPE": "ssh"}, stdout=subprocess.DEVNULL)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, relay)
    return runner.wait()


def watch_rank(argv: list[str]) -> int:
    """`python -m neox_fork.launch [--local_rank=N] watch SCRIPT ARGS...`: how DeepSpeed's launcher starts a
    rank of a hostfile launch on each host. SCRIPT runs in a child process so that a rank killed outright
    (SIGKILL, the OOM killer) is still named with its host: DeepSpeed's launch.py names only the node's
    last-started command, and pdsh adds only the host. INT/TERM/USR1/USR2/HUP sent to this process are
    passed on; the child is in its own process group (a terminal's Ctrl-C reaches it once, through here) and
    dies with this process (PR_SET_PDEATHSIG), so it is never left behind.
    """
    import signal

    local_rank = [a for a in argv if a.startswith("--local_rank")]
    rest = [a for a in argv if not a.startswith("--local_rank")]
    if rest[:1] == ["--job"]:  # names this job's ranks for relay_signals; nothing else
        rest = rest[2:]
    script, args = rest[0], rest[1:]
    env = dict(os.environ)
    env.update({k: v for k, v in rank_defaults(env).items() if k not in env})
    names = {**env, **mpi_environment(env)}  # under mpirun the rank is in OMPI_COMM_WORLD_* only
    who = (f"rank {names.get('RANK', '?')}/{names.get('WORLD_SIZE', '?')} "
           f"(local rank {names.get('LOCAL_RANK', '?')} on {socket.gethostname()})")
    child = subprocess.Popen([sys.executable, "-u", script, *args, *local_rank], env=env,
                             preexec_fn=_watched_child)
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
    for sig in forwarded:
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    code = child.wait()
    for sig in forwarded:  # the rank is done: a late copy of a stop signal must not fail its clean exit
        signal.signal(sig, signal.SIG_IGN)
    if code < 0:
        print(f"[neox_fork.launch] {who} was killed by {signal.Signals(-code).name}", file=sys.stderr, flush=True)
        return 128 - code
    if code:
        print(f"[neox_fork.launch] {who} exited with code {code}", file=sys.stderr, flush=True)
    return code


def _watched_child() -> None:
    """In the child, before exec: its own process group, and SIGKILL when the watching parent dies (Linux
    prctl PR_SET_PDEATHSIG)."""
    import signal

    from neox_fork.launch.supervisor import die_with_parent

    os.setpgid(0, 0)
    die_with_parent(signal.SIGKILL)  # not Linux: the parent's signal forwarding still applies


def rank_defaults(environ: dict[str, str]) -> dict[str, str]:
    """What every rank should see unless its environment says otherwise.

    deepy sets these for the launcher, but DeepSpeed's pdsh runner forwards only PYTHON*-style variables to
    other nodes, so a rank on a remote node fills them in itself (OMP_NUM_THREADS from the node's own cores
    and its number of ranks: LOCAL_SIZE from DeepSpeed's launch.py, or Open MPI's local size)."""
    per_node = max(1, int(environ.get("LOCAL_SIZE") or environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") or 1))
    return {**RANK_ENV_DEFAULTS, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // per_node))}
