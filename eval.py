#!/usr/bin/env python
"""Evaluate a neox_fork checkpoint with lm-evaluation-harness, offline.

    python eval.py --checkpoint CKPT --tasks neox_facts,neox_prose --limit 20
    python eval.py configs/tiny.yml --checkpoint CKPT          # tasks from the config's eval_tasks
    python eval.py --checkpoint CKPT --tasks my_task --include-path my_tasks/ --num-fewshot 3
    python deepy.py eval.py -d configs 125M.yml local_setup.yml --eval_tasks neox_facts neox_prose   # upstream's

Model settings come from the checkpoint's config.yml; CONFIG files (as for train.py) may set
eval_tasks, eval_batch_size and load (the checkpoint when --checkpoint is omitted). Tasks are YAML +
jsonl folders (default: the shipped tasks/ folder) with `dataset_path: json` and data_files relative to
the YAML. Results: JSON in CKPT/eval/results_stepN.json (or --output; with eval_results_prefix set, upstream's
PREFIX_eval_results_DATE.json in the working directory) and a markdown table on stdout. Launched on several
ranks (deepy), each tensor-parallel group of model_parallel_size holds one copy of the model; rank 0 writes.
"""

import argparse
import os
from datetime import datetime

from neox_fork.config.loading import load_config
from neox_fork.errors import UserError, exit_on_user_error
from neox_fork.launch.launcher import hub_offline
from neox_fork.checkpoint.safe_unpickle import add_trust_argument


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", help="NeoX YAML configs (optional; later files win)")
    p.add_argument("--checkpoint", help="checkpoint folder (with 'latest') or a global_stepN folder; default: load")
    p.add_argument("--step", "--iteration", dest="step", type=int, help="evaluate global_stepN instead of 'latest'")
    add_trust_argument(p)
    p.add_argument("--tasks", "--eval_tasks", "--eval-tasks", dest="tasks", nargs="+",
                   help="task names (space- or comma-separated); default: eval_tasks of the configs")
    p.add_argument("--eval_results_prefix", "--eval-results-prefix",
                   help="write PREFIX_eval_results_DATE.json (default: the configs' eval_results_prefix)")
    p.add_argument("--include-path", action="append",
                   help="folder of task YAML files (repeatable; default: the repository's tasks/)")
    p.add_argument("--include-defaults", action="store_true",
                   help="also index lm-eval's built-in tasks (their datasets must already be cached)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--limit", type=float, help="documents per task (a value below 1 is a fraction)")
    p.add_argument("--batch-size", type=int, help="default: eval_batch_size of the configs, else 8")
    p.add_argument("--max-length", type=int, help="context length; default: the model's max positions")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--output", help="results JSON path (default: CKPT/eval/results_stepN.json)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    hub_offline()  # before lm-eval is imported
    from neox_fork.inference.evaluation import evaluate_checkpoint, results_table

    config = load_config(*args.configs) if args.configs else None
    ckpt = args.checkpoint or (config.load if config else None)
    if not ckpt:
        raise UserError("no checkpoint: pass --checkpoint DIR or a config that sets load")
    tasks = [t.strip() for arg in args.tasks for t in arg.split(",") if t.strip()] if args.tasks else \
        list(config.eval_tasks if config else [])
    batch_size = args.batch_size or (config.eval_batch_size if config else None) or 8
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    prefix = args.eval_results_prefix if args.eval_results_prefix is not None else \
        (config.eval_results_prefix if config else "")
    output = args.output or (f"{prefix}_eval_results_{datetime.now():%m-%d-%Y-%H-%M-%S}.json" if prefix else None)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    results, path = evaluate_checkpoint(ckpt, tasks, step=args.step, include_path=args.include_path,
                                        num_fewshot=args.num_fewshot, limit=limit, batch_size=batch_size,
                                        max_length=args.max_length, output=output, dtype=args.dtype,
                                        include_defaults=args.include_defaults,
                                        trust=args.trust_checkpoint or bool(config and config.trust_checkpoint),
                                        tp=(config.model_parallel_size if config else None) if launched else None)
    if path is not None:
        print(results_table(results))
        print(f"\nresults written to {path}")


if __name__ == "__main__":
    main()
