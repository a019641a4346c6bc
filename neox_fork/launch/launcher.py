"""From merged config (+ hostfile or Slurm allocation) to the one command that starts every rank.

Two ways ranks start, chosen by the launcher keys GPT-NeoX users know:

* DeepSpeed's runner (default; `launcher: pdsh|openmpi|mvapich`): `python -m deepspeed.launcher.runner`
  with `--hostfile/--include/--exclude/--num_nodes/--num_gpus/--master_addr/--master_port/--launcher`.
  Without a hostfile it starts `num_gpus` local processes (default: the visible GPUs, or 1 on a CPU
  machine, where ranks use gloo). Each rank runs `python -u -m neox_fork.launch rank USER_SCRIPT ...`,
  a thin wrapper that reports which rank failed and how (DeepSpeed's own message names the wrong one).
* srun (`deepspeed_slurm: true`, or `launcher: slurm`): `srun --kill-on-bad-exit=1 -n N -N M ...
  python -u USER_SCRIPT CONFIGS`; every rank maps SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS to
  RANK/LOCAL_RANK/WORLD_SIZE itself (launch.slurm_environment), so no ssh is needed.

`plan_launch` does all the arithmetic without starting anything, so `deepy.py --dry-run` prints exactly
what would run and the environment every rank will see. Resource selection follows DeepSpeed's rules
(hostfile `HOST slots=N`, include/exclude `host1:0,1@host2`, include/exclude exclusive with
num_nodes/num_gpus), with each mistake reported as a one-line `UserError`.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from neox_fork.config.neox_config import NeoXConfig
from neox_fork.launch import hangs
from neox_fork.errors import UserError
from neox_fork.launch.multihost import RANK_ENV_DEFAULTS, mpi_environment

Resources = "collections.OrderedDict[str, list[int]]"
log = logging.getLogger(__name__)

RANK_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCHERS = {"srun": "srun", "deepspeed": "DeepSpeed runner", "local": "deepy (one node, ranks supervised)"}


# ---------------------------------------------------------------------- hostfile and filters
def parse_hostfile(path: str | os.PathLike) -> collections.OrderedDict[str, int]:
    """An MPI-style hostfile (`worker-0 slots=8` per line, `#` comments) -> {host: slots}, in file order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"hostfile '{path}' not found; write one line per node like 'worker-0 slots=8'")
    pool: collections.OrderedDict[str, int] = collections.OrderedDict()
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        if not m:
            raise UserError(f"{path}:{number}: bad hostfile line {raw.strip()!r}; expected 'HOSTNAME slots=N'")
        host, slots = m.group(1), int(m.group(2))
        if host in pool:
            raise UserError(f"{path}:{number}: host '{host}' is listed twice; give each node one line")
        if slots < 1:
            raise UserError(f"{path}:{number}: host '{host}' has slots={slots}; slots must be at least 1")
        pool[host] = slots
    if not pool:
        raise UserError(f"hostfile '{path}' lists no hosts; write one line per node like 'worker-0 slots=8'")
    return pool


def parse_node_spec(spec: str, key: str) -> collections.OrderedDict[str, list[int]]:
    """DeepSpeed's NODE_SPEC[@NODE_SPEC ...] with NODE_SPEC = NAME[:SLOT[,SLOT ...]] -> {host: slots}."""
    nodes: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
    for part in spec.split("@"):
        host, sep, slots = part.strip().partition(":")
        if not host or (sep and not slots):
            raise UserError(f"{key} {spec!r}: bad node spec {part!r}; expected 'host1:0,1@host2' "
                            "(NAME or NAME:SLOT,SLOT joined by @)")
        try:
            ids = [int(s) for s in slots.split(",")] if sep else []
        except ValueError:
            raise UserError(f"{key} {spec!r}: slots in {part!r} must be integers like 'host:0,1'") from None
        nodes.setdefault(host, [])
        nodes[host] = sorted(set(nodes[host] + ids))
    return nodes


