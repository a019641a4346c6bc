#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, the few wheels scripts/gpu_check.sh installs on a GPU machine that
# reaches no package registry. The GPU image already has Python 3.12, a CUDA torch, transformers,
# tokenizers, safetensors, numpy, pyyaml, pytest and pytest-timeout; it lacks deepspeed (and its pydantic
# and hjson) and megatron-core. About 8 MB, well under what a device call carries (64 MiB).
#
#   bash scripts/gpu_wheels.sh [DEST]          default DEST: wheels/gpu (ignored by git)
#
# GPU_PYTHON_VERSION (default 3.12) picks the wheels of compiled packages; versions are pinned to what
# .venv runs here, so the GPU runs the same code as the CPU tests.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-wheels/gpu}
PY=${PYTHON:-.venv/bin/python}
PYVER=${GPU_PYTHON_VERSION:-3.12}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two would stop the install there
# deepspeed ships only an sdist: build its pure-Python wheel here (no ops compiled in; none is needed for a
# torch AdamW client optimizer and the bf16 optimizer)
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(version deepspeed)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" \
    "megatron-core==$(version megatron-core)" "hjson==$(version hjson)" "pydantic==$(version pydantic)" \
    "pydantic-core==$(version pydantic-core)" "annotated-types==$(version annotated-types)" \
    "typing-inspection==$(version typing-inspection)" "typing-extensions==$(version typing-extensions)"
ls -1 "$DEST"
du -sh "$DEST"
