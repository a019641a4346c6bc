"""Training-step throughput on random tokens, by two paths (tools/benchmark.py is the command line).

- path "engine": the step users run. `optim.build_engine` (DeepSpeed: ZeRO as configured, bf16 with fp32
  master weights and the fp32 gradient buffer, clipping, the LR schedule) and `training.train_step` (our
  loss, gradient accumulation, the non-finite check), the very functions `train.py` calls, one process.
- path "model": like for like against transformers' StableLmForCausalLM: forward + loss + backward + torch
  AdamW on the same parameters and dtype, no DeepSpeed on either side. Eager is eager on both sides;
  with torch_compile both compile each transformer layer.

After `warmup` untimed steps of each model, `steps` timed steps are taken in pairs whose order alternates
(ours then theirs, theirs then ours, ...) so that clock drift, heat, background load and whatever the
previous step left in caches hit both alike; the reported time is the median step. On CUDA each step is
bracketed by `torch.cuda.synchronize()`.

Memory, per model, over its build and warm-up: on CUDA the growth of `max_memory_allocated` over what was
allocated before it was built; on the CPU the growth of the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs) over the resident set before it was built. Either way the other model's
resident memory is not counted.
"""

from __future__ import annotations

import gc
import itertools
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from neox_fork.perf import flops
from neox_fork.config.neox_config import NeoXConfig
from neox_fork.data.tokenizer import tokenizer_file_vocab_size
from neox_fork.config.dtypes import torch_dtype
from neox_fork.errors import UserError

DTYPES = ("fp32", "bf16")  # the model path's dtypes (fp16 would need a loss scaler)
PATHS = ("engine", "model")