def select_resources(pool: dict[str, int], include: str | None = None, exclude: str | None = None,
                     num_nodes: int = -1, num_gpus: int | None = None,
                     where: str = "hostfile") -> collections.OrderedDict[str, list[int]]:
    """{host: slots} -> {host: [slot ids]} after include/exclude, then the first num_nodes hosts and
    the first num_gpus slots of each (DeepSpeed's rules, in hostfile order)."""
    if include and exclude:
        raise UserError(f"include {include!r} and exclude {exclude!r} are mutually exclusive; keep one")
    if (include or exclude) and (num_nodes > 0 or num_gpus is not None):
        raise UserError(f"{'include' if include else 'exclude'} cannot be combined with num_nodes/num_gpus "
                        "(DeepSpeed's rule); set num_nodes: -1 and num_gpus: null in an overlay, or drop the filter")
    active = collections.OrderedDict((h, list(range(n))) for h, n in pool.items())
    spec, key = (include, "include") if include else (exclude, "exclude")
    if spec:
        chosen = parse_node_spec(spec, key)
        for host, ids in chosen.items():
            if host not in active:
                raise UserError(f"{key} {spec!r}: host '{host}' is not in the {where} (hosts: "
                                f"{', '.join(active)})")
            bad = [i for i in ids if i not in active[host]]
            if bad:
                raise UserError(f"{key} {spec!r}: slot {bad[0]} does not exist on '{host}', which has slots "
                                f"0-{len(active[host]) - 1}")
        if include:  # a bare host name means all of its slots
            active = collections.OrderedDict((h, chosen[h] or active[h]) for h in active if h in chosen)
        else:  # a bare host name drops the whole host
            active = collections.OrderedDict(
                (h, [i for i in ids if h in chosen and chosen[h] and i not in chosen[h]] if h in chosen else ids)
                for h, ids in active.items())
            active = collections.OrderedDict((h, ids) for h, ids in active.items() if ids)
        if not active:
            raise UserError(f"{key} {spec!r} leaves no slot to run on")
    if num_nodes > 0:
        if num_nodes > len(active):
            raise UserError(f"num_nodes {num_nodes} but the {where} has only {len(active)} node(s)")
        active = collections.OrderedDict(list(active.items())[:num_nodes])
    if num_gpus is not None:
        if num_gpus < 1:
            raise UserError(f"num_gpus must be at least 1, got {num_gpus}")
        short = [h for h, ids in active.items() if len(ids) < num_gpus]
        if short:
            raise UserError(f"num_gpus {num_gpus} but '{short[0]}' has only {len(active[short[0]])} slot(s) "
                            f"in the {where}")
        active = collections.OrderedDict((h, list(range(num_gpus))) for h in active)
    return active


# ---------------------------------------------------------------------- Slurm variables
def slurm_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR derived from Slurm's variables (for `srun python train.py`).

    Only variables that are not set already are returned. MASTER_ADDR is the first host of
    SLURM_JOB_NODELIST (expanded as `scontrol show hostnames` would for the common forms).
    """
    env = os.environ if environ is None else environ
    if "SLURM_PROCID" not in env:
        return {}
    mapped = {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": env.get("SLURM_NTASKS", "1"),
    }
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist:
        mapped["MASTER_ADDR"] = first_slurm_host(nodelist)
    mapped.setdefault("MASTER_PORT", env.get("MASTER_PORT", "29500"))
    return {k: v for k, v in mapped.items() if k not in env}


def launcher_environment(use_slurm_env: bool, use_mpi_env: bool) -> None:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* from Slurm or MPI before anything reads them."""
    if use_slurm_env:
        os.environ.update(slurm_environment())
    if use_mpi_env:
        os.environ.update(mpi_environment())


