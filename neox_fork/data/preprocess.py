"""Tokenize documents into Megatron's mmap format: `PREFIX_{key}_document.bin/.idx`.

The main process reads records in order and hands chunks to worker processes, which parse and
tokenize them; results are written in submission order, so any worker count gives byte-identical
files. Outputs are written to temporary files beside the final ones and renamed only after
everything succeeded: an exception, Ctrl-C or SIGTERM leaves neither outputs nor temporary files.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy

from neox_fork.checkpoint import commit_temp, temp_path_for
from neox_fork.data import _megatron
from neox_fork.data.readers import BadRecord, Record, expand_inputs, iter_records, parse_record
from neox_fork.data.tokenizer import build_tokenizer
from neox_fork.errors import UserError, full_disk_is_one_line

MAX_BAD_EXAMPLES = 5


def token_dtype(vocab_size: int) -> type[numpy.number]:
    """The .bin element type Megatron picks for a vocabulary: uint16 below 65500 ids, else int32."""
    return _megatron.indexed_dataset().DType.optimal_dtype(vocab_size)


def document_prefix(prefix: str, key: str) -> str:
    """The path prefix (no .bin/.idx) of the dataset written for one JSON key, as in GPT-NeoX."""
    return f"{prefix}_{key}_document"


@dataclass
class PreprocessResult:
    """What a preprocessing run read and wrote."""

    outputs: list[str]  # final path prefixes, one per key
    records: int = 0  # non-blank input records (lines or .txt files), good and bad
    documents: int = 0  # documents written (of the first key)
    tokens: int = 0  # tokens written (all keys)
    empty: int = 0  # records whose text was empty, skipped
    input_bytes: int = 0
    seconds: float = 0.0
    bad: int = 0
    bad_examples: list[str] = field(default_factory=list)


@dataclass
class _EncodedChunk:
    """One worker's answer: per key, the concatenated ids and each document's length."""

    tokens: list[numpy.ndarray]
    lengths: list[numpy.ndarray]
    bad: list[tuple[int, int, str]]  # (source index, line, reason)
    empty: int
    records: int
    input_bytes: int


class _ChunkEncoder:
    def __init__(self, tokenizer_type: str, vocab_file: str, keys: Sequence[str], append_eod: bool):
        self.tokenizer = build_tokenizer(tokenizer_type, vocab_file)
        self.keys = list(keys)
        self.append_eod = append_eod
        self.dtype = token_dtype(self.tokenizer.vocab_size)

    def __call__(self, chunk: Sequence[Record]) -> _EncodedChunk:
        texts_per_key: list[list[str]] = [[] for _ in self.keys]
        bad = []
        for record in chunk:
            try:
                values = parse_record(record, self.keys)
            except BadRecord as err:
                bad.append((record.source, record.line, str(err)))
                continue
            for texts, value in zip(texts_per_key, values):
                texts.append(value)
        tokens, lengths, empty = [], [], 0
        for texts in texts_per_key:
            ids = [doc for doc in self.tokenizer.encode_batch(texts) if doc]
            empty += len(texts) - len(ids)
            if self.append_eod:
                for doc in ids:
                    doc.append(self.tokenizer.eod)
            doc_lengths = numpy.fromiter((len(doc) for doc in ids), dtype=numpy.int64, count=len(ids))
            flat = numpy.fromiter(
                itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(doc_lengths.sum())
            )
            tokens.append(flat)
            lengths.append(doc_lengths)
        return _EncodedChunk(
            tokens=tokens,
            lengths=lengths,
            bad=bad,
            empty=empty,
            records=len(chunk),
            input_bytes=sum(len(record.raw) for record in chunk),
        )


_worker_encoder: _ChunkEncoder | None = None


def _init_worker(tokenizer_type: str, vocab_file: str, keys: Sequence[str], append_eod: bool) -> None:
    # Ctrl-C reaches the whole process group: let the parent alone decide, and let SIGTERM from
    # Pool.terminate() kill the worker instead of running the parent's handler inherited by fork.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker_encoder
    _worker_encoder = _ChunkEncoder(tokenizer_type, vocab_file, keys, append_eod)


def _encode_chunk(chunk: Sequence[Record]) -> _EncodedChunk:
    assert _worker_encoder is not None, "worker not initialised"
    return _worker_encoder(chunk)


def _chunks(records: Iterator[Record], chunk_bytes: int, chunk_records: int) -> Iterator[list[Record]]:
    chunk, size = [], 0
    for record in records:
        chunk.append(record)
        size += len(record.raw)
        if size >= chunk_bytes or len(chunk) >= chunk_records:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _Outputs:
    """One IndexedDatasetBuilder per key, writing temp files that `commit` renames into place."""

    def __init__(self, prefix: str, keys: Sequence[str], dtype: type[numpy.number]):
        IndexedDatasetBuilder = _megatron.indexed_dataset().IndexedDatasetBuilder
        self.prefixes = [document_prefix(prefix, key) for key in keys]
        self.temp_paths = [(str(temp_path_for(p + ".bin")), str(temp_path_for(p + ".idx"))) for p in self.prefixes]
        self.builders = []
        for bin_tmp, _ in self.temp_paths:
            self.builders.append(IndexedDatasetBuilder(bin_tmp, dtype=dtype))

    def add(self, key_index: int, tokens: numpy.ndarray, lengths: numpy.ndarray) -> None:
        builder = self.builders[key_index]
        offsets = numpy.concatenate(([0], numpy.cumsum(lengths)))
        for start, end in zip(offsets[:-1], offsets[1:]):
            builder.add_document(tokens[start:end], [int(end - start)])

    def commit(self) -> None:
        for builder, (_, idx_tmp) in zip(self.builders, self.temp_paths):
            builder.finalize(idx_tmp)
        done = []
        try:
            for prefix, (bin_tmp, idx_tmp) in zip(self.prefixes, self.temp_paths):
                commit_temp(bin_tmp, prefix + ".bin")
                done.append(prefix + ".bin")
                commit_temp(idx_tmp, prefix + ".idx")
                done.append(prefix + ".idx")
        except BaseException:
            for path in done:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise

    def discard(self) -> None:
        for builder in self.builders:
            with contextlib.suppress(Exception):
                builder.data_file.close()
        for paths in self.temp_paths:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


@contextlib.contextmanager
def _sigterm_raises_systemexit():
    """Turn SIGTERM into SystemExit(143) so that `finally` blocks clean up (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _encoded_chunks(
    chunks: Iterator[list[Record]], workers: int, init_args: tuple, pool_holder: list
) -> Iterator[_EncodedChunk]:
    """Encode chunks in order; with workers > 1 keep a bounded number in flight (imap would read
    the whole input ahead into memory)."""
    if workers <= 1:
        encoder = _ChunkEncoder(*init_args)
        for chunk in chunks:
            yield encoder(chunk)
        return
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker, initargs=init_args)
    pool_holder.append(pool)
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_encode_chunk, (chunk,)))
        if len(pending) >= 4 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()
    pool.close()
    pool.join()


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    vocab_file: str,
    *,
    tokenizer_type: str = "HFTokenizer",
    jsonl_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    max_bad_fraction: float = 0.01,
    progress: bool = False,
    chunk_bytes: int = 1 << 20,
    chunk_records: int = 4096,
) -> PreprocessResult:
    """Tokenize `inputs` (paths or globs) into `PREFIX_{key}_document.bin/.idx`, one pair per key."""
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise UserError(f"--max-bad-fraction {max_bad_fraction}: must be between 0 and 1")
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    keys = list(jsonl_keys)
    if not keys or len(set(keys)) != len(keys):
        raise UserError(f"--jsonl-keys {' '.join(keys)}: give one or more distinct keys")
    files = expand_inputs(inputs)
    if len(keys) > 1 and any(path.endswith(".txt") for path in files):
        raise UserError(f"--jsonl-keys {' '.join(keys)}: .txt inputs hold one text each, so give a single key")
    tokenizer = build_tokenizer(tokenizer_type, vocab_file)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"--output-prefix {output_prefix}: cannot create its folder ({err.strerror})") from None

    from tqdm import tqdm

    result = PreprocessResult(outputs=[document_prefix(output_prefix, key) for key in keys])
    init_args = (tokenizer_type, vocab_file, keys, append_eod)
    pool_holder: list = []
    outputs = None

    def discard() -> None:
        for pool in pool_holder:
            pool.terminate()
        if outputs is not None:
            outputs.discard()

    with _sigterm_raises_systemexit(), full_disk_is_one_line(output_prefix, cleanup=discard):
        outputs = _Outputs(output_prefix, keys, token_dtype(tokenizer.vocab_size))
        started = time.perf_counter()
        bar = tqdm(unit="doc", desc="tokenizing", disable=not progress, file=sys.stderr, mininterval=0.5)
        chunks = _chunks(iter_records(files), chunk_bytes, chunk_records)
        for encoded in _encoded_chunks(chunks, workers, init_args, pool_holder):
            for key_index, (tokens, lengths) in enumerate(zip(encoded.tokens, encoded.lengths)):
                outputs.add(key_index, tokens, lengths)
                result.tokens += int(tokens.size)
                if key_index == 0:
                    result.documents += int(lengths.size)
            result.records += encoded.records
            result.empty += encoded.empty
            result.input_bytes += encoded.input_bytes
            result.bad += len(encoded.bad)
            for source, line, reason in encoded.bad:
                if len(result.bad_examples) < MAX_BAD_EXAMPLES:
                    result.bad_examples.append(f"{files[source]}:{line}: {reason}")
            bar.update(encoded.records)
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"{result.input_bytes / elapsed / 1e6:.1f} MB/s", refresh=False)
        bar.close()
        _check_counts(result, files, max_bad_fraction)
        outputs.commit()
    result.seconds = time.perf_counter() - started
    return result


def _check_counts(result: PreprocessResult, files: Sequence[str], max_bad_fraction: float) -> None:
    if result.bad and result.bad / result.records > max_bad_fraction:
        raise UserError(
            f"{result.bad} of {result.records} input records are malformed "
            f"({result.bad / result.records:.1%} > --max-bad-fraction {max_bad_fraction}); "
            f"first: {'; '.join(result.bad_examples)}"
        )
    if result.documents == 0:
        names = files[0] if len(files) == 1 else f"{files[0]} and {len(files) - 1} more"
        raise UserError(f"--input {names}: no non-empty documents found")