@dataclass
class Measurement:
    name: str
    step_seconds: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    loss: float | None = None

    def median(self) -> float:
        return statistics.median(self.step_seconds)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _memory_mark(device: torch.device) -> int | None:
    """Reset the peak counter; return what is in use now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
    except OSError:
        return None
    return _status_bytes("VmRSS")


def _memory_peak_since(device: torch.device, mark: int | None) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - mark
    peak = _status_bytes("VmHWM")
    return None if peak is None or mark is None else peak - mark


def build_ours(config: NeoXConfig, vocab: int, dtype: torch.dtype, device: torch.device):
    from neox_fork.model.transformer import build_model
    from neox_fork.training.optim import build_optimizer

    model = build_model(config, vocab).to(device=device, dtype=dtype).train()
    optimizer = build_optimizer(config, model)

    def step(tokens, labels):
        loss = model(tokens, labels=labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return model, step


def build_hf(config: NeoXConfig, vocab: int, dtype: torch.dtype, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    from neox_fork.checkpoint.hf import hf_config_dict
    from neox_fork.training.optim import build_optimizer

    keys = hf_config_dict(config, config.padded_vocab_size(vocab), "fp32")
    for key in ("architectures", "torch_dtype"):
        keys.pop(key)
    keys["use_cache"] = False
    hf_config = AutoConfig.for_model(keys.pop("model_type"), **keys)  # the config's family (StableLm for tiny.yml)
    hf_config._attn_implementation = "sdpa"  # transformers' default where available; named for clarity
    model = AutoModelForCausalLM.from_config(hf_config).to(device=device, dtype=dtype).train()
    if config.activation_recompute == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.torch_compile:  # as ours: each decoder layer compiled, the rest eager
        for layer in model.base_model.layers:
            layer.compile()
    optimizer = build_optimizer(config, model)

    def step(tokens, labels):
        del labels  # transformers shifts the inputs itself
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return model, step


def build_engine_step(config: NeoXConfig, vocab: int, batch: dict, save_every: int = 0):
    """The train.py step on `batch` (one micro-batch, reused for every accumulation step); with `save_every`, a
    checkpoint save every that many steps, timed as part of its step."""
    from neox_fork.model.transformer import build_model
    from neox_fork.training.optim import build_engine
    from neox_fork.training.preference import Objective, make_reference
    from neox_fork.training.loop import train_step

    model = build_model(config, vocab)
    if config.pipe_parallel_size > 1:  # the whole model's FLOPs and parameters, before the stage keeps its part
        from neox_fork.training.pipeline import build_pipeline_engine

        model.__dict__["whole_flops"] = flops.training_flops_per_token(model, config.seq_length,
                                                                       config.activation_recompute)
        model.__dict__["whole_parameters"] = sum(p.numel() for p in model.parameters())
        engine = build_pipeline_engine(config, model, world=dist.get_world_size())
    else:
        engine = build_engine(config, model, world=dist.get_world_size())
    params = [p for p in model.parameters() if p.requires_grad]
    micro_batches = itertools.repeat(batch)
    # train_impl dpo/kto: the frozen reference copy is built here too, so its memory and forward are measured
    objective = Objective(config, make_reference(engine.module) if Objective(config).needs_reference else None)
    step = lambda: train_step(engine, config, micro_batches, params, objective=objective)[0]  # noqa: E731
    return model, _saving_every(step, engine, config, save_every) if save_every else step


def _saving_every(step, engine, config: NeoXConfig, every: int):
    """`step`, then a checkpoint save every `every` steps as train.py saves (async_save as configured) into a
    temporary folder removed at exit: the time of a step that saves, and of those that overlap an async save."""
    import atexit
    import dataclasses
    import shutil
    import tempfile

    from neox_fork.training.state import TrainState, finish_pending, save

    folder = tempfile.mkdtemp(prefix="neox_fork-benchmark-saves-")
    atexit.register(shutil.rmtree, folder, True)
    c, state = dataclasses.replace(config, save=folder, keep_last_n_checkpoints=1), TrainState()

    def step_and_save():
        loss = step()
        state.iteration += 1
        finish_pending(c, state, wait=False)
        if state.iteration % every == 0:
            save(engine, c, state)
        return loss

    return step_and_save


def _timed(step, device) -> tuple[float, float]:
    _sync(device)
    start = time.perf_counter()
    loss = step()
    _sync(device)
    seconds = time.perf_counter() - start
    return seconds, float(loss.detach() if torch.is_tensor(loss) else loss)


def check_comparable(config: NeoXConfig, path: str, compare_hf: bool) -> None:
    """Refuse comparisons that would not be like for like."""
    if path not in PATHS:
        raise UserError(f"--path {path}: use one of {', '.join(PATHS)}")
    if compare_hf and path != "model":
        raise UserError("--compare hf needs --path model: transformers has no DeepSpeed training step here, "
                        "so only the model paths compare like for like")
    if compare_hf and config.activation_recompute == "selective":
        raise UserError("--compare hf with recompute_granularity selective: transformers has no selective "
                        "recompute; compare with checkpoint_activations true (full) or false")


def run(config: NeoXConfig, *, path: str = "model", steps: int = 10, warmup: int = 3, compare_hf: bool = False,
        dtype: str | None = None, seed: int = 0, save_every: int = 0) -> dict:
    """Measure and return a result dict (see `format_text` for the fields). On the engine path the
    precision is the config's (DeepSpeed's); `dtype` applies to the model path."""
    check_comparable(config, path, compare_hf)
    if config.dataset_impl == "pairwise" and path != "engine":
        raise UserError(f"train_impl {config.train_impl} (pairwise data) is timed on --path engine only")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _dtype(config, path, dtype, device)
    _initialize(config, path, device)
    vocab = config.unpadded_vocab_size(tokenizer_file_vocab_size(config.vocab_file, config.tokenizer_type,
                                                                 config.merge_file))
    tokens, labels = _random_batch(config, vocab, seed)
    if save_every and path != "engine":
        raise UserError("--save-every needs --path engine (saves are the train.py step's)")
    builders = _builders(config, path, compare_hf, vocab, dtype, device, tokens, labels, save_every)
    runs = _measure(builders, device, steps, warmup, seed)
    out = _report(config, path, dtype, device, runs, steps, warmup)
    del runs
    gc.collect()
    return out


def _dtype(config: NeoXConfig, path: str, dtype: str | None, device: torch.device) -> str:
    """The engine path runs the config's precision; the model path `dtype`, else bf16 on CUDA."""
    if path == "engine":
        dtype = config.dtype_name
    dtype = dtype or ("bf16" if device.type == "cuda" else config.dtype_name)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    return dtype