def hub_offline() -> None:
    """Nothing downloads at run time. The Hugging Face libraries lm-eval uses read these once, when first
    imported, so an entry point calls this before anything imports them (neox_fork.inference.evaluation does)."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")


def expand_hostlist(nodelist: str) -> list[str]:
    """Slurm's compressed node list -> hosts, as `scontrol show hostnames` prints them.

    'gpu[001-003,7],cpu1' -> ['gpu001', 'gpu002', 'gpu003', 'gpu7', 'cpu1'] (zero padding kept).
    """
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]*(?:\[[^\]]*\][^,\[]*)*", nodelist):
        if item:
            hosts.extend(_expand_one(item))
    return hosts


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    prefix, rest = item[:m.start()], item[m.end():]
    out = []
    for part in m.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not hi:
            out += [prefix + lo + tail for tail in _expand_one(rest)]
            continue
        for n in range(int(lo), int(hi) + 1):
            out += [prefix + str(n).zfill(len(lo)) + tail for tail in _expand_one(rest)]
    return out


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    return expand_hostlist(nodelist)[0]


def tasks_per_node(value: str) -> list[int]:
    """SLURM_TASKS_PER_NODE ('2(x3),1') -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise UserError(f"SLURM_TASKS_PER_NODE {value!r} is not like '8(x4),2'")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def slurm_pool(environ: dict[str, str]) -> collections.OrderedDict[str, int] | None:
    """{host: tasks} of the Slurm allocation this runs in, or None outside one."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    hosts = expand_hostlist(nodelist)
    if environ.get("SLURM_NTASKS_PER_NODE"):
        counts = [int(environ["SLURM_NTASKS_PER_NODE"])] * len(hosts)
    elif environ.get("SLURM_TASKS_PER_NODE"):
        counts = tasks_per_node(environ["SLURM_TASKS_PER_NODE"])
    elif environ.get("SLURM_NTASKS"):
        counts = [max(1, int(environ["SLURM_NTASKS"]) // len(hosts))] * len(hosts)
    else:
        counts = [1] * len(hosts)
    if len(counts) != len(hosts):
        counts = (counts + [counts[-1]] * len(hosts))[:len(hosts)]
    return collections.OrderedDict(zip(hosts, counts))


# ---------------------------------------------------------------------- the plan
@dataclass
class RankInfo:
    rank: int
    local_rank: int
    host: str
    device: int | None  # GPU index on the host (DeepSpeed sets CUDA_VISIBLE_DEVICES); None under srun


@dataclass
class LaunchPlan:
    mode: str  # "deepspeed" or "srun"
    command: list[str]
    env: dict[str, str]  # set (on top of the caller's environment) for the launcher and every rank
    unset: list[str]  # removed from the environment so each rank computes its own
    resources: collections.OrderedDict[str, list[int]]
    master_addr: str | None
    master_port: int
    notes: list[str] = field(default_factory=list)
    grace_seconds: float | None = None  # "local": signal to SIGKILL (signal_grace_seconds)
    stacks_dir: str | None = None  # "local": where the ranks' watchdogs write their stacks (launch/hangs.py)

    @property
    def world_size(self) -> int:
        return sum(len(ids) for ids in self.resources.values())

    def ranks(self) -> list[RankInfo]:
        """Ranks in the order both launchers number them: host by host, slot by slot."""
        out, rank = [], 0
        for host, ids in self.resources.items():
            for local, slot in enumerate(ids):
                if self.mode in ("deepspeed", "local"):
                    # DeepSpeed's launch.py numbers local ranks as rank % procs-on-this-node, which is a
                    # rotation of 0..n-1 when hosts have different slot counts; show what ranks will see.
                    local = rank % len(ids)
                    out.append(RankInfo(rank, local, host, ids[local]))
                else:
                    out.append(RankInfo(rank, local, host, None))
                rank += 1
        return out

    def rank_env(self, info: RankInfo) -> dict[str, str]:
        env = {"RANK": str(info.rank), "LOCAL_RANK": str(info.local_rank), "WORLD_SIZE": str(self.world_size),
               "MASTER_ADDR": self.master_addr or "<first-host-of-SLURM_JOB_NODELIST>",
               "MASTER_PORT": str(self.master_port)}
        return env

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        for key in self.unset:
            env.pop(key, None)
        env.update(self.env)
        return env

    def describe(self) -> str:
        """What --dry-run prints: the command, the environment it adds, and every rank's variables."""
        hosts = len(self.resources)
        lines = [f"world size {self.world_size} ({hosts} node{'s' * (hosts != 1)}), launched by "
                 f"{LAUNCHERS[self.mode]}"]
        lines += [f"note: {n}" for n in self.notes]
        lines.append("env: " + " ".join(f"{k}={v}" for k, v in sorted(self.env.items())))
        if self.unset:
            lines.append("unset: " + " ".join(self.unset))
        lines.append("command: " + shlex.join(self.command))
        for info in self.ranks():
            where = f"host={info.host}" + (f" device={info.device}" if info.device is not None else "")
            lines.append(f"rank {info.rank}: {where} "
                         + " ".join(f"{k}={v}" for k, v in self.rank_env(info).items()))
        return "\n".join(lines)


