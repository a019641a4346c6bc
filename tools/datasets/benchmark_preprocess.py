#!/usr/bin/env python
"""Preprocessing throughput against the `tokenizers` library's own batch encoding of the same texts.

    python tools/datasets/benchmark_preprocess.py --input data/demo/train.jsonl --vocab-file data/demo/tokenizer.json

Baseline: all texts read into memory, then one `Tokenizer.encode_batch` call (Rust, all cores).
Ours: tools/datasets/preprocess_data.py's pipeline end to end (read, parse JSON, tokenize, write .bin/.idx),
timed from the first record, i.e. without interpreter and megatron-core import time.
Prints MB/s for both and the ratio ours / baseline.
"""

import argparse
import json
import os
import tempfile
import time


from neox_fork.data.preprocess import preprocess
from neox_fork.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a .jsonl file with a 'text' key")
    parser.add_argument("--vocab-file", required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    from tokenizers import Tokenizer

    with open(args.input, "rb") as stream:
        texts = [json.loads(line)["text"] for line in stream if line.strip()]
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    tokenizer = Tokenizer.from_file(args.vocab_file)
    started = time.perf_counter()
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    baseline_s = time.perf_counter() - started
    baseline_tokens = sum(len(e.ids) for e in encodings)
    del encodings

    with tempfile.TemporaryDirectory() as tmp:
        preprocess([args.input], os.path.join(tmp, "bench"), args.vocab_file, workers=1)  # warm imports and page cache
        result = preprocess([args.input], os.path.join(tmp, "bench"), args.vocab_file, workers=args.workers)
    assert result.tokens == baseline_tokens, (result.tokens, baseline_tokens)

    baseline_rate = text_bytes / baseline_s / 1e6
    ours_rate = text_bytes / result.seconds / 1e6
    print(f"texts: {len(texts)} documents, {text_bytes / 1e6:.1f} MB, {baseline_tokens} tokens; {os.cpu_count()} cores")
    print(f"tokenizers encode_batch (in memory): {baseline_s:.2f} s, {baseline_rate:.2f} MB/s")
    print(f"preprocess --workers {args.workers} (read+tokenize+write): {result.seconds:.2f} s, {ours_rate:.2f} MB/s")
    print(f"ratio ours/baseline: {ours_rate / baseline_rate:.2f}")


if __name__ == "__main__":
    main()
