"""megatron-core's index caches (`*_index.npy` in the cache folder), checked before megatron-core reads them.

megatron-core loads each with numpy.load(allow_pickle=True, mmap_mode="r"): a file holding a pickle rather than
an array would be unpickled (and could run code), and a truncated or foreign one fails deep inside numpy with a
ValueError or OSError traceback. Here each is one line naming the file and saying how to rebuild it. Only the
header is read, so the check costs a few reads per file whatever the index size.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy

from neox_fork.errors import UserError

PATTERN = "*_index.npy"  # megatron-core's document_, sample_, shuffle_, dataset_ and dataset_sample_index files


def check_index_cache(folder: str | Path) -> None:
    """A one-line UserError for the first index file in `folder` that is not a complete integer array."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob(PATTERN)):
        problem = index_file_problem(path)
        if problem:
            raise UserError(f"index cache {path}: {problem}; delete it and the run rebuilds its dataset's index "
                            "files (rank 0 writes them again where one is missing)")


def index_file_problem(path: Path) -> str | None:
    """What is wrong with an index file (None when it is a complete array of integers, as megatron-core writes)."""
    try:
        with open(path, "rb") as f:
            try:
                version = numpy.lib.format.read_magic(f)
                read = (numpy.lib.format.read_array_header_1_0 if version == (1, 0)
                        else numpy.lib.format.read_array_header_2_0)
                shape, _, dtype = read(f)
            except ValueError as err:  # numpy's words for a file too short or not its format
                if str(err).startswith("EOF"):
                    return f"truncated: {path.stat().st_size} bytes, its numpy header cut short"
                if "magic string" in str(err):
                    return "not a numpy array file (a pickle, or another format)"
                return f"its numpy header is unreadable ({str(err).splitlines()[0]})"
            offset = f.tell()
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if dtype.hasobject:
        return "holds Python objects (a pickle inside a numpy file), not the integer index megatron-core writes"
    if dtype.kind not in "iu":
        return f"holds {dtype} values, not the integer index megatron-core writes"
    expected = offset + math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        return f"truncated: {size} bytes of the {expected} its header promises"
    return None
