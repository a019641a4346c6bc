"""What a checkpoint file holds, and how two checkpoints differ (tools/ckpts/inspect_checkpoints.py).

Upstream gpt-neox's flags: DIR (a folder of .pt/.ckpt files, one file, or `A,B` with --compare),
--attributes NAME/NESTED/... (print only those entries), --interactive (a Python shell with the loaded files),
--compare / --diff (entries of A and B side by side; --diff: only those that differ). Files are read through
checkpoint.read_file, so inspecting never runs code from a checkpoint (--trust-checkpoint as elsewhere).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from neox_fork.checkpoint import store as checkpoint
from neox_fork.errors import UserError, exit_on_user_error
from neox_fork.checkpoint.safe_unpickle import add_trust_argument


def checkpoint_files(path: str) -> dict[str, Path]:
    """{name: file} of a .pt/.ckpt file or of every such file in a folder."""
    p = Path(path)
    if p.is_file():
        return {p.name: p}
    if not p.is_dir():
        raise UserError(f"{path}: no such file or folder")
    files = {f.name: f for f in sorted(p.iterdir()) if f.suffix in (".pt", ".ckpt")}
    if not files:
        raise UserError(f"{path}: holds no .pt or .ckpt files")
    return files


def flatten(obj, prefix: str = "") -> dict[str, object]:
    """Nested dicts and lists as {'a/b/0': leaf}."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)) and not all(isinstance(x, (int, float, bool, str)) for x in obj):
        items = enumerate(obj)
    else:
        return {prefix: obj}
    out: dict[str, object] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
    return out or {prefix: obj}


def describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects whose == is not a bool (arrays): compare their text
        return repr(a) == repr(b)


def _select(entries: dict[str, object], attributes: list[str] | None) -> dict[str, object]:
    if not attributes:
        return entries
    return {k: v for k, v in entries.items() if any(k == a or k.startswith(a + "/") for a in attributes)}


def inspect_lines(path: str, attributes: list[str] | None = None, trust: bool = False) -> list[str]:
    lines = []
    for name, f in checkpoint_files(path).items():
        lines.append(f"== {name}")
        lines += [f"{key}: {describe(value)}"
                  for key, value in _select(flatten(checkpoint.read_file(f, trust)), attributes).items()]
    return lines


def compare_lines(a: str, b: str, attributes: list[str] | None = None, diff_only: bool = False,
                  trust: bool = False) -> list[str]:
    files_a, files_b = checkpoint_files(a), checkpoint_files(b)
    lines = [f"only in {a}: {n}" for n in files_a if n not in files_b]
    lines += [f"only in {b}: {n}" for n in files_b if n not in files_a]
    for name in (n for n in files_a if n in files_b):
        left = _select(flatten(checkpoint.read_file(files_a[name], trust)), attributes)
        right = _select(flatten(checkpoint.read_file(files_b[name], trust)), attributes)
        lines.append(f"== {name}")
        for key in sorted(set(left) | set(right)):
            if key not in right or key not in left:
                lines.append(f"{key}: only in {a if key in left else b}")
            elif not _same(left[key], right[key]):
                lines.append(f"{key}: differs ({describe(left[key])} / {describe(right[key])})")
            elif not diff_only:
                lines.append(f"{key}: same ({describe(left[key])})")
    return lines


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="a folder of .pt/.ckpt files, one file, or A,B to compare")
    parser.add_argument("--attributes", nargs="*", default=None, help="entries to show, nested names joined by /")
    parser.add_argument("--interactive", "-i", action="store_true", help="a Python shell with the files loaded")
    parser.add_argument("--compare", "-c", action="store_true", help="compare the two folders of DIR (A,B)")
    parser.add_argument("--diff", "-d", action="store_true", help="with --compare: only what differs")
    add_trust_argument(parser)
    args = parser.parse_args(argv)
    if args.compare:
        paths = args.dir.split(",")
        if len(paths) != 2:
            raise UserError(f"--compare needs DIR as two comma-separated paths, got {args.dir!r}")
        print("\n".join(compare_lines(*paths, args.attributes, args.diff, args.trust_checkpoint)))
    else:
        print("\n".join(inspect_lines(args.dir, args.attributes, args.trust_checkpoint)))
    if args.interactive:
        import code

        loaded = {name: checkpoint.read_file(f, args.trust_checkpoint)
                  for path in args.dir.split(",") for name, f in checkpoint_files(path).items()}
        code.interact(banner="checkpoints: {file name: contents}", local={"checkpoints": loaded})