def visible_gpu_count(environ: dict[str, str]) -> int:
    """GPUs this machine shows (CUDA_VISIBLE_DEVICES, else nvidia-smi); 0 on a CPU machine."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
            return sum(line.startswith("GPU ") for line in out.splitlines())
        except (OSError, subprocess.SubprocessError):
            return 0
    return 0


def use_srun(c: NeoXConfig) -> bool:
    """srun when the config asks for Slurm's launcher; a clash with an MPI launcher is a UserError."""
    if c.launcher == "slurm" and not c.deepspeed_slurm:
        raise UserError(f"{c.where('launcher')}: launcher 'slurm' starts ranks with srun, which needs "
                        "deepspeed_slurm: true so each rank reads SLURM_PROCID; set it, or use launcher pdsh")
    if c.deepspeed_slurm and "launcher" in c.sources and c.launcher in ("openmpi", "mvapich"):
        raise UserError(f"{c.where('deepspeed_slurm')}: deepspeed_slurm: true starts ranks with srun but "
                        f"{c.where('launcher')} sets launcher {c.launcher!r}; use launcher slurm or drop deepspeed_slurm")
    if c.deepspeed_mpi and c.deepspeed_slurm:
        raise UserError(f"{c.where('deepspeed_mpi')}: deepspeed_mpi and deepspeed_slurm are both true; "
                        "ranks can read their rank from MPI or from Slurm, not both")
    return c.deepspeed_slurm


def plan_launch(c: NeoXConfig, user_script: str, config_paths: list[str], hostfile: str | None = None,
                environ: dict[str, str] | None = None, python: str | None = None) -> LaunchPlan:
    """Everything deepy will do, computed without side effects. Validates the world size too. `hostfile`
    (deepy -H) must exist; the config's, when missing, is one logged line and this machine (DeepSpeed's runner)."""
    environ = dict(os.environ if environ is None else environ)
    python = python or sys.executable
    if hostfile is None and c.hostfile and not Path(c.hostfile).is_file():
        log.warning("%s: hostfile '%s' not found: using this machine's devices (as DeepSpeed's runner does)",
                    c.where("hostfile"), c.hostfile)
    elif hostfile is None:
        hostfile = c.hostfile
    if not Path(user_script).is_file():
        raise UserError(f"user script '{user_script}' not found; run from the repository root, e.g. "
                        "python deepy.py train.py configs/tiny.yml")
    srun = use_srun(c)
    if srun and "SLURM_JOB_ID" not in environ and not shutil.which("srun", path=environ.get("PATH")):
        # e.g. the StableLM config (deepspeed_slurm: true) on a workstation: no Slurm here at all
        if c.num_nodes > 1 or (hostfile and len(parse_hostfile(hostfile)) > 1):
            raise UserError(f"{c.where('deepspeed_slurm')}: deepspeed_slurm: true needs Slurm's srun for a "
                            "multi-node run; run inside an allocation (sbatch/salloc) or set deepspeed_slurm: false")
        srun = False
    if srun:
        plan = _plan_srun(c, user_script, config_paths, hostfile, environ, python)
    else:
        if c.launcher in ("openmpi", "mvapich") and not c.deepspeed_mpi:
            raise UserError(f"{c.where('launcher')}: launcher {c.launcher!r} starts ranks with mpirun, which needs "
                            "deepspeed_mpi: true so each rank reads its MPI rank")
        plan = (_plan_deepspeed(c, user_script, config_paths, hostfile, environ, python) if hostfile
                else _plan_local(c, user_script, config_paths, environ, python))
        if c.deepspeed_slurm:
            plan.notes.append("deepspeed_slurm: true but no Slurm here (no allocation, no srun): "
                              "starting ranks on this machine")
    c.check_world_size(plan.world_size)
    per_node = max(len(ids) for ids in plan.resources.values())
    if "OMP_NUM_THREADS" not in environ:
        plan.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // per_node))
    for key, value in RANK_ENV_DEFAULTS.items():
        if key not in environ:
            plan.env[key] = value
    return plan


