"""Per-rank activation memory of one training step at TP=N, with and without sequence parallelism.

Run on N ranks (`torchrun --nproc_per_node N tools/benchmark.py --activation-memory ...`). Each rank
builds the model twice from the same seed (sequence_parallel false, then true) and, for one forward and
backward on the same random batch, measures:

- `saved_bytes`: the bytes of the tensors autograd keeps for the backward pass, counted once per
  storage (torch.autograd.graph.saved_tensors_hooks), parameters excluded: the activation memory itself,
  independent of the allocator;
- `peak_allocated_bytes`: the most bytes of tensors allocated during forward and backward and alive at
  once (torch.profiler's memory events; the CPU's analogue of CUDA's max_memory_allocated): activations
  plus the transient buffers and the gradients. The process's resident set is no measure here: glibc
  keeps freed memory resident, so whichever run comes second reuses the first one's pages.

Under context parallelism (`run_context_parallel`, `--context-parallel`: CP = the number of ranks, TP 1) each rank
measures one forward and backward of its 1/CP slice of the same batch (DeepSpeed-Ulysses inside attention), with
sequence parallelism off.

Activation checkpointing is off unless the config turns it on (then only the checkpointed layer inputs
are saved, and the recompute happens inside the backward, which the allocation peak still sees).
"""

from __future__ import annotations

import gc
import json

import torch
import torch.distributed as dist

from neox_fork.parallel import groups as parallel
from neox_fork.config.neox_config import NeoXConfig


def _peak_allocated(prof) -> int:
    """The most bytes of tensors allocated during a profiled block and alive at once (the profiler's
    running `Total Allocated`, counted from the block's start): the CPU's max_memory_allocated."""
    import os
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.remove(path)
    return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0)


def measure(config: NeoXConfig, vocab: int, sequence_parallel: bool) -> dict:
    """Activation memory of one forward + backward on this rank (see the module docstring)."""
    from dataclasses import replace

    from neox_fork.model.transformer import build_model

    parallel.seed_everything(config.seed)
    model = build_model(replace(config, sequence_parallel=sequence_parallel), vocab).train()
    parallel.sum_sequence_parallel_grads(model)
    g = torch.Generator().manual_seed(0)
    shape = (config.train_micro_batch_size_per_gpu, config.seq_length)
    tokens, labels = (torch.randint(0, vocab, shape, generator=g) for _ in range(2))
    sliced = parallel.context_slice({"tokens": tokens, "labels": labels})  # this rank's part of every sequence
    tokens, labels = sliced["tokens"], sliced["labels"]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    gc.collect()
    dist.barrier()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens, labels=labels)
        loss.backward()
    out = {"sequence_parallel": sequence_parallel, "saved_bytes": sum(storages.values()),
           "peak_allocated_bytes": _peak_allocated(prof), "loss": parallel.context_sum(loss).item()}
    del model, loss
    gc.collect()
    return out


def run(config: NeoXConfig, vocab: int) -> list[dict]:
    """Both measurements on every rank of a TP group of the whole world; rank r's results at index r."""
    mine = [measure(config, vocab, sp) for sp in (False, True)]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def _header(config: NeoXConfig, layout: str) -> str:
    return (f"activation memory per rank, {layout}, seq {config.seq_length} x micro-batch "
            f"{config.train_micro_batch_size_per_gpu} x hidden {config.hidden_size}, {config.num_layers} layers, "
            f"recompute {config.activation_recompute}")


def report(config: NeoXConfig, results: list[list[dict]], as_json: bool) -> str:
    if as_json:
        return json.dumps({"tp": len(results), "seq_length": config.seq_length,
                           "micro_batch": config.train_micro_batch_size_per_gpu, "ranks": results})
    mib = 2**20
    lines = [_header(config, f"TP={len(results)}")]
    for rank, (off, on) in enumerate(results):
        ratio = off["saved_bytes"] / max(on["saved_bytes"], 1)
        line = (f"rank {rank}: saved for backward {off['saved_bytes'] / mib:.1f} MiB without SP, "
                f"{on['saved_bytes'] / mib:.1f} MiB with SP (ratio {ratio:.2f})")
        line += (f"; peak allocated {off['peak_allocated_bytes'] / mib:.1f} MiB without SP, "
                 f"{on['peak_allocated_bytes'] / mib:.1f} MiB with SP "
                 f"(ratio {off['peak_allocated_bytes'] / max(on['peak_allocated_bytes'], 1):.2f})")
        lines.append(line)
    lines.append(f"loss without SP {results[0][0]['loss']:.6f}, with SP {results[0][1]['loss']:.6f}")
    return "\n".join(lines)


def run_context_parallel(config: NeoXConfig, vocab: int) -> list[dict]:
    """One measurement on every rank of a context-parallel group of the whole world; rank r's at index r."""
    mine = measure(config, vocab, False)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def report_context_parallel(config: NeoXConfig, results: list[dict], as_json: bool) -> str:
    if as_json:
        return json.dumps({"cp": len(results), "seq_length": config.seq_length,
                           "micro_batch": config.train_micro_batch_size_per_gpu, "ranks": results})
    mib = 2**20
    lines = [_header(config, f"CP={len(results)}")]
    lines += [f"rank {rank}: saved for backward {r['saved_bytes'] / mib:.1f} MiB; peak allocated "
              f"{r['peak_allocated_bytes'] / mib:.1f} MiB" for rank, r in enumerate(results)]
    lines.append(f"loss {results[0]['loss']:.6f}")
    return "\n".join(lines)
