#!/usr/bin/env python
"""Import a Hugging Face GPTNeoX (Pythia), Llama or StableLm folder (e.g. stabilityai/stablelm-3b-4e1t) as a
neox_fork checkpoint.

Train from it with `load: CKPT_DIR` and `finetune: true` in your config.
"""

import argparse

from neox_fork.errors import exit_on_user_error
from neox_fork.hf import import_folder


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hf-dir", required=True, help="folder with config.json and *.safetensors")
    parser.add_argument("--output-dir", required=True, help="checkpoint folder to write")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to split the weights for")
    args = parser.parse_args(argv)
    out = import_folder(args.hf_dir, args.output_dir, args.tp)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
