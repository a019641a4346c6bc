#!/usr/bin/env python
"""Training-step throughput (tokens/s, MFU, HFU, peak memory) on random tokens.

    python tools/benchmark.py --config configs/tiny.yml --compare hf                   # model path, vs transformers
    python tools/benchmark.py --config configs/stablelm-3b-4e1t.yml --path engine      # the train.py step
    python tools/benchmark.py --config configs/stablelm-3b-4e1t.yml --compare hf --json
    torchrun --nproc_per_node 2 tools/benchmark.py --config configs/tiny.yml --activation-memory   # TP=2, SP vs not
    torchrun --nproc_per_node 2 tools/benchmark.py --config configs/tiny.yml --seq-length 8192 --activation-memory \
        --context-parallel                                     # CP=2 (without torchrun: CP=1), memory per rank
    torchrun --nproc_per_node 2 tools/benchmark.py --config configs/tiny.yml pp2.yml --path engine  # 2 stages

See neox_fork/perf/benchmark.py for what each path times and docs/performance.md for the measured numbers.
"""

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from neox_fork.perf.benchmark import DTYPES, PATHS, format_table, format_text, run
from neox_fork.config.loading import load_config
from neox_fork.data.tokenizer import tokenizer_file_vocab_size
from neox_fork.errors import UserError, exit_on_user_error


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", help="NeoX YAML files (later files win)")
    p.add_argument("--path", choices=PATHS, default="model",
                   help="engine: the train.py step (DeepSpeed); model: forward/backward/AdamW, like for like "
                        "with transformers (default)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--compare", choices=["hf"], help="also time transformers' StableLmForCausalLM (--path model)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="--path engine: also save a checkpoint every N steps (to a temporary folder; async_save as the "
                        "config says), timed as part of the step")
    p.add_argument("--micro-batch", type=int, help="override train_micro_batch_size_per_gpu")
    p.add_argument("--seq-length", type=int, help="override seq-length (and max positions)")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="model path: default bf16 on CUDA, the config's on CPU; engine path: sets the precision")
    p.add_argument("--vocab-size", type=int, help="override the vocabulary (else config, tokenizer, 50277)")
    p.add_argument("--checkpoint-activations", choices=["true", "false", "selective"],
                   help="override the config: full recompute, none, or selective (attention core only)")
    p.add_argument("--torch-compile", choices=["true", "false"], help="override the config")
    p.add_argument("--context-parallel", action="store_true",
                   help="with --activation-memory: context_parallel_size = number of ranks (TP 1) instead of TP")
    p.add_argument("--activation-memory", action="store_true",
                   help="instead: per-rank activation memory at TP = number of ranks (run under torchrun), with "
                        "and without sequence parallelism (neox_fork.perf.activation_memory)")
    p.add_argument("--table", nargs="+", metavar="JSON",
                   help="instead of measuring: one table from the --json outputs of earlier runs")
    args = p.parse_args(argv)
    if not args.config and not args.table:
        p.error("--config is required (or --table to tabulate earlier results)")
    return args


def overrides_from(args: argparse.Namespace) -> dict:
    """Config keys the flags set (the config files stay as they are)."""
    out: dict = {}
    if args.micro_batch:
        out["train_micro_batch_size_per_gpu"] = args.micro_batch
    if args.seq_length:
        out["seq_length"] = args.seq_length
        out["max_position_embeddings"] = args.seq_length
    if args.vocab_size:
        out["vocab_size"] = args.vocab_size
    if args.checkpoint_activations:
        out["checkpoint_activations"] = args.checkpoint_activations != "false"
        if args.checkpoint_activations != "false":
            out["recompute_granularity"] = "selective" if args.checkpoint_activations == "selective" else "full"
    if args.torch_compile:
        out["torch_compile"] = args.torch_compile == "true"
    if args.dtype and args.path == "engine":
        out["precision"] = args.dtype
        out["bf16"] = {"enabled": args.dtype == "bf16"}
    return out


def read_result(path: str) -> dict:
    """The JSON object a `--json` run printed (its first line; a ratio line may follow)."""
    try:
        return json.loads(Path(path).read_text().splitlines()[0])
    except (OSError, IndexError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not the output of tools/benchmark.py --json ({err})") from None


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool):
    """While enabled, file descriptor 1 points at stderr, so that what libraries print (DeepSpeed logs to
    stdout, its op builders print there) cannot end up in the JSON a `--json` run writes; the results are
    printed after the block, onto the real stdout."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def measure_activation_memory(args: argparse.Namespace) -> str | None:
    """--activation-memory: TP = WORLD_SIZE (1 without torchrun), fp32 on the CPU; rank 0's report."""
    import torch.distributed as dist

    from neox_fork.perf import activation_memory
    from neox_fork.parallel import groups as parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp, cp = (1, world) if args.context_parallel else (world, 1)
    config = load_config(*args.config, overrides={**overrides_from(args), "model_parallel_size": tp,
                                                  "context_parallel_size": cp, "num_gpus": world, "num_nodes": 1})
    parallel.initialize(tp, context_parallel_size=cp)
    vocab = config.unpadded_vocab_size(tokenizer_file_vocab_size(config.vocab_file))
    if args.context_parallel:
        results = activation_memory.run_context_parallel(config, vocab)
        report = activation_memory.report_context_parallel(config, results, args.json) if dist.get_rank() == 0 else None
    else:
        results = activation_memory.run(config, vocab)
        report = activation_memory.report(config, results, args.json) if dist.get_rank() == 0 else None
    parallel.destroy()
    return report


@exit_on_user_error
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        print(format_table([(Path(f).stem, read_result(f)) for f in args.table]))
        return 0
    if args.activation_memory:
        with stdout_to_stderr(args.json):
            report = measure_activation_memory(args)
        if report is not None:
            print(report, flush=True)
        return 0
    config = load_config(*args.config, overrides=overrides_from(args))
    with stdout_to_stderr(args.json):
        result = run(config, path=args.path, steps=args.steps, warmup=args.warmup, compare_hf=args.compare == "hf",
                     dtype=args.dtype, save_every=args.save_every)
    if os.environ.get("RANK", "0") != "0":  # a pipelined engine run: every stage measured, rank 0 reports
        return 0
    if args.json:
        print(json.dumps(result))
        if "ratio_vs_hf" in result:  # the documented last line, also in JSON mode
            print(f"ratio_vs_hf: {result['ratio_vs_hf']:.3f}")
    else:
        print(format_text(result))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
