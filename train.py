#!/usr/bin/env python
"""Per-rank training entry: `python train.py CONFIG.yml [MORE.yml ...]`.

Started on every rank by deepy.py (through DeepSpeed's launcher), by torchrun, or by `srun` with
`deepspeed_slurm: true`. Rank and world come from the environment. Whatever fails, the rank prints its error
and exits at once (neox_fork.errors.exit_on_rank_failure): status 2 for a one-line error, 1 for a traceback.
"""

import argparse

from neox_fork.config.loading import load_config
from neox_fork.errors import exit_on_rank_failure
from neox_fork.launch.launcher import hub_offline
from neox_fork.training.loop import pretrain


@exit_on_rank_failure
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("configs", nargs="+", help="NeoX YAML files, merged in order")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by DeepSpeed's launcher")
    args = parser.parse_args(argv)
    hub_offline()  # eval_tasks run lm-eval, which must not download
    pretrain(load_config(*args.configs))


if __name__ == "__main__":
    main()
