"""Tokenize documents into Megatron's mmap format: `PREFIX_{key}_document.bin/.idx`.

Reading, worker processes (identical output for any --workers) and all-or-nothing writing are
`neox_fork.data.pipeline`'s; this module supplies the text encoder.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy

from neox_fork.data import _megatron
from neox_fork.data.pipeline import EncodedChunk, PreprocessResult, check_dataset_impl, check_run_options, flatten, make_output_folder, run
from neox_fork.data.readers import BadRecord, Record, expand_inputs, parse_record
from neox_fork.data.tokenizer import build_tokenizer
from neox_fork.errors import UserError

__all__ = ["PreprocessResult", "document_prefix", "preprocess", "token_dtype"]


def token_dtype(vocab_size: int) -> type[numpy.number]:
    """The .bin element type Megatron picks for a vocabulary: uint16 below 65500 ids, else int32."""
    return _megatron.indexed_dataset().DType.optimal_dtype(vocab_size)


def document_prefix(prefix: str, key: str) -> str:
    """The path prefix (no .bin/.idx) of the dataset written for one JSON key, as in GPT-NeoX."""
    return f"{prefix}_{key}_document"


class _ChunkEncoder:
    def __init__(self, tokenizer_type: str, vocab_file: str | None, merge_file: str | None, keys: Sequence[str],
                 append_eod: bool, fix_text: bool = False):
        self.tokenizer = build_tokenizer(tokenizer_type, vocab_file, merge_file)
        self.keys = list(keys)
        self.append_eod = append_eod
        self.fix_text = _ftfy() if fix_text else None
        self.dtype = token_dtype(self.tokenizer.vocab_size)

    def __call__(self, chunk: Sequence[Record]) -> EncodedChunk:
        texts_per_key: list[list[str]] = [[] for _ in self.keys]
        bad = []
        for record in chunk:
            try:
                values = parse_record(record, self.keys)
            except BadRecord as err:
                bad.append((record.source, record.line, str(err)))
                continue
            for texts, value in zip(texts_per_key, values):
                texts.append(self.fix_text(value) if self.fix_text else value)
        tokens, lengths, empty = [], [], 0
        for texts in texts_per_key:
            ids = [doc for doc in self.tokenizer.encode_batch(texts) if doc]
            empty += len(texts) - len(ids)
            if self.append_eod:
                for doc in ids:
                    doc.append(self.tokenizer.eod)
            flat, doc_lengths = flatten(ids, self.dtype)
            tokens.append(flat)
            lengths.append(doc_lengths)
        return EncodedChunk(
            arrays=tokens,
            lengths=lengths,
            bad=bad,
            empty=empty,
            records=len(chunk),
            input_bytes=sum(len(record.raw) for record in chunk),
        )


def _ftfy():
    """ftfy.fix_text (upstream's --ftfy), or one line saying the package is missing."""
    try:
        import ftfy
    except ImportError:
        raise UserError("--ftfy needs the ftfy package, which is not installed (pip install ftfy)") from None
    return ftfy.fix_text


def split_input_list(inputs: Sequence[str]) -> list[str]:
    """Upstream's --input is one comma-separated list; ours takes several arguments. A comma splits an argument
    unless the whole argument is an existing file."""
    return [part for item in inputs for part in ([item] if os.path.exists(item) else str(item).split(",")) if part]


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    vocab_file: str | None,
    *,
    tokenizer_type: str = "HFTokenizer",
    merge_file: str | None = None,
    jsonl_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    ftfy: bool = False,
    workers: int = 1,
    max_bad_fraction: float = 0.01,
    progress: bool = False,
    num_docs: int | None = None,
    log_interval: int = 1,
    dataset_impl: str = "mmap",
    chunk_bytes: int = 1 << 20,
    chunk_records: int = 4096,
) -> PreprocessResult:
    """Tokenize `inputs` (paths, globs, or upstream's comma-separated lists) into `PREFIX_{key}_document.bin/.idx`,
    one pair per key. `ftfy` fixes each text with ftfy first (as upstream); `num_docs` is the progress bar's total
    and `log_interval` the documents between its updates."""
    check_dataset_impl(dataset_impl)
    if ftfy:
        _ftfy()
    check_run_options(workers, max_bad_fraction)
    keys = list(jsonl_keys)
    if not keys or len(set(keys)) != len(keys):
        raise UserError(f"--jsonl-keys {' '.join(keys)}: give one or more distinct keys")
    files = expand_inputs(split_input_list(inputs))
    if len(keys) > 1 and any(path.endswith(".txt") for path in files):
        raise UserError(f"--jsonl-keys {' '.join(keys)}: .txt inputs hold one text each, so give a single key")
    tokenizer = build_tokenizer(tokenizer_type, vocab_file, merge_file)
    make_output_folder(output_prefix)
    return run(
        files,
        [document_prefix(output_prefix, key) for key in keys],
        [token_dtype(tokenizer.vocab_size)] * len(keys),
        _ChunkEncoder,
        (tokenizer_type, vocab_file, merge_file, keys, append_eod, ftfy),
        token_outputs=range(len(keys)),
        workers=workers,
        max_bad_fraction=max_bad_fraction,
        progress=progress,
        progress_total=num_docs,
        progress_every=max(1, log_interval),
        chunk_bytes=chunk_bytes,
        chunk_records=chunk_records,
    )
