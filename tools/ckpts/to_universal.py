#!/usr/bin/env python
"""Convert a training checkpoint for DeepSpeed's Universal Checkpointing, to continue it at another layout.

    python tools/ckpts/to_universal.py --input-dir checkpoints/run        # -> checkpoints/run/global_stepN_universal
    # then resume with `load_universal: true` and any model_parallel_size, GPU count and ZeRO stage (1 or 2)

Runs DeepSpeed's converter (deepspeed.checkpoint.ds_to_universal) on the step folder unchanged, after
checking every file it will read with the project's safe reader; see neox_fork/checkpoint/universal.py.
"""

import argparse

from neox_fork.errors import exit_on_user_error
from neox_fork.checkpoint.safe_unpickle import add_trust_argument
from neox_fork.checkpoint.universal import convert


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-dir", required=True, help="checkpoint folder (with 'latest') or a global_stepN folder")
    p.add_argument("--step", type=int, default=None, help="global step to convert (default: latest)")
    p.add_argument("--workers", type=int, default=4, help="processes extracting ZeRO shards (half as many merge)")
    add_trust_argument(p)
    args = p.parse_args(argv)
    print(f"wrote {convert(args.input_dir, args.step, args.workers, args.trust_checkpoint)}")


if __name__ == "__main__":
    main()