def _plan_deepspeed(c, user_script, config_paths, hostfile, environ, python) -> LaunchPlan:
    args = [python, "-u", "-m", "deepspeed.launcher.runner"]
    notes = []
    pool = parse_hostfile(hostfile)
    resources = select_resources(pool, c.include, c.exclude, c.num_nodes, c.num_gpus, where=f"hostfile {hostfile}")
    args += ["--hostfile", str(hostfile)]
    master = c.master_addr or ("127.0.0.1" if list(resources) == ["localhost"] else next(iter(resources)))
    args += ["--master_addr", master]
    if len(resources) > 1 or c.launcher not in ("pdsh", "slurm"):
        args += ["--launcher", c.launcher]
    if c.launcher in ("openmpi", "mvapich"):
        args += _mpi_launcher_args(c, pool, resources, hostfile, master, environ)
    if c.no_ssh_check:
        args.append("--no_ssh_check")
    if c.include:
        args += ["--include", c.include]
    if c.exclude:
        args += ["--exclude", c.exclude]
    if not (c.include or c.exclude) and not (hostfile and c.launcher in ("openmpi", "mvapich")):
        if c.num_nodes > 0 and hostfile:
            args += ["--num_nodes", str(c.num_nodes)]
        if c.num_gpus is not None or not hostfile:
            args += ["--num_gpus", str(len(next(iter(resources.values()))))]
    # hostfile launches: each rank under a watcher that names it if it dies (see watch_rank)
    from neox_fork.launch import multihost

    entry = ["watch", "--job", multihost.job_token()]
    args += ["--master_port", str(c.master_port), "--module", "neox_fork.launch", *entry, user_script, *config_paths]
    return LaunchPlan("deepspeed", args, {}, [], resources, master, c.master_port, notes)


def _mpi_launcher_args(c, pool, resources, hostfile, master, environ) -> list[str]:
    """mpirun options for DeepSpeed's MPI runners, which start one rank per slot of the whole hostfile and
    give ranks no MASTER_ADDR/MASTER_PORT (upstream finds them with mpi4py; we pass them with -x)."""
    if any(len(ids) != pool[h] for h, ids in resources.items()) or list(resources) != list(pool):
        raise UserError(f"{c.where('launcher')}: launcher {c.launcher!r} starts a rank on every slot of hostfile "
                        f"{hostfile} (DeepSpeed's MPI runner cannot select); drop include/exclude/num_nodes/num_gpus "
                        "or write a hostfile with only the slots to use")
    mpirun = ["-x", f"MASTER_ADDR={master}", "-x", f"MASTER_PORT={c.master_port}"]
    if environ.get("OMPI_MCA_btl_tcp_if_include"):  # DeepSpeed otherwise forces `--mca btl_tcp_if_include eth0`
        mpirun += ["--mca", "btl_tcp_if_include", environ["OMPI_MCA_btl_tcp_if_include"]]
    return ["--launcher_args", shlex.join(mpirun)]


