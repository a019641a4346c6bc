"""deepy.py --dry-run: world size, command and every rank's environment from hostfiles, include/exclude,
num_nodes/num_gpus and Slurm variables; user mistakes end in one `error:` line with exit status 2."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

from neox_fork.launch import launcher as launch

TINY = str(REPO / "configs" / "tiny.yml")


def deepy(tmp_path, *args, overlay=None, env=None):
    """Run `deepy.py train.py tiny.yml [overlay] ARGS --dry-run` without GPUs or Slurm in sight."""
    configs = [TINY]
    if overlay is not None:
        path = tmp_path / "overlay.yml"
        path.write_text(json.dumps(overlay))
        configs.append(str(path))
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("SLURM_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")}
    clean["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, whatever the machine has
    clean.update(env or {})
    return subprocess.run([sys.executable, "deepy.py", "train.py", *configs, *args, "--dry-run"], cwd=REPO,
                          env=clean, capture_output=True, text=True, timeout=60)


def parse(out: str):
    """(command argv, extra env, [{host, device?, RANK, ...} per rank]) from the dry-run output."""
    command, env, ranks = None, {}, []
    for line in out.splitlines():
        if line.startswith("command: "):
            command = shlex.split(line[len("command: "):])
        elif line.startswith("env: "):
            env = dict(kv.split("=", 1) for kv in line[len("env: "):].split())
        elif line.startswith("rank "):
            ranks.append(dict(kv.split("=", 1) for kv in line.split(": ", 1)[1].split()))
    assert command is not None, out
    return command, env, ranks


def ok(result):
    assert result.returncode == 0, result.stderr
    return parse(result.stdout)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def world(ranks, key="RANK"):
    return [int(r[key]) for r in ranks]


@pytest.fixture
def hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# three nodes\nworker-a slots=4\nworker-b slots=4   # comment\n\nworker-c slots=4\n")
    return str(path)


# ---------------------------------------------------------------------- local (no hostfile)
def test_launch_local_cpu_defaults_to_one_rank_started_by_deepy_with_this_python(tmp_path):
    result = deepy(tmp_path)
    command, env, ranks = ok(result)
    # deepy starts (and supervises) each rank itself: the wrapper that reports failures, then the configs
    assert command == [sys.executable, "-u", "-m", "neox_fork.launch", "rank", "train.py", TINY]
    assert "launched by deepy (one node, ranks supervised)" in result.stdout
    # no master_port in the configs: a free port, named in a note
    port = int(ranks[0]["MASTER_PORT"])
    assert f"note: master_port not set: using free port {port}" in result.stdout
    assert ranks == [{"host": "localhost", "device": "0", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}]
    assert "ranks still running 600 s later are killed (signal_grace_seconds)" in result.stdout
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert int(env["OMP_NUM_THREADS"]) >= 1


def test_launch_num_gpus_and_master_keys_set_the_local_world(tmp_path):
    result = deepy(tmp_path, overlay={"num_gpus": 3, "master_port": 31234, "master_addr": "10.0.0.9",
                                      "signal_grace_seconds": 45})
    command, env, ranks = ok(result)
    assert world(ranks) == [0, 1, 2] and world(ranks, "LOCAL_RANK") == [0, 1, 2]
    assert {r["WORLD_SIZE"] for r in ranks} == {"3"}
    assert {(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in ranks} == {("10.0.0.9", "31234")}
    assert "free port" not in result.stdout
    assert "ranks still running 45 s later are killed" in result.stdout
    assert env["OMP_NUM_THREADS"] == str(max(1, os.cpu_count() // 3))


def test_launch_dry_run_prints_the_derived_deepspeed_config(tmp_path):
    result = deepy(tmp_path, overlay={"num_gpus": 2, "gradient_accumulation_steps": 3})
    line = next(l for l in result.stdout.splitlines() if l.startswith("deepspeed config: "))
    ds = json.loads(line[len("deepspeed config: "):])
    assert ds["train_batch_size"] == 8 * 3 * 2 and ds["gradient_accumulation_steps"] == 3


# ---------------------------------------------------------------------- hostfile selection
def test_launch_hostfile_uses_every_slot_of_every_host_in_file_order(tmp_path, hostfile):
    command, _, ranks = ok(deepy(tmp_path, "-H", hostfile, overlay={"num_gpus": None}))
    assert command[command.index("--hostfile") + 1] == hostfile
    assert "--num_gpus" not in command
    assert [r["host"] for r in ranks] == ["worker-a"] * 4 + ["worker-b"] * 4 + ["worker-c"] * 4
    assert world(ranks) == list(range(12)) and world(ranks, "LOCAL_RANK") == [0, 1, 2, 3] * 3
    assert {r["MASTER_ADDR"] for r in ranks} == {"worker-a"} and {r["WORLD_SIZE"] for r in ranks} == {"12"}
    # on every host each rank runs under the watcher that names it, with its host, if it dies
    # ... marked with this launch's token, by which deepy passes a signal on to every rank of every host
    entry = command[command.index("neox_fork.launch") + 1:]
    assert entry[0:2] == ["watch", "--job"] and re.fullmatch(r"\w+_\d+", entry[2]) and entry[3] == "train.py"


def test_launch_hostfile_key_in_config_works_like_dash_H(tmp_path, hostfile):
    _, _, ranks = ok(deepy(tmp_path, overlay={"hostfile": hostfile, "num_gpus": None, "num_nodes": 1}))
    assert [r["host"] for r in ranks] == ["worker-a"] * 4


def test_launch_num_nodes_and_num_gpus_take_the_first_hosts_and_slots(tmp_path, hostfile):
    command, _, ranks = ok(deepy(tmp_path, "-H", hostfile, overlay={"num_nodes": 2, "num_gpus": 2,
                                                                    "no_ssh_check": True}))
    assert command[command.index("--num_nodes") + 1] == "2" and command[command.index("--num_gpus") + 1] == "2"
    assert "--no_ssh_check" in command
    assert [(r["host"], r["device"], r["RANK"], r["LOCAL_RANK"]) for r in ranks] == [
        ("worker-a", "0", "0", "0"), ("worker-a", "1", "1", "1"), ("worker-b", "0", "2", "0"), ("worker-b", "1", "3", "1")]


def test_launch_include_picks_slots_and_whole_hosts_like_deepspeed(tmp_path, hostfile):
    command, _, ranks = ok(deepy(tmp_path, "-H", hostfile, overlay={"num_gpus": None, "include": "worker-a:1,3@worker-c"}))
    assert command[command.index("--include") + 1] == "worker-a:1,3@worker-c"
    assert "--num_gpus" not in command and "--num_nodes" not in command
    assert [(r["host"], r["device"]) for r in ranks] == [("worker-a", "1"), ("worker-a", "3")] + [
        ("worker-c", str(d)) for d in (2, 3, 0, 1)]
    # DeepSpeed's launch.py numbers local ranks rank % procs-on-node: a rotation on the 4-slot host
    assert world(ranks, "LOCAL_RANK") == [0, 1, 2, 3, 0, 1]
    assert {r["WORLD_SIZE"] for r in ranks} == {"6"}


def test_launch_exclude_drops_slots_and_whole_hosts(tmp_path, hostfile):
    command, _, ranks = ok(deepy(tmp_path, "-H", hostfile, overlay={"num_gpus": None, "exclude": "worker-b@worker-c:0"}))
    assert command[command.index("--exclude") + 1] == "worker-b@worker-c:0"
    assert [(r["host"], r["device"]) for r in ranks] == [("worker-a", str(d)) for d in range(4)] + [
        ("worker-c", str(d)) for d in (2, 3, 1)]  # ranks 4-6: local ranks 4%3, 5%3, 6%3 of slots [1, 2, 3]
    assert world(ranks, "LOCAL_RANK") == [0, 1, 2, 3, 1, 2, 0]


def test_launch_selection_matches_deepspeeds_own_resolution():
    from deepspeed.launcher import runner

    pool = {"w0": 4, "w1": 4, "w2": 2}
    cases = [dict(include="w0:1,3@w2"), dict(include="w1"), dict(exclude="w1@w0:0,2"), dict(exclude="w2:1"),
             dict(num_nodes=2), dict(num_gpus=2), dict(num_nodes=1, num_gpus=3), dict()]
    for case in cases:
        ours = launch.select_resources(pool, case.get("include"), case.get("exclude"), case.get("num_nodes", -1),
                                       case.get("num_gpus"))
        theirs = runner.parse_inclusion_exclusion(pool, case.get("include", ""), case.get("exclude", ""))
        theirs = runner.apply_num_nodes_and_gpus(theirs, case.get("num_nodes", -1), case.get("num_gpus") or -1)
        assert dict(ours) == {h: list(s) for h, s in theirs.items()}, case
        assert list(ours) == list(theirs), case


def test_launch_tensor_parallel_must_divide_the_selected_world(tmp_path, hostfile):
    result = deepy(tmp_path, "-H", hostfile, overlay={"num_gpus": None, "include": "worker-a:0,1,2",
                                                      "model_parallel_size": 2})
    assert_user_error(result, "model_parallel_size 2", "world size 3")


def test_launch_train_batch_size_is_checked_against_the_world(tmp_path, hostfile):
    result = deepy(tmp_path, "-H", hostfile, overlay={"num_gpus": 2, "train_batch_size": 16})
    assert_user_error(result, "train_batch_size 16")


# ---------------------------------------------------------------------- user errors
@pytest.mark.parametrize("text, fragment", [
    ("worker-a slots=4\nworker-b slots=four\n", "hostfile:2: bad hostfile line"),
    ("worker-a slots=4\nworker-a slots=2\n", "listed twice"),
    ("worker-a 4\n", "expected 'HOSTNAME slots=N'"),
    ("# nothing\n\n", "lists no hosts"),
    ("worker-a slots=0\n", "slots must be at least 1"),
])
def test_launch_bad_hostfile_is_one_line_error(tmp_path, text, fragment):
    path = tmp_path / "hostfile"
    path.write_text(text)
    assert_user_error(deepy(tmp_path, "-H", str(path), overlay={"num_gpus": None}), fragment)


def test_launch_missing_hostfile_is_one_line_error(tmp_path):
    assert_user_error(deepy(tmp_path, "-H", str(tmp_path / "nope")), "hostfile", "not found")


def test_launch_missing_hostfile_named_in_a_config_runs_locally_as_deepspeeds_runner(tmp_path):
    """Upstream's configs name `hostfile: /mock_path`; DeepSpeed's runner warns and uses the local devices."""
    missing = str(tmp_path / "mock_path")
    result = deepy(tmp_path, overlay={"hostfile": missing, "num_gpus": 2})
    command, _, ranks = ok(result)
    assert command[2:4] == ["-m", "neox_fork.launch"] and "--hostfile" not in command  # deepy's own local start
    assert world(ranks) == [0, 1] and {r["host"] for r in ranks} == {"localhost"}
    logged = [line for line in result.stderr.splitlines() if "mock_path" in line]
    assert len(logged) == 1 and f"hostfile '{missing}' not found: using this machine's devices" in logged[0]
    assert "overlay.yml" in logged[0]  # names the file that set it


@pytest.mark.parametrize("overlay, fragments", [
    ({"include": "worker-z"}, ["host 'worker-z' is not in the hostfile"]),
    ({"include": "worker-a:7"}, ["slot 7 does not exist on 'worker-a'"]),
    ({"include": "worker-a:x"}, ["must be integers"]),
    ({"include": "worker-a:"}, ["bad node spec"]),
    ({"exclude": "worker-a@worker-b@worker-c"}, ["leaves no slot"]),
    ({"include": "worker-a", "exclude": "worker-b"}, ["mutually exclusive"]),
    ({"include": "worker-a", "num_gpus": 2}, ["cannot be combined with num_nodes/num_gpus"]),
    ({"num_nodes": 5, "num_gpus": None}, ["num_nodes 5", "only 3 node(s)"]),
    ({"num_gpus": 8}, ["num_gpus 8", "only 4 slot(s)"]),
])
def test_launch_bad_selection_is_one_line_error(tmp_path, hostfile, overlay, fragments):
    overlay = {"num_gpus": None, **overlay}
    assert_user_error(deepy(tmp_path, "-H", hostfile, overlay=overlay), *fragments)


def test_launch_multi_node_without_hostfile_or_slurm_is_an_error(tmp_path):
    assert_user_error(deepy(tmp_path, overlay={"num_nodes": 2, "num_gpus": 1}), "num_nodes 2 needs a hostfile")


def test_launch_missing_user_script_and_config_are_errors(tmp_path):
    result = subprocess.run([sys.executable, "deepy.py", "nope.py", TINY, "--dry-run"], cwd=REPO,
                            capture_output=True, text=True)
    assert_user_error(result, "user script 'nope.py' not found")
    result = subprocess.run([sys.executable, "deepy.py", "train.py", "missing.yml", "--dry-run"], cwd=REPO,
                            capture_output=True, text=True)
    assert_user_error(result, "missing.yml")


@pytest.mark.parametrize("overlay, fragment", [
    ({"launcher": "slurm"}, "needs deepspeed_slurm: true"),
    ({"launcher": "openmpi", "deepspeed_slurm": True}, "use launcher slurm or drop deepspeed_slurm"),
    ({"deepspeed_slurm": True, "deepspeed_mpi": True}, "not both"),
    ({"launcher": "openmpi"}, "needs deepspeed_mpi: true"),
])
def test_launch_conflicting_launcher_keys_are_errors(tmp_path, overlay, fragment):
    assert_user_error(deepy(tmp_path, overlay=overlay), fragment)


def test_launch_openmpi_launcher_is_passed_to_deepspeed(tmp_path, hostfile):
    command, _, ranks = ok(deepy(tmp_path, "-H", hostfile, overlay={"launcher": "openmpi", "deepspeed_mpi": True,
                                                                    "num_gpus": None}))
    assert command[command.index("--launcher") + 1] == "openmpi" and len(ranks) == 12
    # DeepSpeed's MPI runner refuses --num_gpus/--num_nodes and gives ranks no MASTER_*: mpirun -x does
    assert "--num_gpus" not in command and "--num_nodes" not in command
    mpirun = shlex.split(command[command.index("--launcher_args") + 1])
    assert mpirun == ["-x", "MASTER_ADDR=worker-a", "-x", f"MASTER_PORT={ranks[0]['MASTER_PORT']}"]


def test_launch_openmpi_cannot_select_part_of_the_hostfile(tmp_path, hostfile):
    result = deepy(tmp_path, "-H", hostfile, overlay={"launcher": "openmpi", "deepspeed_mpi": True, "num_gpus": 1})
    assert_user_error(result, "launcher 'openmpi' starts a rank on every slot of hostfile", "num_gpus")


def test_launch_multinode_launcher_without_its_tools_is_one_line(tmp_path, hostfile):
    """Not a dry run: deepy refuses before starting DeepSpeed's runner, naming what is missing."""
    empty = tmp_path / "bin"
    empty.mkdir()
    for overlay, missing in (({"launcher": "openmpi", "deepspeed_mpi": True, "num_gpus": None},
                              "launcher openmpi needs mpirun, ompi_info, ssh on PATH"),
                             ({"launcher": "pdsh"}, "launcher pdsh needs pdsh, ssh on PATH")):
        (tmp_path / "overlay.yml").write_text(json.dumps(overlay))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(PATH=str(empty), CUDA_VISIBLE_DEVICES="")
        result = subprocess.run([sys.executable, "deepy.py", "train.py", TINY, str(tmp_path / "overlay.yml"), "-H",
                                 hostfile], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert_user_error(result, missing, "apt-get install")


# ---------------------------------------------------------------------- Slurm (srun) launches
SLURM_ENV = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "4(x2)",
             "SLURM_PROCID": "0", "RANK": "5", "WORLD_SIZE": "99"}


