"""Training-step throughput on random tokens: ours, and optionally transformers' StableLmForCausalLM.

One step = forward + backward + AdamW step, one process, TP=1. After `warmup` untimed steps of each
model, `steps` timed steps alternate between the models (ours, theirs, ours, ...) so that clock drift,
thermal state and background load hit both alike; the reported time is the median step. On CUDA each
step is bracketed by `torch.cuda.synchronize()`. Both models see the same batch, dtype, thread count and
optimizer (torch AdamW: fused on CUDA, foreach on CPU, the same parameter groups), and both use
activation checkpointing when the config asks for it.

Memory, per model, over its build and warm-up: on CUDA the growth of `max_memory_allocated` over what was
allocated before it was built; on the CPU the growth of the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs) over the resident set before it was built. Either way the other model's
resident memory is not counted.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from neox_fork import flops
from neox_fork.config import GPT_NEOX_20B_VOCAB_SIZE, NeoXConfig, load_config

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Measurement:
    name: str
    step_seconds: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    loss: float | None = None

    def median(self) -> float:
        return statistics.median(self.step_seconds)


def tokenizer_vocab_size(config: NeoXConfig) -> int:
    """The vocabulary the run would have: config vocab_size, else the tokenizer file, else GPT-NeoX-20B's."""
    if config.vocab_size:
        return config.vocab_size
    if config.vocab_file and os.path.isfile(config.vocab_file):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(config.vocab_file).get_vocab_size(with_added_tokens=True)
    return GPT_NEOX_20B_VOCAB_SIZE


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
    from neox_fork.model import build_model
    from neox_fork.training import build_optimizer

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
    from transformers import StableLmConfig, StableLmForCausalLM

    from neox_fork.hf import hf_config_dict
    from neox_fork.training import build_optimizer

    keys = hf_config_dict(config, config.padded_vocab_size(vocab), "fp32")
    for key in ("architectures", "model_type", "torch_dtype"):
        keys.pop(key)
    keys["use_cache"] = False
    hf_config = StableLmConfig(**keys)
    hf_config._attn_implementation = "sdpa"  # transformers' default where available; named for clarity
    model = StableLmForCausalLM(hf_config).to(device=device, dtype=dtype).train()
    if config.checkpoint_activations:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = build_optimizer(config, model)

    def step(tokens, labels):
        del labels  # transformers shifts the inputs itself
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return model, step


def _timed(step, batch, device) -> tuple[float, float]:
    _sync(device)
    start = time.perf_counter()
    loss = step(*batch)
    _sync(device)
    return time.perf_counter() - start, float(loss.detach())


