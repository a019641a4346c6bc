#!/usr/bin/env python
"""Build the offline demo corpus (Python stdlib code, docstrings, installed packages' docs).

Writes OUTPUT_DIR/tokenizer.json and OUTPUT_DIR/{train,valid}_text_document.bin/.idx; skipped when
already built unless --force. Train with
    train-data-paths: [data/demo/train_text_document]
    valid-data-paths: [data/demo/valid_text_document]
    vocab-file: data/demo/tokenizer.json
"""

import argparse
import json
import sys
import time


from neox_fork.data.demo import build_demo_data, is_built
from neox_fork.errors import exit_on_user_error


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="data/demo")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--max-bytes", type=int, default=None, help="cap the corpus (e.g. for a quick test)")
    parser.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: all cores)")
    parser.add_argument("--force", action="store_true", help="rebuild even if already built")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if is_built(args.output_dir) and not args.force:
        print(f"{args.output_dir} already built (use --force to rebuild)")
        return
    started = time.perf_counter()
    manifest = build_demo_data(
        args.output_dir,
        vocab_size=args.vocab_size,
        max_bytes=args.max_bytes,
        workers=args.workers,
        force=args.force,
        progress=sys.stderr.isatty(),
    )
    print(json.dumps(manifest, indent=2))
    print(f"built {args.output_dir} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
