"""A demo corpus built offline from what every Python installation carries.

Documents:
  code   every standard-library .py file (tests, idlelib, lib2to3, turtledemo left out)
  prose  per stdlib module, its docstrings joined; and the long descriptions and docs of installed
         packages (METADATA bodies, *.md, *.rst under site-packages)
Files are listed sorted, shuffled with a fixed seed, optionally capped at `max_bytes`, and 2% go to
validation. A byte-level BPE tokenizer is trained on the training text, then both
splits are tokenized with an end-of-document token. The corpus depends on the installation, but is
fixed for a given one. `manifest.json` is written last and marks a finished build.
"""

from __future__ import annotations

import ast
import json
import os
import random
import sysconfig
import time
from pathlib import Path
from typing import Iterator

from neox_fork.checkpoint.store import atomic_path, write_atomic
from neox_fork.data.preprocess import preprocess
from neox_fork.data.tokenizer import train_bpe_tokenizer

_SKIP_STDLIB_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages", "__pycache__"}
_MAX_DOC_BYTES = 1 << 20
_MIN_PROSE_CHARS = 400
VALID_FRACTION = 0.02  # of the corpus bytes go to the validation split (at least one document)


def _read_text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) > _MAX_DOC_BYTES:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _walk(root: Path, skip: set[str]) -> Iterator[Path]:
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
        for name in sorted(files):
            yield Path(directory) / name


def _docstrings(source: str) -> str:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                parts.append(doc)
    return "\n\n".join(parts)


def collect_documents(stdlib: str | None = None, site_packages: str | None = None) -> list[tuple[str, str]]:
    """(source label, text) for every demo document, in a fixed order."""
    paths = sysconfig.get_paths()
    stdlib_root = Path(stdlib or paths["stdlib"])
    site_root = Path(site_packages or paths["purelib"])
    documents = []
    for path in _walk(stdlib_root, _SKIP_STDLIB_DIRS):
        if path.suffix != ".py":
            continue
        text = _read_text(path)
        if not text or not text.strip():
            continue
        label = f"stdlib/{path.relative_to(stdlib_root)}"
        documents.append((f"code:{label}", text))
        prose = _docstrings(text)
        if len(prose) >= _MIN_PROSE_CHARS:
            documents.append((f"docstrings:{label}", prose))
    if site_root.is_dir():
        for path in _walk(site_root, {"__pycache__"}):
            if path.name == "METADATA":
                text = _read_text(path)
                text = text.split("\n\n", 1)[1] if text and "\n\n" in text else ""
            elif path.suffix in (".md", ".rst"):
                text = _read_text(path) or ""
            else:
                continue
            if len(text.strip()) >= _MIN_PROSE_CHARS:
                documents.append((f"docs:site-packages/{path.relative_to(site_root)}", text))
    return documents


def _write_jsonl(path: Path, documents: list[tuple[str, str]]) -> None:
    with atomic_path(path) as temp, open(temp, "w", encoding="utf-8") as stream:
        for source, text in documents:
            stream.write(json.dumps({"text": text, "source": source}) + "\n")


def is_built(output_dir: str) -> bool:
    return (Path(output_dir) / "manifest.json").is_file()


def build_demo_data(
    output_dir: str = "data/demo",
    *,
    vocab_size: int = 8192,
    max_bytes: int | None = None,
    workers: int | None = None,
    seed: int = 1234,
    force: bool = False,
    progress: bool = False,
) -> dict:
    """Build (or, unless `force`, reuse) the demo corpus; returns the manifest.

    Writes OUTPUT_DIR/{train,valid}.jsonl, tokenizer.json and
    {train,valid}_text_document.bin/.idx (train with data paths OUTPUT_DIR/train_text_document).
    """
    out = Path(output_dir)
    if is_built(output_dir) and not force:
        return json.loads((out / "manifest.json").read_text())
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)

    documents = collect_documents()
    random.Random(seed).shuffle(documents)
    if max_bytes is not None:
        kept, total = [], 0
        for document in documents:
            if total >= max_bytes:
                break
            kept.append(document)
            total += len(document[1].encode("utf-8"))
        documents = kept
    # the validation split is VALID_FRACTION of the bytes, not of the documents: which files a Python installation
    # carries decides the shuffle, and one short document (a few dozen tokens) is no validation set
    want, num_valid, size = VALID_FRACTION * sum(len(d[1].encode("utf-8")) for d in documents), 0, 0
    while num_valid < len(documents) - 1 and (num_valid == 0 or size < want):
        size += len(documents[num_valid][1].encode("utf-8"))
        num_valid += 1
    valid, train = documents[:num_valid], documents[num_valid:]
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "valid.jsonl", valid)
    collected = time.perf_counter()

    tokenizer = train_bpe_tokenizer((text for _, text in train), vocab_size, str(out / "tokenizer.json"))
    trained = time.perf_counter()

    workers = workers or os.cpu_count() or 1
    splits = {}
    for name in ("train", "valid"):
        result = preprocess(
            [str(out / f"{name}.jsonl")],
            str(out / name),
            tokenizer.vocab_file,
            append_eod=True,
            workers=workers,
            progress=progress,
        )
        splits[name] = {
            "data_path": result.outputs[0],
            "documents": result.documents,
            "tokens": result.tokens,
            "bytes": result.input_bytes,
        }
    manifest = {
        "vocab_file": tokenizer.vocab_file,
        "vocab_size": tokenizer.vocab_size,
        "seed": seed,
        "max_bytes": max_bytes,
        "splits": splits,
        "seconds": {
            "collect": round(collected - started, 2),
            "tokenizer": round(trained - collected, 2),
            "preprocess": round(time.perf_counter() - trained, 2),
        },
    }
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