def run(config: NeoXConfig, *, steps: int = 10, warmup: int = 3, compare_hf: bool = False,
        dtype: str | None = None, seed: int = 0) -> dict:
    """Measure and return a result dict (see `format_text` for the fields)."""
    from neox_fork import parallel
    from neox_fork.model import ModelShape, count_parameters

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bf16" if device.type == "cuda" else config.dtype_name)
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype}: use one of {', '.join(_DTYPES)}")
    torch_dtype = _DTYPES[dtype]
    parallel.initialize(1)
    vocab = tokenizer_vocab_size(config)
    shape = ModelShape.from_config(config, vocab)
    b, s = config.train_micro_batch_size_per_gpu, config.seq_length
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (b, s + 1), generator=generator)
    batch = (data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device))

    builders = [("ours", build_ours)] + ([("hf", build_hf)] if compare_hf else [])
    runs, results = [], {}
    for name, build in builders:
        torch.manual_seed(seed)
        mark = _memory_mark(device)
        model, step = build(config, vocab, torch_dtype, device)
        m = Measurement(name)
        for _ in range(warmup):
            m.loss = _timed(step, batch, device)[1]
        m.peak_memory_bytes = _memory_peak_since(device, mark)
        runs.append((m, step, model))
    for _ in range(steps):  # interleaved: ours, theirs, ours, theirs, ...
        for m, step, _ in runs:
            seconds, m.loss = _timed(step, batch, device)
            m.step_seconds.append(seconds)

    params = count_parameters(shape)
    model_fpt = flops.model_flops_per_token(params, shape.num_layers, shape.hidden_size, s)
    hardware_fpt = flops.hardware_flops_per_token(params, shape.num_layers, shape.hidden_size, s,
                                                  recompute=config.checkpoint_activations)
    peak = flops.device_peak_flops(device) if device.type == "cuda" else None
    for m, _, _ in runs:
        tps = b * s / m.median()
        results[m.name] = {
            "tokens_per_sec": tps,
            "step_seconds_median": m.median(),
            "step_seconds": m.step_seconds,
            "mfu": flops.mfu(tps, model_fpt, 1, peak),
            "hfu": flops.mfu(tps, hardware_fpt, 1, peak),
            "peak_memory_bytes": m.peak_memory_bytes,
            "loss": m.loss,
        }
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine during the run
        "torch": torch.__version__,
        "dtype": dtype,
        "micro_batch": b,
        "seq_length": s,
        "vocab_size": shape.vocab_size,
        "parameters": params,
        "checkpoint_activations": config.checkpoint_activations,
        "torch_compile": config.torch_compile,
        "attention": sorted(set(shape.attention_types)),
        "steps": steps,
        "warmup": warmup,
        "model_flops_per_token": model_fpt,
        "hardware_flops_per_token": hardware_fpt,
        "peak_flops": peak,
        "memory_kind": "cuda_max_allocated_growth" if device.type == "cuda" else "rss_peak_growth",
        "ours": results["ours"],
    }
    if compare_hf:
        import transformers

        out["hf"] = results["hf"]
        out["transformers"] = transformers.__version__
        out["ratio_vs_hf"] = results["ours"]["tokens_per_sec"] / results["hf"]["tokens_per_sec"]
    del runs
    gc.collect()
    return out


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
        f"device: {r['device']}, {r['threads']} threads, load {r['load_average_1min']:.1f}, torch {r['torch']}, "
        f"{r['dtype']}",
        f"shape: {r['parameters']:,} parameters, micro-batch {r['micro_batch']} x seq {r['seq_length']}, "
        f"vocab {r['vocab_size']}, checkpoint_activations {r['checkpoint_activations']}, "
        f"torch_compile {r['torch_compile']}",
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


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", nargs="+", required=True, help="NeoX YAML files (later files win)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--compare", choices=["hf"], help="also time transformers' StableLmForCausalLM")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--micro-batch", type=int, help="override train_micro_batch_size_per_gpu")
    p.add_argument("--seq-length", type=int, help="override seq-length (and max positions if smaller)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="default: bf16 on CUDA, the config's on CPU")
    p.add_argument("--vocab-size", type=int, help="override the vocabulary (else config, tokenizer, 50277)")
    p.add_argument("--checkpoint-activations", choices=["true", "false"], help="override the config")
    p.add_argument("--torch-compile", choices=["true", "false"], help="override the config")
    args = p.parse_args(argv)

    overrides: dict = {}
    if args.micro_batch:
        overrides["train_micro_batch_size_per_gpu"] = args.micro_batch
    if args.seq_length:
        overrides["seq_length"] = args.seq_length
        overrides["max_position_embeddings"] = args.seq_length
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    if args.checkpoint_activations:
        overrides["checkpoint_activations"] = args.checkpoint_activations == "true"
    if args.torch_compile:
        overrides["torch_compile"] = args.torch_compile == "true"
    config = load_config(*args.config, overrides=overrides)
    result = run(config, steps=args.steps, warmup=args.warmup, compare_hf=args.compare == "hf", dtype=args.dtype)
    if args.json:
        print(json.dumps(result))
        if "ratio_vs_hf" in result:  # the documented last line, also in JSON mode
            print(f"ratio_vs_hf: {result['ratio_vs_hf']:.3f}")
    else:
        print(format_text(result))
    sys.stdout.flush()
    return 0