def test_launch_slurm_allocation_becomes_one_srun_with_kill_on_bad_exit(tmp_path):
    result = deepy(tmp_path, env=SLURM_ENV, overlay={"deepspeed_slurm": True, "launcher": "slurm", "num_gpus": None,
                                                     "comment": "neox run", "account": "proj42"})
    command, env, ranks = ok(result)
    assert command[:2] == ["srun", "--kill-on-bad-exit=1"]
    flags = dict(zip(command[2:], command[3:]))
    assert (flags["--ntasks"], flags["--nodes"], flags["--ntasks-per-node"]) == ("8", "2", "4")
    assert (flags["--comment"], flags["--account"]) == ("neox run", "proj42")
    assert "--nodelist" not in command  # the whole allocation
    python = command.index(sys.executable)
    assert command[python:python + 4] == [sys.executable, "-u", "train.py", TINY]
    assert command[-1].endswith("overlay.yml")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu007", "29500")
    assert "unset: RANK WORLD_SIZE" in result.stdout  # a stale RANK would win over the Slurm mapping
    assert [(r["host"], r["RANK"], r["LOCAL_RANK"]) for r in ranks] == [
        (f"gpu00{7 + i // 4}", str(i), str(i % 4)) for i in range(8)]
    assert {r["WORLD_SIZE"] for r in ranks} == {"8"}


