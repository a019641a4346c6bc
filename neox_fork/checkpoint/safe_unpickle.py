"""Unpickling a checkpoint file without running code from it.

torch.load(weights_only=True) rebuilds tensors, containers and primitives itself and refuses any other
global; SAFE_GLOBALS adds the few data types that checkpoints written by us, DeepSpeed and GPT-NeoX hold.
A file that needs anything else is refused in one line naming it and the type, and `trust` (the
--trust-checkpoint flag) is the logged way past that. `checkpoint.read_file` is what the rest of the project
calls: it adds, to an unreadable file's line, the step folders beside it that do load.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from neox_fork.errors import UserError

log = logging.getLogger(__name__)


class UnreadableFile(UserError):
    """A checkpoint file that is missing, empty, truncated or not a PyTorch file."""


# The exact non-tensor types that checkpoints written by us, DeepSpeed and GPT-NeoX hold. torch.load
# with weights_only=True rebuilds tensors, containers and primitives itself and refuses any other global,
# so a file can only construct these; each is data, none runs code on construction.
SAFE_GLOBALS = {
    # DeepSpeed ZeRO-1/2 optimizer shards: `loss_scaler` is pickled as the scaler object (static for
    # fp32/bf16, dynamic for fp16); plain attributes (scale, counters).
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": ("deepspeed.runtime.fp16.loss_scaler",
                                                             "DynamicLossScaler"),
    # DeepSpeed ZeRO-1/2 optimizer shards: `zero_stage` is this IntEnum.
    "deepspeed.runtime.zero.config.ZeroStageEnum": ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    # DeepSpeed ZeRO and bf16 optimizer shards: `param_slice_mappings` values, a dataclass (numel, start).
    "deepspeed.utils.tensor_fragment.fragment_address": ("deepspeed.utils.tensor_fragment", "fragment_address"),
    # GPT-NeoX's mp_rank files: `np_rng_state` is numpy.random.get_state(), a tuple holding a uint32
    # array; numpy pickles an array as _reconstruct(ndarray, ...) + its dtype (module numpy.core before
    # numpy 2, numpy._core since).
    "numpy.core.multiarray._reconstruct": ("numpy._core.multiarray", "_reconstruct"),
    "numpy._core.multiarray._reconstruct": ("numpy._core.multiarray", "_reconstruct"),
    "numpy.ndarray": ("numpy", "ndarray"),
    "numpy.dtype": ("numpy", "dtype"),
    "numpy.dtypes.UInt32DType": ("numpy.dtypes", "UInt32DType"),  # the class a uint32 dtype is rebuilt as
}
_BUILT_WITH = {"numpy.dtype": ["numpy.dtypes.UInt32DType"]}  # allowed with it; pickles name no GLOBAL for it
_TRUST_HINT = ("if you trust whoever wrote it, pass --trust-checkpoint (trust_checkpoint: true in a config) "
               "to load it with full unpickling, which can run code")


def _allowed(names) -> list:
    """(object, pickled name) pairs for torch.serialization.safe_globals, imported only when needed."""
    import importlib

    pairs = []
    for name in [*names, *(extra for n in names for extra in _BUILT_WITH.get(n, []))]:
        module, attr = SAFE_GLOBALS[name]
        try:
            pairs.append((getattr(importlib.import_module(module), attr), name))
        except (ImportError, AttributeError):  # e.g. numpy 1 has no numpy._core: that spelling cannot occur
            continue
    return pairs


def read_file(path: str | os.PathLike, trust: bool = False, mmap: bool = False):
    """The one place a checkpoint file (ours, DeepSpeed's, GPT-NeoX's) is unpickled.

    Safe by default: torch.load(weights_only=True) allowing only SAFE_GLOBALS; a file that needs any
    other type is refused by name. `trust` unpickles without restriction (logged per file). `mmap`
    maps the tensors' storage instead of reading it (a check of a file that another reader then loads).
    A missing, truncated or foreign file is an UnreadableFile naming it (checkpoint.read_file adds the
    step folders that do load).
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableFile(f"checkpoint file '{path}' is missing")
    if trust:
        log.warning("trust_checkpoint: unpickling '%s' without restriction (it can run code)", path)
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        except Exception as err:  # noqa: BLE001 - a truncated or foreign file
            raise UnreadableFile(_unreadable(path, err)) from None
    needed = _unsafe_globals(path)
    refused = [n for n in needed or [] if n not in SAFE_GLOBALS]
    if refused:
        raise UserError(_refusal(path, refused[0]))
    try:
        with torch.serialization.safe_globals(_allowed(needed if needed is not None else SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:  # a legacy-format file that needs a type we do not allow
        m = re.search(r"GLOBAL ([\w.]+)|but got <class '([^']+)'>", str(err))
        if m or "weights_only" in str(err).lower() or "Weights only" in str(err):
            raise UserError(_refusal(path, (m[1] or m[2]) if m else "a type outside the allowlist")) from None
        raise UnreadableFile(_unreadable(path, err)) from None
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file
        raise UnreadableFile(_unreadable(path, err)) from None


def add_trust_argument(parser) -> None:
    """--trust-checkpoint, the same in every program that reads a checkpoint (the `trust` of read_file)."""
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle without restriction (can run code): only for checkpoints you trust")


def allowed_globals() -> list:
    """SAFE_GLOBALS as torch.serialization.safe_globals takes them."""
    return _allowed(SAFE_GLOBALS)


def _unsafe_globals(path: Path) -> list[str] | None:
    """The globals a zip-format torch file would load beyond torch's own safe set (None: not a zip file,
    e.g. torch's legacy format, which torch.load then checks as it reads)."""
    if not zipfile.is_zipfile(path):
        if looks_like_legacy_torch(path):
            return None
        raise UnreadableFile(_unreadable(path, None))
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as err:  # noqa: BLE001 - a zip that is not a torch file, or a damaged one
        raise UnreadableFile(_unreadable(path, err)) from None


def looks_like_legacy_torch(path: Path) -> bool:
    """torch's pre-1.6 format starts with a pickled magic number (protocol 2: 0x80 0x02)."""
    with path.open("rb") as f:
        return f.read(2) == b"\x80\x02"


def _refusal(path: Path, name: str) -> str:
    return (f"refusing checkpoint file '{path}': it would load '{name}', which is not a type a checkpoint "
            f"holds (loading it could run code); {_TRUST_HINT}")


def _unreadable(path: Path, err: Exception | None) -> str:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(4)
    if size == 0:
        what = "is empty (its save was interrupted?)"
    elif head.startswith(b"PK"):
        what = f"is truncated or damaged ({size} bytes; its zip archive is incomplete)"
    elif head[:2] == b"\x80\x02":
        what = f"is truncated or damaged ({size} bytes; {type(err).__name__ if err else 'unreadable'})"
    else:
        what = f"is not a PyTorch checkpoint file (it starts with {head!r})"
    return f"checkpoint file '{path}' {what}"
