#!/usr/bin/env python
"""Export a neox_fork checkpoint (any tensor-parallel size) as a Hugging Face folder: GPTNeoXForCausalLM,
LlamaForCausalLM or StableLmForCausalLM, whichever computes the checkpoint's architecture."""

import argparse

from neox_fork.errors import exit_on_user_error
from neox_fork.hf import export_folder
from neox_fork.safe_unpickle import add_trust_argument


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input-dir", required=True, help="checkpoint folder (with 'latest') or a global_stepN folder")
    parser.add_argument("--output-dir", required=True, help="Hugging Face folder to write")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="weight dtype (default: as stored in the checkpoint)")
    parser.add_argument("--step", type=int, default=None, help="global step to export (default: latest)")
    add_trust_argument(parser)
    args = parser.parse_args(argv)
    out = export_folder(args.input_dir, args.output_dir, args.dtype, args.step,
                        trust=args.trust_checkpoint)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
