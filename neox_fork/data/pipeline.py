"""The machinery every preprocessing tool shares: read records, encode them in worker processes, write
Megatron mmap datasets (`.bin/.idx`) all at once or not at all.

The main process reads records in order and hands chunks to worker processes, which parse and
encode them; results are written in submission order, so any worker count gives byte-identical
files. Outputs are written to temporary files beside the final ones and renamed only after
everything succeeded: an exception, Ctrl-C or SIGTERM leaves neither outputs nor temporary files, and a
full filesystem is one line naming the output folder (errors.full_disk_is_one_line).

A tool supplies an encoder: a class built in each worker from picklable arguments and called on a
list of `Record`s, answering an `EncodedChunk` with one array per output file (text tokens, labels,
rewards, ...). `neox_fork.data.preprocess` (plain text) and `neox_fork.data.chat` (chat templates)
are the two tools.
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
from typing import Callable, Iterator, Sequence

import numpy

from neox_fork.checkpoint.store import commit_temp, temp_path_for
from neox_fork.data import _megatron
from neox_fork.data.readers import Record, iter_records
from neox_fork.errors import UserError, full_disk_is_one_line

MAX_BAD_EXAMPLES = 5


@dataclass
class PreprocessResult:
    """What a preprocessing run read and wrote."""

    outputs: list[str]  # final path prefixes, one per output file
    records: int = 0  # non-blank input records (lines or .txt files), good and bad
    documents: int = 0  # documents written (of the first output)
    tokens: int = 0  # tokens written (all token outputs; labels and rewards not counted)
    empty: int = 0  # records whose text was empty, skipped
    input_bytes: int = 0
    seconds: float = 0.0
    bad: int = 0
    bad_examples: list[str] = field(default_factory=list)


@dataclass
class EncodedChunk:
    """One worker's answer: per output file, the chunk's documents concatenated and each one's length."""

    arrays: list[numpy.ndarray]
    lengths: list[numpy.ndarray]
    bad: list[tuple[int, int, str]]  # (source index, line, reason)
    empty: int
    records: int
    input_bytes: int


def check_dataset_impl(dataset_impl: str) -> None:
    """Upstream's --dataset-impl: only its mmap format is written here."""
    if dataset_impl != "mmap":
        raise UserError(f"--dataset-impl {dataset_impl}: only mmap is written here (upstream's lazy and cached "
                        "formats are not built)")


