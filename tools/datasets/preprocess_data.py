#!/usr/bin/env python
"""Tokenize jsonl / jsonl.gz / jsonl.zst / txt files into Megatron .bin/.idx files (GPT-NeoX layout).

Example:
    python tools/datasets/preprocess_data.py --input 'corpus/*.jsonl.zst' --output-prefix data/mydata \
        --vocab-file tokenizer.json --append-eod --workers 8
    python tools/datasets/preprocess_data.py --input corpus.jsonl --tokenizer-type GPT2BPETokenizer \
        --vocab gpt2-vocab.json --merge-file gpt2-merges.txt --append-eod --output-prefix data/mydata
writes data/mydata_text_document.bin/.idx; train with `data_path: data/mydata_text_document`.
Each .txt file is one document. Upstream gpt-neox's flags work as there (--input may be its comma-separated list;
--dataset-impl is mmap only; --ftfy needs the ftfy package).
"""

import argparse
import os


from neox_fork.data.pipeline import print_report
from neox_fork.data.preprocess import preprocess
from neox_fork.errors import exit_on_user_error


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="files, globs or comma-separated lists (.jsonl, .jsonl.gz, .jsonl.zst, .txt)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    parser.add_argument("--vocab-file", "--vocab", dest="vocab_file", default=None,
                        help="the tokenizer's file (tokenizer.json, GPT-2 vocab.json, .model, .tiktoken)")
    parser.add_argument("--merge-file", default=None, help="GPT-2 merges.txt (GPT2BPETokenizer)")
    parser.add_argument("--tokenizer-type", default="HFTokenizer", help="as a config's tokenizer_type")
    parser.add_argument("--ftfy", action="store_true", help="fix each text with ftfy first")
    parser.add_argument("--num-docs", type=int, default=None, help="documents in the input, for the progress bar")
    parser.add_argument("--dataset-impl", default="mmap", help="only mmap")
    parser.add_argument("--log-interval", type=int, default=100, help="documents between progress bar updates")
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
        merge_file=args.merge_file,
        ftfy=args.ftfy,
        num_docs=args.num_docs,
        log_interval=args.log_interval,
        dataset_impl=args.dataset_impl,
        jsonl_keys=args.jsonl_keys,
        append_eod=args.append_eod,
        workers=args.workers,
        max_bad_fraction=args.max_bad_fraction,
        progress=not args.no_progress,
    )
    print_report(result)


if __name__ == "__main__":
    main()
