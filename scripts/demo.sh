#!/usr/bin/env bash
# The whole main job on the built-in tiny default: set up, build the demo corpus, train configs/tiny.yml,
# export the last checkpoint to Hugging Face, load it with transformers and sample from it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
$PY tools/datasets/prepare_demo_data.py --output-dir data/demo
$PY deepy.py train.py configs/tiny.yml
$PY tools/convert_to_hf.py --input-dir checkpoints/tiny --output-dir checkpoints/tiny-hf
$PY tools/sample_hf.py checkpoints/tiny-hf --temperature 0.75 --top-p 0.95