def flatten(documents: Sequence[Sequence], dtype) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Documents (lists of numbers) as one array of `dtype` and the array of their lengths."""
    lengths = numpy.fromiter((len(doc) for doc in documents), dtype=numpy.int64, count=len(documents))
    flat = numpy.fromiter(itertools.chain.from_iterable(documents), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


_worker_encoder: Callable[[Sequence[Record]], EncodedChunk] | None = None


def _init_worker(make_encoder: Callable, init_args: tuple) -> None:
    # Ctrl-C reaches the whole process group: let the parent alone decide, and let SIGTERM from
    # Pool.terminate() kill the worker instead of running the parent's handler inherited by fork.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked since the fork (_encoded_chunks)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker_encoder
    _worker_encoder = make_encoder(*init_args)


def _encode_chunk(chunk: Sequence[Record]) -> EncodedChunk:
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
    """One IndexedDatasetBuilder per output, writing temp files that `commit` renames into place."""

    def __init__(self, prefixes: Sequence[str], dtypes: Sequence[type[numpy.number]]):
        IndexedDatasetBuilder = _megatron.indexed_dataset().IndexedDatasetBuilder
        self.prefixes = list(prefixes)
        self.temp_paths = [(str(temp_path_for(p + ".bin")), str(temp_path_for(p + ".idx"))) for p in self.prefixes]
        self.builders = []
        for (bin_tmp, _), dtype in zip(self.temp_paths, dtypes):
            self.builders.append(IndexedDatasetBuilder(bin_tmp, dtype=dtype))

    def add(self, index: int, data: numpy.ndarray, lengths: numpy.ndarray) -> None:
        builder = self.builders[index]
        offsets = numpy.concatenate(([0], numpy.cumsum(lengths)))
        for start, end in zip(offsets[:-1], offsets[1:]):
            builder.add_document(data[start:end], [int(end - start)])

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
    chunks: Iterator[list[Record]], workers: int, make_encoder: Callable, init_args: tuple, pool_holder: list
) -> Iterator[EncodedChunk]:
    """Encode chunks in order; with workers > 1 keep a bounded number in flight (imap would read
    the whole input ahead into memory)."""
    if workers <= 1:
        encoder = make_encoder(*init_args)
        for chunk in chunks:
            yield encoder(chunk)
        return
    # Workers are forked with SIGTERM blocked and unblock it in _init_worker once it kills them: a
    # Pool.terminate() that reaches a worker still starting (the first chunk can fail before every worker
    # is up) stays pending instead of tripping the parent's handler copied by fork, whose call the switch
    # to SIG_DFL can drop, leaving the worker alive and terminate() waiting for it forever.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        pool = multiprocessing.get_context("fork").Pool(
            workers, initializer=_init_worker, initargs=(make_encoder, init_args)
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
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


def check_run_options(workers: int, max_bad_fraction: float) -> None:
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise UserError(f"--max-bad-fraction {max_bad_fraction}: must be between 0 and 1")
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")


def make_output_folder(output_prefix: str) -> None:
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"--output-prefix {output_prefix}: cannot create its folder ({err.strerror})") from None


def run(
    files: Sequence[str],
    prefixes: Sequence[str],
    dtypes: Sequence[type[numpy.number]],
    make_encoder: Callable,
    init_args: tuple,
    *,
    token_outputs: Sequence[int],
    workers: int = 1,
    max_bad_fraction: float = 0.01,
    progress: bool = False,
    progress_total: int | None = None,
    progress_every: int = 1,
    chunk_bytes: int = 1 << 20,
    chunk_records: int = 4096,
) -> PreprocessResult:
    """Encode every record of `files` with `make_encoder(*init_args)` into `PREFIX.bin/.idx` for each
    of `prefixes` (element types `dtypes`), or raise and write nothing. `token_outputs` are the
    indices of the outputs whose sizes count as tokens; the first output's documents are counted."""
    check_run_options(workers, max_bad_fraction)
    from tqdm import tqdm

    result = PreprocessResult(outputs=list(prefixes))
    pool_holder: list = []
    outputs = None

    def discard() -> None:
        for pool in pool_holder:
            pool.terminate()
        if outputs is not None:
            outputs.discard()

    folder = os.path.dirname(os.path.abspath(prefixes[0]))
    with _sigterm_raises_systemexit(), full_disk_is_one_line(folder, cleanup=discard):
        outputs = _Outputs(prefixes, dtypes)
        started = time.perf_counter()
        bar = tqdm(unit="doc", desc="tokenizing", disable=not progress, file=sys.stderr, mininterval=0.5,
                   total=progress_total, miniters=progress_every)
        chunks = _chunks(iter_records(files), chunk_bytes, chunk_records)
        for encoded in _encoded_chunks(chunks, workers, make_encoder, init_args, pool_holder):
            for index, (data, lengths) in enumerate(zip(encoded.arrays, encoded.lengths)):
                outputs.add(index, data, lengths)
                if index in token_outputs:
                    result.tokens += int(data.size)
                if index == 0:
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


def print_report(result: PreprocessResult, what: str = "documents") -> None:
    """What a preprocessing tool prints when done: skipped records on stderr, a summary on stdout."""
    for example in result.bad_examples:
        print(f"warning: skipped {example}", file=sys.stderr)
    if result.bad > len(result.bad_examples):
        print(f"warning: skipped {result.bad - len(result.bad_examples)} more malformed records", file=sys.stderr)
    rate = result.input_bytes / max(result.seconds, 1e-9) / 1e6
    print(
        f"wrote {', '.join(p + '.bin/.idx' for p in result.outputs)}: {result.documents} {what}, "
        f"{result.tokens} tokens from {result.input_bytes / 1e6:.1f} MB in {result.seconds:.1f} s ({rate:.1f} MB/s); "
        f"{result.bad} malformed and {result.empty} empty records skipped"
    )
