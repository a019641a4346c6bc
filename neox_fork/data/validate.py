"""Checks on `.bin/.idx` datasets and data settings, run before training builds anything.

Each problem raises a one-line `UserError` naming the path or key: a missing or truncated file, token
ids the tokenizer cannot embed, weights that do not match the paths, a split too small for one sample.
Megatron-core would otherwise assert deep inside, loop forever (a split with no tokens), or read
garbage (a truncated .bin).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy

from neox_fork.errors import UserError

_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
# Megatron's DType codes (megatron/core/datasets/indexed_dataset.py).
_DTYPES = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64, 8: numpy.uint16}
_SAMPLE_CHUNK_TOKENS = 1 << 16
_SAMPLE_CHUNKS = 16


@dataclass(frozen=True)
class IndexedDatasetInfo:
    """What a `.idx` file says, checked against its `.bin`."""

    prefix: str
    dtype: type[numpy.number]
    sequence_lengths: numpy.ndarray  # int32, one per document here (we write one sequence each)
    num_documents: int

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=numpy.int64))


def inspect_indexed_dataset(prefix: str) -> IndexedDatasetInfo:
    """Read the .idx header and lengths; raise if either file is missing or the sizes disagree."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise UserError(f"data path {prefix}: {path} does not exist (paths are prefixes without .bin/.idx)")
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as stream:
        header = stream.read(_IDX_HEADER_BYTES)
    if len(header) < _IDX_HEADER_BYTES or header[:9] != _IDX_MAGIC:
        raise UserError(f"data path {prefix}: {idx_path} is not a Megatron mmap index (bad header)")
    (version,) = struct.unpack("<Q", header[9:17])
    dtype = _DTYPES.get(header[17])
    if version != 1 or dtype is None:
        raise UserError(f"data path {prefix}: {idx_path} has unsupported version {version} or dtype code {header[17]}")
    num_sequences, num_documents = struct.unpack("<QQ", header[18:34])
    expected_idx = _IDX_HEADER_BYTES + num_sequences * (4 + 8) + num_documents * 8
    if idx_size not in (expected_idx, expected_idx + num_sequences):  # + optional int8 modes
        raise UserError(
            f"data path {prefix}: {idx_path} is truncated or corrupt "
            f"({idx_size} bytes, its header implies {expected_idx})"
        )
    lengths = numpy.fromfile(idx_path, dtype=numpy.int32, count=num_sequences, offset=_IDX_HEADER_BYTES)
    expected_bin = int(lengths.sum(dtype=numpy.int64)) * numpy.dtype(dtype).itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size != expected_bin:
        raise UserError(
            f"data path {prefix}: {bin_path} is truncated or does not belong to its .idx "
            f"({bin_size} bytes, the .idx implies {expected_bin})"
        )
    return IndexedDatasetInfo(prefix, dtype, lengths, max(int(num_documents) - 1, 0))


def check_token_ids(info: IndexedDatasetInfo, vocab_size: int, vocab_file: str = "") -> None:
    """Fail if sampled token ids reach past the tokenizer's vocabulary (data from another tokenizer).

    Reads the whole .bin when small, else 16 evenly spaced chunks of 64K tokens.
    """
    if info.num_tokens == 0:
        return
    tokens = numpy.memmap(info.prefix + ".bin", dtype=info.dtype, mode="r")
    if tokens.size <= _SAMPLE_CHUNKS * _SAMPLE_CHUNK_TOKENS:
        largest = int(tokens.max())
    else:
        starts = numpy.linspace(0, tokens.size - _SAMPLE_CHUNK_TOKENS, _SAMPLE_CHUNKS).astype(numpy.int64)
        largest = max(int(tokens[s : s + _SAMPLE_CHUNK_TOKENS].max()) for s in starts)
    del tokens
    if largest >= vocab_size:
        where = f" of vocab-file {vocab_file}" if vocab_file else ""
        raise UserError(
            f"data path {info.prefix}: holds token id {largest} but the tokenizer{where} has only "
            f"{vocab_size} ids; was it preprocessed with another tokenizer?"
        )


def parse_split(split: str) -> list[float]:
    """GPT-NeoX `split` ('969,30,1') as normalized train/valid/test fractions."""
    parts = [part.strip() for part in str(split).split(",")]
    if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"\d+(\.\d*)?|\.\d+", part) for part in parts):
        raise UserError(f"split {split!r}: expected up to three comma-separated non-negative weights, e.g. '969,30,1'")
    weights = [float(part) for part in parts] + [0.0] * (3 - len(parts))
    if sum(weights) <= 0:
        raise UserError(f"split {split!r}: the weights must not all be zero")
    return [weight / sum(weights) for weight in weights]


def split_document_ranges(num_documents: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """Document [begin, end) of each split, rounded as megatron-core rounds them."""
    bounds = numpy.concatenate(([0.0], numpy.cumsum(fractions)))
    return [
        (int(round(bounds[i] * float(num_documents))), int(round(bounds[i + 1] * float(num_documents))))
        for i in range(len(fractions))
    ]


def check_weights(paths: Sequence[str], weights: Sequence[float] | None, key: str) -> list[float]:
    """The weights to use for `paths` (equal when none are given); raise if they do not fit."""
    if weights is None or len(weights) == 0:
        return [1.0] * len(paths)
    if len(weights) != len(paths):
        raise UserError(
            f"{key}: {len(weights)} weights for {len(paths)} paths ({', '.join(paths)}); give one weight per path"
        )
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 for w in weights):
        raise UserError(f"{key}: {list(weights)} must all be positive numbers (drop a path to give it no weight)")
    return [float(w) for w in weights]
