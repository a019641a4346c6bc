"""scripts/fake_cluster.sh for tests: hosts node1..nodeN as network namespaces on this machine.

`fake_cluster(folder)` starts the hosts (and optionally a two-node Slurm), yields a `Cluster` that runs
commands "on" a host, and always stops everything, then checks that nothing is left: no namespace, no
/etc/hosts entry, and no process that ran on any host. Needs root (CI runs as root).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

from conftest import REPO

HARNESS = REPO / "scripts" / "fake_cluster.sh"
PREFIX = "neoxfc-"  # the harness's namespace names
HOSTS_MARK = "# >>> neox fake cluster "


def clean_env(**extra) -> dict[str, str]:
    """This process's environment without a surrounding Slurm job's variables (the hosts have their own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(extra)
    return env


class Cluster:
    def __init__(self, folder: Path, nodes: int):
        self.folder = folder
        self.hosts = [f"node{i}" for i in range(1, nodes + 1)]

    def on(self, host: str, *cmd) -> list[str]:
        """argv that runs CMD on HOST: its network, its hostname, the cluster's ssh keys and Slurm."""
        return ["bash", str(HARNESS), "exec", str(self.folder), host, *map(str, cmd)]

    def run(self, host: str, *cmd, timeout=120, check=True, env=None) -> subprocess.CompletedProcess:
        result = subprocess.run(self.on(host, *cmd), cwd=REPO, env=env or clean_env(), capture_output=True,
                                text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, (cmd, result.stdout[-3000:], result.stderr[-3000:])
        return result

    def pids(self, host: str) -> set[int]:
        """Every process running on HOST (in its network namespace)."""
        out = subprocess.run(["ip", "netns", "pids", PREFIX + host], capture_output=True, text=True).stdout
        return {int(p) for p in out.split()}

    def all_pids(self) -> set[int]:
        return set().union(*(self.pids(h) for h in self.hosts))

    def hostfile(self, slots: int = 1) -> Path:
        path = self.folder / f"hostfile-{slots}"
        path.write_text("".join(f"{h} slots={slots}\n" for h in self.hosts))
        return path


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "(Z)" not in _stat(pid)


def _stat(pid: int) -> str:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return "(Z)" if re.search(r"\) Z ", text) else text
    except OSError:
        return "(Z)"


def leftovers(folder: Path, pids: set[int]) -> list[str]:
    """What a stopped cluster must not leave: namespaces, /etc/hosts lines, processes."""
    found = []
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    found += [f"namespace {n.split()[0]}" for n in names if n.startswith(PREFIX)]
    found += [f"/etc/hosts: {line}" for line in Path("/etc/hosts").read_text().splitlines()
              if line.startswith(HOSTS_MARK) or re.match(r"\S+\s+node\d+$", line)]
    found += [f"process {p}: {command_line(p)[:120]}" for p in sorted(pids) if alive(p)]
    return found


@contextlib.contextmanager
def fake_cluster(folder: Path, nodes: int = 2, slurm: bool = False):
    """Start the hosts (and Slurm), yield a Cluster, then stop and check that nothing is left behind."""
    folder = Path(folder)
    cluster = Cluster(folder, nodes)
    seen: set[int] = set()
    try:
        run = subprocess.run(["bash", str(HARNESS), "start", str(folder), str(nodes)], capture_output=True,
                             text=True, timeout=120, env=clean_env())
        assert run.returncode == 0, run.stderr
        if slurm:
            run = subprocess.run(["bash", str(HARNESS), "slurm", str(folder)], capture_output=True, text=True,
                                 timeout=120, env=clean_env())
            assert run.returncode == 0, run.stderr
        seen = cluster.all_pids()
        yield cluster
    finally:
        seen |= cluster.all_pids()
        stopped = subprocess.run(["bash", str(HARNESS), "stop", str(folder)], capture_output=True, text=True,
                                 timeout=120, env=clean_env())
        left = leftovers(folder, seen)
        for pid in seen:  # the harness failed to stop them: do not leave them to the next test
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        assert stopped.returncode == 0 and not left, (stopped.stderr, left)


