#!/usr/bin/env python
"""Tokenize jsonl / jsonl.gz / jsonl.zst / txt files into Megatron .bin/.idx files (GPT-NeoX layout).

Example:
    python tools/preprocess_data.py --input 'corpus/*.jsonl.zst' --output-prefix data/mydata \
        --vocab-file tokenizer.json --append-eod --workers 8
writes data/mydata_text_document.bin/.idx; train with `data_path: data/mydata_text_document`.
Each .txt file is one document.
"""

import argparse
import os


from neox_fork.data.pipeline import print_report
from neox_fork.data.preprocess import preprocess
from neox_fork.errors import exit_on_user_error


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="files or globs (.jsonl, .jsonl.gz, .jsonl.zst, .txt)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    parser.add_argument("--vocab-file", required=True, help="tokenizer.json")
    parser.add_argument("--tokenizer-type", default="HFTokenizer")
    parser.add_argument("--jsonl-keys", nargs="+", default=["text"], help="JSON keys to tokenize, one output each")
    parser.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes")
    parser.add_argument(
        "--max-bad-fraction", type=float, default=0.01,
        help="fail (writing nothing) if more than this fraction of records is malformed",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    result = preprocess(
        args.input,
        args.output_prefix,
        args.vocab_file,
        tokenizer_type=args.tokenizer_type,
        jsonl_keys=args.jsonl_keys,
        append_eod=args.append_eod,
        workers=args.workers,
        max_bad_fraction=args.max_bad_fraction,
        progress=not args.no_progress,
    )
    print_report(result)


if __name__ == "__main__":
    main()
