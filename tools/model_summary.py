#!/usr/bin/env python
"""Parameters, FLOPs per token and per-GPU training memory of a config, built on the meta device.

    python tools/model_summary.py configs/stablelm-3b-4e1t.yml [--world-size 256] [--gpu A100 --gpu-memory-gb 40]
"""

import argparse

from neox_fork.errors import exit_on_user_error
from neox_fork.perf.summary import print_summary


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="NeoX YAML files, merged in order")
    p.add_argument("--world-size", type=int, default=None,
                   help="number of GPUs (default: num_gpus x num_nodes from the config, else the smallest world "
                        "its parallelism needs: model_parallel_size x pipe_parallel_size x 1 data-parallel rank)")
    p.add_argument("--gpu", default="A100", help="card for the time estimate (see neox_fork/perf/flops.py)")
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="memory per card, to say whether it fits")
    p.add_argument("--mfu", type=float, default=0.40, help="assumed MFU for the time estimate")
    args = p.parse_args(argv)
    print_summary(args.configs, args.world_size, args.gpu, args.gpu_memory_gb, args.mfu)


if __name__ == "__main__":
    main()
