"""Run a function on N local processes joined by gloo: the same code path NCCL takes on a cluster."""

import os
import traceback

import torch
import torch.multiprocessing as mp

from neox_fork.launch.launcher import free_port


def _worker(rank, world_size, port, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
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
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results)) for r in range(world_size)]
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
