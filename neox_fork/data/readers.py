"""Finding input files and reading them as documents: `.jsonl`, `.jsonl.gz`, `.jsonl.zst`, `.txt`.

A `.jsonl*` file holds one JSON object per line; the document is the string under a key (`text`).
A `.txt` file is one whole document (a book, a source file): blank lines inside it are kept, so no
guess is made about where one document ends. Files are read as bytes and decoded per record, so that
one undecodable line is a malformed record rather than a crash.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

from neox_fork.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TXT_SUFFIXES = (".txt",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + TXT_SUFFIXES


class BadRecord(ValueError):
    """One input record that cannot become a document; the message says why."""


@dataclass(frozen=True)
class Record:
    """Raw bytes of one document-to-be and where they came from (for error messages)."""

    source: int  # index into the list of input files
    line: int  # 1-based line number; 1 for a whole .txt file
    raw: bytes
    is_txt: bool


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files named by paths or globs, in the order given (each glob's matches sorted), no duplicates."""
    if not patterns:
        raise UserError("--input: no input files given")
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))
            if not matches:
                raise UserError(f"--input {pattern}: the glob matches no files")
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise UserError(f"--input {pattern}: no such file")
        for path in matches:
            if not path.endswith(SUPPORTED_SUFFIXES):
                raise UserError(f"--input {path}: unsupported file type; valid: {', '.join(SUPPORTED_SUFFIXES)}")
            if path not in files:
                files.append(path)
    return files


def _open_binary(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def _zstd_error() -> type[Exception]:
    import zstandard

    return zstandard.ZstdError


def iter_records(files: Sequence[str]) -> Iterator[Record]:
    """Every non-blank jsonl line, and every .txt file whole, in file order."""
    for source, path in enumerate(files):
        is_txt = path.endswith(TXT_SUFFIXES)
        try:
            with _open_binary(path) as stream:
                if is_txt:
                    yield Record(source, 1, stream.read(), True)
                    continue
                for line_number, line in enumerate(stream, start=1):
                    if line.strip():
                        yield Record(source, line_number, line, False)
        except (OSError, EOFError, _zstd_error()) as err:
            raise UserError(f"--input {path}: cannot read or decompress ({err})") from None


def _decode(record: Record) -> str:
    try:
        return record.raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRecord(f"not valid UTF-8 at byte {err.start}") from None


def parse_object(record: Record) -> dict:
    """A jsonl record's JSON object; `BadRecord` says what is wrong."""
    try:
        obj = json.loads(_decode(record))
    except json.JSONDecodeError as err:
        raise BadRecord(f"invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_record(record: Record, keys: Sequence[str]) -> list[str]:
    """The document text under each key (or the whole .txt file); `BadRecord` says what is wrong."""
    if record.is_txt:
        return [_decode(record)]
    obj = parse_object(record)
    values = []
    for key in keys:
        if key not in obj:
            raise BadRecord(f"missing key {key!r}")
        value = obj[key]
        if not isinstance(value, str):
            raise BadRecord(f"key {key!r} is {type(value).__name__}, expected a string")
        values.append(value)
    return values