def _initialize(config: NeoXConfig, path: str, device: torch.device) -> None:
    """Process groups: one process, or one per stage when pipelined (torchrun --nproc_per_node P)."""
    from neox_fork.parallel import groups as parallel

    pp = max(config.pipe_parallel_size, 1)
    if pp > 1 and path != "engine":
        raise UserError(f"pipe_parallel_size {pp} needs --path engine (the model path times one process)")
    parallel.initialize(1, "nccl" if device.type == "cuda" else "gloo", pipeline_parallel_size=pp)
    if pp > 1 and dist.get_world_size() != pp:
        raise UserError(f"--path engine with pipe_parallel_size {pp} runs one process per stage: start it "
                        f"with torchrun --nproc_per_node {pp} (got {dist.get_world_size()} processes)")


def _random_batch(config: NeoXConfig, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch of random tokens and its next-token labels (CPU tensors)."""
    b, s = config.train_micro_batch_size_per_gpu, config.seq_length
    generator = torch.Generator().manual_seed(seed)
    pairs = config.dataset_impl == "pairwise"  # dpo/rm: each sample is a (chosen, rejected) pair, 2 x s tokens
    data = torch.randint(0, vocab, (b, 2, s + 1) if pairs else (b, s + 1), generator=generator)
    return data[..., :-1].contiguous(), data[..., 1:].contiguous()


def _builders(config, path, compare_hf, vocab, dtype, device, tokens, labels, save_every=0) -> list:
    """(name, build) pairs, ours first; build() returns (model, step()) with the batch bound."""
    if path == "engine":
        micro = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones_like(tokens, dtype=torch.float32)}
        return [("ours", lambda: build_engine_step(config, vocab, micro, save_every))]
    batch = (tokens.to(device), labels.to(device))
    builders = [("ours", build_ours)] + ([("hf", build_hf)] if compare_hf else [])
    return [(name, _bind(build, config, vocab, torch_dtype(dtype), device, batch)) for name, build in builders]


def _measure(builders, device, steps: int, warmup: int, seed: int) -> list:
    """Build and warm up each model (its memory measured meanwhile), then time `steps` steps of each in pairs
    of alternating order. Returns (Measurement, step, model) per builder."""
    runs = []
    for name, build in builders:
        torch.manual_seed(seed)
        mark = _memory_mark(device)
        model, step = build()
        m = Measurement(name)
        for _ in range(warmup):
            m.loss = _timed(step, device)[1]
        m.peak_memory_bytes = _memory_peak_since(device, mark)
        runs.append((m, step, model))
    for i in range(steps):  # pairs in alternating order: ours-theirs, theirs-ours, ...
        for m, step, _ in (runs if i % 2 == 0 else runs[::-1]):
            seconds, m.loss = _timed(step, device)
            m.step_seconds.append(seconds)
    return runs


def _report(config: NeoXConfig, path: str, dtype: str, device: torch.device, runs: list, steps: int,
            warmup: int) -> dict:
    """The result dict: the run's setting, the model's size and FLOPs, and each model's measurements."""
    b, s = config.train_micro_batch_size_per_gpu, config.seq_length
    ours = runs[0][2]
    fpt = ours.__dict__.get("whole_flops") or flops.training_flops_per_token(ours, s, config.activation_recompute)
    peak = flops.device_peak_flops(device) if device.type == "cuda" else None
    results = {m.name: _model_results(m, config, path, fpt, peak) for m, _, _ in runs}
    out = {
        "path": path,
        "train_impl": config.train_impl,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine during the run
        "torch": torch.__version__,
        "dtype": dtype,
        "micro_batch": b,
        "gradient_accumulation_steps": config.gradient_accumulation_steps if path == "engine" else 1,
        "seq_length": s,
        "vocab_size": ours.shape.vocab_size,
        "parameters": ours.__dict__.get("whole_parameters") or sum(p.numel() for p in ours.parameters()),
        "non_embedding_parameters": fpt.non_embedding_params,
        "checkpoint_activations": config.checkpoint_activations,
        "recompute": config.activation_recompute,
        "torch_compile": config.torch_compile,
        "attention": sorted(set(ours.shape.attention_types)),
        "moe_experts": config.moe_num_experts,  # 1: dense
        "moe_grouped_gemm": config.moe_grouped_gemm,  # null: grouped GEMMs where torch has the kernel (CUDA bf16)
        "steps": steps,
        "warmup": warmup,
        "model_flops_per_token": fpt.model,
        "hardware_flops_per_token": fpt.hardware,
        "peak_flops": peak,
        "memory_kind": "cuda_max_allocated_growth" if device.type == "cuda" else "rss_peak_growth",
        "ours": results["ours"],
    }
    if path == "engine":
        import deepspeed

        out["deepspeed"] = deepspeed.__version__
        out["zero_stage"] = config.zero_stage
        out["pipe_parallel_size"] = max(config.pipe_parallel_size, 1)
    if "hf" in results:
        import transformers

        out["hf"] = results["hf"]
        out["transformers"] = transformers.__version__
        out["ratio_vs_hf"] = results["ours"]["tokens_per_sec"] / results["hf"]["tokens_per_sec"]
    return out


def _model_results(m: Measurement, config: NeoXConfig, path: str, fpt, peak: float | None) -> dict:
    """One model's throughput (tokens of a step over its median time), MFU, HFU, memory and last loss."""
    b, s = config.train_micro_batch_size_per_gpu, config.seq_length
    pairs = 2 if config.dataset_impl == "pairwise" else 1  # dpo/rm: a sample is a (chosen, rejected) pair
    tps = b * config.gradient_accumulation_steps * s * pairs / m.median() if path == "engine" else b * s / m.median()
    return {
        "tokens_per_sec": tps,
        "step_seconds_median": m.median(),
        "step_seconds": m.step_seconds,
        "mfu": flops.mfu(tps, fpt.model, max(config.pipe_parallel_size, 1), peak),
        "hfu": flops.mfu(tps, fpt.hardware, max(config.pipe_parallel_size, 1), peak),
        "peak_memory_bytes": m.peak_memory_bytes,
        "loss": m.loss,
    }


def _bind(build, config, vocab, dtype, device, batch):
    """A builder for the model path: (model, step()) with the batch bound."""
    def built():
        model, step = build(config, vocab, dtype, device)
        return model, lambda: step(*batch)
    return built


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def _fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _fmt_pct(x: float | None) -> str:
    return "n/a (no peak for this device)" if x is None else f"{100 * x:.1f}%"


def format_text(r: dict) -> str:
    lines = [
        f"path: {r['path']}; device: {r['device']}, {r['threads']} threads, load {r['load_average_1min']:.1f}, "
        f"torch {r['torch']}, {r['dtype']}",
        f"shape: {r['parameters']:,} parameters, micro-batch {r['micro_batch']} x seq {r['seq_length']}, "
        f"vocab {r['vocab_size']}, recompute {r['recompute']}, torch_compile {r['torch_compile']}",
        f"flops/token: model {r['model_flops_per_token']:.4g}, hardware {r['hardware_flops_per_token']:.4g}",
    ]
    for name in ("ours", "hf"):
        if name in r:
            x = r[name]
            lines.append(f"{name}: {x['tokens_per_sec']:,.0f} tokens/s (median step {x['step_seconds_median'] * 1e3:.1f} ms "
                         f"over {r['steps']}), MFU {_fmt_pct(x['mfu'])}, HFU {_fmt_pct(x['hfu'])}, "
                         f"peak memory {_fmt_bytes(x['peak_memory_bytes'])} ({r['memory_kind']}), "
                         f"loss {x['loss']:.4f}")
    if "ratio_vs_hf" in r:
        lines.append(f"ratio_vs_hf: {r['ratio_vs_hf']:.3f}")
    return "\n".join(lines)


def format_table(results: list[tuple[str, dict]]) -> str:
    """One Markdown table over benchmark results (label, result dict): a row per timed model."""
    rows = ["| run | path | recompute | micro-batch | compile | model | tokens/s | MFU | HFU | peak memory | "
            "ratio_vs_hf |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in results:
        for name in ("ours", "hf"):
            if name not in r:
                continue
            x = r[name]
            ratio = f"{r['ratio_vs_hf']:.3f}" if name == "ours" and "ratio_vs_hf" in r else ""
            rows.append(f"| {label} | {r['path']} | {r['recompute']} | {r['micro_batch']} | {r['torch_compile']} | "
                        f"{'transformers' if name == 'hf' else 'ours'} | {x['tokens_per_sec']:,.0f} | "
                        f"{_fmt_pct(x['mfu'])} | {_fmt_pct(x['hfu'])} | {_fmt_bytes(x['peak_memory_bytes'])} | "
                        f"{ratio} |")
    devices = sorted({r["device"] for _, r in results})
    return "\n".join(rows + [f"device: {', '.join(devices)}"])
