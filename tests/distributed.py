"""Run a function on N local processes joined by gloo: the same code path NCCL takes on a cluster."""

import os
import runpy
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp

from neox_fork.launch.launcher import free_port


# Each rank is forked from a server process that has imported these once per test session, instead of a fresh
# interpreter importing torch, megatron-core and DeepSpeed (about 5 CPU seconds a rank on 2 cores). Only
# imports are shared: no process group, tensor or RNG state exists in the server before a fork.
FAILED_RANK_GRACE = 10  # seconds the other ranks have to end on their own after one fails
PRELOAD = ["torch", "deepspeed", "neox_fork.training.loop", "neox_fork.model.transformer", "distributed"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _local_rank_env(env, rank, world_size, port):
    """`env` plus what torchrun sets for local rank `rank` of `world_size` (the master on this machine)."""
    return dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port))


def _adopt(env, cwd):
    """In a forked child: the test's environment and folder now, not the server's when it started; and the
    platform's default start method for the child's own children, as in a fresh interpreter (multiprocessing
    sets the server's forkserver in each child it forks: a rank's data-loader workers would then be children
    of a forkserver of the rank's own, and outlive a rank that is killed)."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    mp.set_start_method(None, force=True)


def _worker(rank, fn, args, results, env, cwd):
    _adopt(env, cwd)
    try:
        results[rank] = ("ok", fn(rank, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        results[rank] = ("error", traceback.format_exc())
        raise
    finally:
        from neox_fork.parallel import groups as parallel

        parallel.destroy()


def build_save_and_run(rank, keys: dict, folder: str):
    """Build the model of config `keys` from its seed at its model_parallel_size, save this rank's state as
    folder/rank{rank}.pt and return its logits on fixed tokens: for TP merge tests (run_distributed)."""
    from neox_fork.checkpoint import store as checkpoint
    from neox_fork.parallel import groups as parallel
    from neox_fork.config.loading import from_dict
    from neox_fork.model.transformer import build_model

    config = from_dict(keys)
    parallel.initialize(config.model_parallel_size, backend="gloo")
    parallel.seed_everything(config.seed)
    model = build_model(config)
    torch.save(checkpoint.model_state(model), f"{folder}/rank{rank}.pt")
    tokens = torch.arange(60).reshape(2, 30) * 7 % 1000
    with torch.no_grad():
        return model.eval()(tokens)


def run_distributed(fn, world_size: int, *args):
    """fn(rank, *args) on `world_size` processes; returns the list of their return values."""
    ctx = _context()
    with ctx.Manager() as manager:
        results = manager.dict()
        port, cwd = free_port(), os.getcwd()
        procs = [ctx.Process(target=_worker, args=(r, fn, args, results,
                                                   _local_rank_env(os.environ, r, world_size, port), cwd))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        out = []
        for rank in range(world_size):
            status, value = results.get(rank, ("error", f"rank {rank} died (exit code {procs[rank].exitcode})"))
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out.append(value)
        return out


def _run_script(script, argv, env, cwd, out_path, err_path):
    """In a forked child: what `python SCRIPT ARGV...` does after its interpreter has started."""
    _adopt(env, cwd)
    if env.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # read at startup by a fresh interpreter
    for fd, path in ((1, out_path), (2, err_path)):  # appended to: every rank writes to the same two files
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(opened, fd)
        os.close(opened)
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python SCRIPT` puts its folder first
    runpy.run_path(script, run_name="__main__")


def run_script(script, argv, env, cwd, timeout, nproc=1):
    """`python SCRIPT ARGV...` in `cwd` with `env`, forked from the preloaded server rather than started afresh
    (the program runs as its __main__, as from a shell). With nproc > 1, as torchrun starts it: nproc local
    ranks with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, their output in one stream, and
    the others stopped a few seconds after one fails. Returns a subprocess.CompletedProcess with the text
    output and status (of one rank: its own, negative for a signal; of several: 0, or 1 if any failed), or
    raises subprocess.TimeoutExpired after `timeout` seconds."""
    command = [str(script), *map(str, argv)]
    with tempfile.TemporaryDirectory() as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        for path in (out, err):  # there to read even if every rank dies before writing
            open(path, "w").close()
        port, ctx, procs = free_port(), _context(), []
        for rank in range(nproc):
            rank_env = env if nproc == 1 else _local_rank_env(env, rank, nproc, port)
            procs.append(ctx.Process(target=_run_script, args=(command[0], command[1:], rank_env, str(cwd), out, err)))
            procs[-1].start()
        deadline, failed_at, timed_out = time.monotonic() + timeout, None, False
        while any(p.exitcode is None for p in procs):
            now = time.monotonic()
            timed_out = timed_out or now > deadline
            if timed_out or (failed_at is not None and now > failed_at + FAILED_RANK_GRACE):
                for p in procs:
                    p.kill()
            if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                failed_at = now
            time.sleep(0.05)
        if timed_out:  # even if a rank ended, or was killed, before the others
            raise subprocess.TimeoutExpired(command, timeout)
        codes = [p.exitcode for p in procs]
        status = codes[0] if nproc == 1 else int(any(codes))
        with open(out) as o, open(err) as e:
            return subprocess.CompletedProcess(command, status, o.read(), e.read())
