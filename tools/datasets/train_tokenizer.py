#!/usr/bin/env python
"""Train a byte-level BPE tokenizer (GPT-NeoX style, <|endoftext|> = id 0) and write DIR/tokenizer.json.

Example:
    python tools/datasets/train_tokenizer.py --input 'corpus/*.jsonl' --output-dir data/tok --vocab-size 8192
Inputs are read like tools/datasets/preprocess_data.py reads them (.jsonl[.gz|.zst] under --jsonl-key, or
whole .txt files); malformed records are skipped and counted.
"""

import argparse
import sys


from neox_fork.data.tokenizer import train_tokenizer_from_files
from neox_fork.errors import exit_on_user_error


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="files or globs (.jsonl, .jsonl.gz, .jsonl.zst, .txt)")
    parser.add_argument("--output-dir", required=True, help="writes DIR/tokenizer.json")
    parser.add_argument("--vocab-size", type=int, required=True, help="total ids, <|endoftext|> included")
    parser.add_argument("--jsonl-key", default="text", help="JSON key holding the text")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    tokenizer, skipped = train_tokenizer_from_files(args.input, args.output_dir, args.vocab_size, args.jsonl_key)
    if skipped:
        print(f"warning: skipped {skipped} malformed records", file=sys.stderr)
    print(f"wrote {tokenizer.vocab_file}: vocab_size {tokenizer.vocab_size}, eod id {tokenizer.eod}")


if __name__ == "__main__":
    main()
