"""What a checkpoint file holds on disk against what its tensors are: the check every test of a tensor writer calls.

torch.save writes a zip archive with each storage its tensors view stored once, uncompressed, as an
`archive/data/N` member (torch/serialization.py), so the members' sizes are exactly the storage bytes written.
A file whose tensors are views into a larger buffer (a layer's weights inside DeepSpeed's flat parameter
buffer) stores the whole buffer: its data members then exceed its tensors' own bytes (numel x element size)
by the rest of the buffer. The bound is 3% (the writer copies out views covering less than 97% of their
storage, checkpoint.store.compact); a compact file stores exactly its tensors' bytes.
"""

import re
import zipfile
from pathlib import Path

import torch

from neox_fork.checkpoint import store as checkpoint

SLACK = 1 / 0.97  # stored bytes may exceed the tensors' own bytes by this factor (compact's threshold), no more
_DATA = re.compile(r"(^|/)data/\d+$")


def _tensors(node):
    if isinstance(node, torch.Tensor):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _tensors(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _tensors(value)


def stored_and_own_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the storages the file holds, bytes of its distinct tensors)."""
    with zipfile.ZipFile(path) as archive:
        stored = sum(member.file_size for member in archive.infolist() if _DATA.search(member.filename))
    distinct = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride()): t
                for t in _tensors(checkpoint.read_file(path))}
    return stored, sum(t.numel() * t.element_size() for t in distinct.values())


def assert_files_hold_only_their_tensors(folder) -> int:
    """Every .pt file under `folder` (sub-folders included) stores at most SLACK x its tensors' bytes; returns how
    many files were checked (so a caller can check that it looked at something)."""
    files = sorted(Path(folder).rglob("*.pt"))
    for path in files:
        stored, own = stored_and_own_bytes(path)
        assert stored <= own * SLACK, (f"{path} stores {stored:,} bytes of tensor data for {own:,} bytes of tensors "
                                       f"({stored / max(own, 1):.2f}x): a view's whole storage was saved")
    return len(files)
