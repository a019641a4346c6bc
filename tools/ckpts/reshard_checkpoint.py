#!/usr/bin/env python
"""Split a checkpoint's weights for another tensor-parallel size (e.g. TP=4 training -> TP=1 serving).

Writes model states and a matching config.yml; train from it with `load: OUT` and `finetune: true`.
To continue a run's full training state (optimizer, schedule, data position) at another TP size, GPU count
or ZeRO stage, convert it with tools/ckpts/to_universal.py and resume with `load_universal: true` instead.
"""

import argparse

from neox_fork.checkpoint.store import reshard
from neox_fork.errors import exit_on_user_error
from neox_fork.checkpoint.safe_unpickle import add_trust_argument


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-dir", required=True, help="checkpoint folder (with 'latest') or a global_stepN folder")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--tp", type=int, required=True, help="the new tensor-parallel size")
    p.add_argument("--step", type=int, default=None, help="global step to take (default: latest)")
    add_trust_argument(p)
    args = p.parse_args(argv)
    print(f"wrote {reshard(args.input_dir, args.output_dir, args.tp, args.step, args.trust_checkpoint)}")


if __name__ == "__main__":
    main()
