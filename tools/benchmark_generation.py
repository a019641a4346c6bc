#!/usr/bin/env python
"""Generation speed: KV cache vs recomputing every position, tokens/s on this machine.

    python tools/benchmark_generation.py                       # configs/tiny.yml, random weights
    python tools/benchmark_generation.py --config configs/tiny.yml --new-tokens 128 --batch-sizes 1,8

Greedy decoding with EOD ignored, so every run produces exactly batch x new-tokens tokens. The
numbers are for the record (they depend on the machine and its load), not asserted anywhere.
"""

import argparse
import json
import time

import torch
import yaml

from neox_fork.parallel import groups as parallel
from neox_fork.config.loading import load_config
from neox_fork.config.dtypes import torch_dtype
from neox_fork.inference.generation import SamplingParams, generate
from neox_fork.model.transformer import build_model


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yml")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (YAML value), e.g. --set hidden_size=2048")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parallel.initialize(1)
    overrides = {"vocab_size": 50277, "seq_length": args.prompt_tokens + args.new_tokens,
                 "max_position_embeddings": args.prompt_tokens + args.new_tokens}
    overrides.update((k, yaml.safe_load(v)) for k, v in (item.split("=", 1) for item in args.set))
    config = load_config(args.config, overrides=overrides)
    torch.manual_seed(0)
    model = build_model(config).to(args.device, torch_dtype(args.dtype)).eval()
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, stop_on_eod=False)
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompts = torch.randint(0, 50000, (batch, args.prompt_tokens)).tolist()
        for use_cache in (True, False):
            generate(model, prompts, params, use_cache=use_cache, batch_size=batch)  # warm-up: every shape once
            sync()
            started = time.perf_counter()
            generate(model, prompts, params, use_cache=use_cache, batch_size=batch)
            sync()
            seconds = time.perf_counter() - started
            rows.append({"batch": batch, "kv_cache": use_cache, "new_tokens": batch * args.new_tokens,
                         "seconds": round(seconds, 3), "tokens_per_sec": round(batch * args.new_tokens / seconds, 1)})
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{args.config} {args.set or ''} on {args.device} {args.dtype}: prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads")
    print("| batch | KV cache | tokens | seconds | tokens/s |\n|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {'yes' if r['kv_cache'] else 'no (recompute)'} | {r['new_tokens']} | "
              f"{r['seconds']} | {r['tokens_per_sec']} |")


if __name__ == "__main__":
    main()