def test_launch_slurm_rank_env_matches_what_each_rank_maps_from_slurm_vars(tmp_path):
    """The dry run's per-rank table must equal what launch.slurm_environment computes on that task."""
    from neox_fork.launch.launcher import slurm_environment

    overlay = {"deepspeed_slurm": True, "num_gpus": None}
    command, env, ranks = ok(deepy(tmp_path, env=SLURM_ENV, overlay=overlay))
    # What each task sees: srun passes on what deepy sets for it (env, whatever it holds), and Slurm adds its
    # own per-task variables; RANK/WORLD_SIZE of SLURM_ENV are unset by deepy.
    propagated = {k: v for k, v in env.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    for r in ranks:
        task = {**propagated, "SLURM_PROCID": r["RANK"], "SLURM_LOCALID": r["LOCAL_RANK"], "SLURM_NTASKS": "8",
                "SLURM_JOB_NODELIST": SLURM_ENV["SLURM_JOB_NODELIST"]}
        mapped = slurm_environment(task)
        assert {k: mapped.get(k, task.get(k)) for k in launch.RANK_KEYS} == {k: r[k] for k in launch.RANK_KEYS}
    # and the rendezvous itself, known by hand: the first host of gpu[007-008] and the default master_port
    # (29500, as upstream's), the same on every rank
    assert {(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in ranks} == {("gpu007", "29500")}


def test_launch_slurm_uneven_tasks_per_node_and_subset_selection(tmp_path):
    env = {**SLURM_ENV, "SLURM_NTASKS_PER_NODE": "", "SLURM_TASKS_PER_NODE": "2(x2),1",
           "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_NTASKS": "5"}
    command, _, ranks = ok(deepy(tmp_path, env=env, overlay={"deepspeed_slurm": True, "num_gpus": None}))
    assert "--ntasks-per-node" not in command and command[command.index("--ntasks") + 1] == "5"
    assert [r["host"] for r in ranks] == ["n1", "n1", "n2", "n2", "n3"]
    command, _, ranks = ok(deepy(tmp_path, env=env, overlay={"deepspeed_slurm": True, "num_gpus": None,
                                                              "include": "n2@n3"}))
    assert command[command.index("--nodelist") + 1] == "n2,n3"
    assert [r["RANK"] for r in ranks] == ["0", "1", "2"] and ranks[0]["MASTER_ADDR"] == "n2"


def test_launch_slurm_with_hostfile_and_num_gpus(tmp_path, hostfile):
    command, env, ranks = ok(deepy(tmp_path, "-H", hostfile, env=SLURM_ENV,
                                   overlay={"deepspeed_slurm": True, "num_nodes": 2, "num_gpus": 2}))
    flags = dict(zip(command[2:], command[3:]))
    assert (flags["--ntasks"], flags["--nodes"], flags["--ntasks-per-node"]) == ("4", "2", "2")
    assert flags["--nodelist"] == "worker-a,worker-b" and env["MASTER_ADDR"] == "worker-a"


def test_launch_slurm_cannot_pin_slots(tmp_path, hostfile):
    result = deepy(tmp_path, "-H", hostfile, overlay={"deepspeed_slurm": True, "num_gpus": None,
                                                      "include": "worker-a:1,2"})
    assert_user_error(result, "srun cannot pin ranks to slots")


def test_launch_slurm_outside_an_allocation_lets_srun_allocate(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "srun").chmod(0o755)
    command, env, ranks = ok(deepy(tmp_path, env={"PATH": str(bin_dir)},
                                   overlay={"deepspeed_slurm": True, "num_nodes": 2, "num_gpus": 2}))
    flags = dict(zip(command[2:], command[3:]))
    assert (flags["--ntasks"], flags["--nodes"]) == ("4", "2") and "MASTER_ADDR" not in env
    assert len(ranks) == 4


# ---------------------------------------------------------------------- pure helpers
@pytest.mark.parametrize("nodelist, hosts", [
    ("localhost", ["localhost"]),
    ("gpu[003-005,9],cpu1", ["gpu003", "gpu004", "gpu005", "gpu9", "cpu1"]),
    ("a[1-2]b[7,9]", ["a1b7", "a1b9", "a2b7", "a2b9"]),
    ("node-[08-10]", ["node-08", "node-09", "node-10"]),
])
def test_launch_expand_hostlist_and_first_host_agree(nodelist, hosts):
    from neox_fork.launch.launcher import first_slurm_host

    assert launch.expand_hostlist(nodelist) == hosts
    assert first_slurm_host(nodelist) == hosts[0]


def test_launch_tasks_per_node():
    assert launch.tasks_per_node("8(x4),2") == [8, 8, 8, 8, 2]
    assert launch.tasks_per_node("3") == [3]


def test_launch_training_finished_reads_latest(tmp_path):
    from neox_fork.config.loading import load_config

    cfg = tmp_path / "c.yml"
    cfg.write_text(json.dumps({"save": str(tmp_path / "ck"), "train_iters": 10}))
    config = load_config(TINY, cfg)
    assert not launch.training_finished(config)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "latest").write_text("global_step9")
    assert not launch.training_finished(config)
    (tmp_path / "ck" / "latest").write_text("global_step10")
    assert launch.training_finished(config)
    cmd = [sys.executable, "-m", "neox_fork.launch", "finished", TINY, str(cfg)]
    assert subprocess.run(cmd, cwd=REPO, capture_output=True).returncode == 0


def test_launch_deepspeed_slurm_without_any_slurm_runs_locally(tmp_path):
    """The StableLM config says deepspeed_slurm: true; on a workstation (no allocation, no srun) deepy
    starts the ranks itself instead of failing, and says so."""
    no_srun = {"PATH": str(tmp_path / "empty-bin")}
    result = deepy(tmp_path, env=no_srun, overlay={"deepspeed_slurm": True, "launcher": "slurm", "num_gpus": 2})
    command, _, ranks = ok(result)
    assert command[2:5] == ["-m", "neox_fork.launch", "rank"]
    assert len(ranks) == 2 and "no Slurm here" in result.stdout
    result = deepy(tmp_path, env=no_srun, overlay={"deepspeed_slurm": True, "num_nodes": 2, "num_gpus": 2})
    assert_user_error(result, "needs Slurm's srun for a multi-node run")
