#!/usr/bin/env python
"""Reference log-probabilities ahead of DPO/KTO (upstream's precompute, `precompute_model_name`): for each
token dataset PREFIX, writes PREFIX_NAME (float32, per document, position j = the reference's log p of token
j + 1). Train with `precompute_model_name: NAME` and no reference model is built. Logic in
neox_fork/training/preference.py (precompute_reference).

    python tools/datasets/precompute_reference.py --load checkpoints/tiny_sft --model-name sft \\
        --seq-length 96 data/demo/pairs_chosen_document data/demo/pairs_rejected_document
"""

import argparse

from neox_fork.errors import exit_on_user_error


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefixes", nargs="+", help="token datasets (prefixes without .bin/.idx)")
    parser.add_argument("--load", required=True, help="the reference checkpoint (the policy's starting weights)")
    parser.add_argument("--model-name", required=True, help="NAME: the output is PREFIX_NAME, as upstream")
    parser.add_argument("--seq-length", type=int, required=True, help="the training run's seq_length")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--trust-checkpoint", action="store_true", help="unpickle the checkpoint unrestricted")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    from neox_fork.training.preference import precompute_reference

    args = parse(argv)
    for path in precompute_reference(args.load, args.prefixes, args.model_name, args.seq_length,
                                     args.trust_checkpoint, args.batch_size):
        print(path)


if __name__ == "__main__":
    main()
