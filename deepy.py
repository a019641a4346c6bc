#!/usr/bin/env python
"""Launch training on every rank, as GPT-NeoX's deepy.py does:

    python deepy.py train.py configs/tiny.yml [MORE.yml ...] [-H HOSTFILE] [--dry-run]
    python deepy.py generate.py -d configs 125M.yml local_setup.yml text_generation.yml [-i IN] [-o OUT]
    python deepy.py eval.py -d configs 125M.yml local_setup.yml --eval_tasks lambada piqa [--iteration N]

The config files are merged and validated here, the world size is worked out from the hostfile,
include/exclude, num_nodes/num_gpus or the Slurm allocation and checked against the config, and then
USER_SCRIPT starts with the same config files on every rank: on one node deepy starts and supervises the
ranks itself (neox_fork/launch/supervisor.py), with a hostfile DeepSpeed's runner does, and with
`deepspeed_slurm: true` srun does. `--dry-run` prints the command and each rank's RANK/LOCAL_RANK/
WORLD_SIZE/MASTER_ADDR/MASTER_PORT instead of launching.

On one node, SIGUSR1/SIGTERM/SIGINT reach every rank, which saves at its next step and stops. Exit status:
0 when training finished or every rank saved and stopped on a signal; else the first failing rank's status
(128 + N for a rank ended by signal N; 137 for ranks killed after `signal_grace_seconds`).
"""

import argparse
import json
import os

from neox_fork.config.ds_config import deepspeed_config
from neox_fork.config.loading import load_config
from neox_fork.errors import exit_on_user_error
from neox_fork.launch.launcher import launch, plan_launch


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("user_script", help="the per-rank entry, normally train.py")
    p.add_argument("configs", nargs="+", help="NeoX YAML files, merged in order (later files win)")
    p.add_argument("-d", "--conf_dir", default=None, help="folder the config file names are relative to")
    p.add_argument("-H", "--hostfile", default=None, help="MPI-style hostfile ('host slots=N'); overrides the key")
    p.add_argument("--dry-run", "--dry_run", action="store_true",
                   help="print the launch command and every rank's environment, start nothing")
    # upstream's overrides for generate.py / eval.py, passed on to every rank as the same flags
    p.add_argument("--eval_tasks", nargs="+", help="eval.py: tasks instead of the configs' eval_tasks")
    p.add_argument("--eval_results_prefix", help="eval.py: results file PREFIX_eval_results_DATE.json")
    p.add_argument("--include_path", "--include-path", action="append",
                   help="eval.py: a folder of task YAML files (repeatable; default: the repository's tasks/)")
    p.add_argument("--iteration", type=int, help="generate.py / eval.py: read global_stepN instead of 'latest'")
    p.add_argument("-i", "--sample_input_file", help="generate.py: instead of the sample_input_file key")
    p.add_argument("-o", "--sample_output_file", help="generate.py: instead of the sample_output_file key")
    args = p.parse_args(argv)
    paths = [os.path.join(args.conf_dir, c) if args.conf_dir else c for c in args.configs]
    config = load_config(*paths)
    passed = []
    for key in ("eval_tasks", "eval_results_prefix", "iteration", "sample_input_file", "sample_output_file"):
        value = getattr(args, key)
        if value is not None:
            passed += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    for folder in args.include_path or []:  # eval.py's flag repeats, one folder each
        passed += ["--include-path", folder]
    plan = plan_launch(config, args.user_script, paths + passed, hostfile=args.hostfile)
    ds = deepspeed_config(config, plan.world_size)
    if args.dry_run:
        print(plan.describe())
        print("deepspeed config: " + json.dumps(ds, sort_keys=True))
        return 0
    print(f"deepy: world size {plan.world_size}; running: {' '.join(plan.command)}", flush=True)
    return launch(plan)


if __name__ == "__main__":
    raise SystemExit(main())