def _plan_local(c, user_script, config_paths, environ, python) -> LaunchPlan:
    """One node, no hostfile: deepy starts the ranks itself and passes signals on (neox_fork.launch.supervisor).
    Without a master_port in the configs it takes a free port, so two runs on one machine do not collide."""
    if c.num_nodes > 1:
        raise UserError(f"{c.where('num_nodes')}: num_nodes {c.num_nodes} needs a hostfile (-H FILE or the "
                        "hostfile key) or deepspeed_slurm: true inside a Slurm allocation")
    if c.include or c.exclude:
        raise UserError(f"{c.where('include' if c.include else 'exclude')}: include/exclude select hosts of a "
                        "hostfile; pass one with -H FILE or the hostfile key")
    gpus = visible_gpu_count(environ)
    count = c.num_gpus or gpus or 1
    if gpus and count > gpus:
        raise UserError(f"{c.where('num_gpus')}: num_gpus {count} but this machine shows {gpus} GPU(s)")
    notes = [] if gpus else [f"no GPU visible: {count} CPU process(es) on gloo"]
    port = c.master_port
    if "master_port" not in c.sources:
        port = free_port()
        notes.append(f"master_port not set: using free port {port}")
    notes.append(f"on SIGUSR1/SIGTERM/SIGINT every rank saves at its next step and stops; ranks still running "
                 f"{c.signal_grace_seconds:g} s later are killed (signal_grace_seconds)")
    command = [python, "-u", "-m", "neox_fork.launch", "rank", user_script, *config_paths]
    resources = collections.OrderedDict(localhost=list(range(count)))
    plan = LaunchPlan("local", command, {}, [], resources, c.master_addr or "127.0.0.1", port, notes)
    plan.grace_seconds = c.signal_grace_seconds
    folder = hangs.stacks_dir(c.save, {})
    plan.stacks_dir = str(folder) if folder else None
    return plan


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody uses now, for a one-node rendezvous, drawn below the kernel's ephemeral range.

    Rank 0 binds the port seconds later (after its imports). A port of the ephemeral range (the kernel's pick for
    bind(0)) can be taken in between as the source port of any outgoing connection on the machine (another run's
    gloo connections: EADDRINUSE at rendezvous); one below it is only ever taken by a listener that chose it."""
    low, _ = _ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(64):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every draw taken: the kernel's pick
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range of source ports for outgoing connections (Linux; its default elsewhere)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _plan_srun(c, user_script, config_paths, hostfile, environ, python) -> LaunchPlan:
    notes = []
    if hostfile:
        pool, where = parse_hostfile(hostfile), f"hostfile {hostfile}"
    else:
        pool, where = slurm_pool(environ), "Slurm allocation (SLURM_JOB_NODELIST)"
    if pool is not None:
        resources = select_resources(pool, c.include, c.exclude, c.num_nodes, c.num_gpus, where=where)
        for host, ids in resources.items():
            if ids != list(range(len(ids))):
                raise UserError(f"srun cannot pin ranks to slots {ids} on '{host}'; include whole hosts "
                                "(host1@host2) with deepspeed_slurm")
        master = c.master_addr or next(iter(resources))
    else:
        if c.include or c.exclude:
            raise UserError("include/exclude under deepspeed_slurm need a hostfile or a Slurm allocation "
                            "to select from")
        nodes, per_node = max(c.num_nodes, 1), c.num_gpus or 1
        resources = collections.OrderedDict((f"node{i}", list(range(per_node))) for i in range(nodes))
        master = c.master_addr
        notes.append("not inside a Slurm allocation: srun will allocate the nodes and each rank takes "
                     "MASTER_ADDR from SLURM_JOB_NODELIST")
    counts = {len(ids) for ids in resources.values()}
    world = sum(len(ids) for ids in resources.values())
    args = ["srun", "--kill-on-bad-exit=1", "--ntasks", str(world), "--nodes", str(len(resources))]
    if len(counts) == 1:
        args += ["--ntasks-per-node", str(counts.pop())]
    if pool is not None and list(resources) != list(pool):
        args += ["--nodelist", ",".join(resources)]
    if c.comment:
        args += ["--comment", c.comment]
    if c.account:
        args += ["--account", c.account]
    args += [python, "-u", user_script, *config_paths]
    env = {"MASTER_PORT": str(c.master_port)}
    if master:
        env["MASTER_ADDR"] = master
    # A leftover RANK/WORLD_SIZE (e.g. deepy started from inside another launcher) would be the same on
    # every rank and win over the Slurm mapping, which only fills unset variables.
    unset = [k for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE") if k in environ]
    return LaunchPlan("srun", args, env, unset, resources, master, c.master_port, notes)


def launch(plan: LaunchPlan) -> int:
    """Run the plan in the foreground; returns its exit status.

    One node ("local"): deepy starts and supervises the ranks (neox_fork.launch.supervisor). A pdsh launch over
    several hosts: deepy stays the runner's parent and passes signals to every rank (neox_fork.launch.multihost).
    Otherwise the launcher replaces this process (exec), so signals sent to deepy (Ctrl-C, scancel, a
    preemption USR1) reach srun or DeepSpeed's runner exactly as if the user had started them directly.
    """
    if plan.mode == "local":
        from neox_fork.launch.supervisor import supervise

        return supervise(plan)
    if plan.mode == "srun" and not shutil.which("srun"):
        raise UserError("deepspeed_slurm: true needs Slurm's srun on PATH; run inside an allocation "
                        "(sbatch/salloc) or set deepspeed_slurm: false")
    from neox_fork.launch import multihost

    multihost.missing_tools(plan)
    if multihost.relays_signals(plan):
        sys.stdout.flush()
        return multihost.relay_signals(plan)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(plan.command[0], plan.command, plan.environment())
    return 1  # not reached


# ---------------------------------------------------------------------- helpers run by the ranks / sbatch
def run_rank(argv: list[str]) -> None:
    """`python -m neox_fork.launch [--local_rank=N] rank SCRIPT ARGS...`: run SCRIPT as __main__ and,
    if it fails, say which rank (and host) failed and how, then fail the same way."""
    import runpy

    local_rank = [a for a in argv if a.startswith("--local_rank")]
    rest = [a for a in argv if not a.startswith("--local_rank")]
    script, args = rest[0], rest[1:]
    sys.argv = [script, *args, *local_rank]
    sys.path.insert(0, str(Path(script).resolve().parent))
    who = (f"rank {os.environ.get('RANK', '?')}/{os.environ.get('WORLD_SIZE', '?')} "
           f"(local rank {os.environ.get('LOCAL_RANK', '?')} on {socket.gethostname()})")
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as err:
        if err.code not in (None, 0):
            code = err.code if isinstance(err.code, int) else 1
            print(f"[neox_fork.launch] {who} exited with code {code}", file=sys.stderr, flush=True)
        raise
    except BaseException as err:
        print(f"[neox_fork.launch] {who} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise


def training_finished(config: NeoXConfig) -> bool:
    """True when `save/latest` has reached train_iters (or nothing is saved); a requeue is pointless then."""
    if not config.save:
        return True
    from neox_fork.checkpoint.store import read_latest

    step = read_latest(config.save)
    return step is not None and step >= config.train_iters


def _with_config(paths: list[str], use):
    """use(the merged config of `paths`) for slurm/common.sh's checks; a bad config or checkpoint pointer is the
    usual one line and status 2."""
    from neox_fork.config.loading import load_config
    from neox_fork.errors import exit_on_user_error

    return exit_on_user_error(lambda: use(load_config(*paths)))()


def _main(argv: list[str]) -> int:
    commands = [a for a in argv if not a.startswith("--local_rank")]
    if commands[:1] == ["rank"] and len(commands) > 1:
        rest = list(argv)
        rest.remove("rank")  # the first one only: a user argument may be spelt the same
        run_rank(rest)
        return 0
    if commands[:1] == ["watch"] and len(commands) > 1:
        rest = list(argv)
        rest.remove("watch")
        from neox_fork.launch.multihost import watch_rank

        return watch_rank(rest)
    if commands[:1] == ["finished"] and len(commands) > 1:
        finished = _with_config(commands[1:], training_finished)
        print("finished" if finished else "unfinished")
        return 0 if finished else 1
    if commands[:1] == ["hung"] and len(commands) > 2:
        line = _with_config(commands[2:], lambda c: hangs.find_hang(hangs.stacks_dir(c.save), float(commands[1])))
        if line:
            print(line)
        return 0 if line else 1
    print("usage: python -m neox_fork.launch rank|watch SCRIPT [ARGS...] | finished CONFIG [CONFIG...] | "
          "hung SINCE CONFIG [CONFIG...]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
