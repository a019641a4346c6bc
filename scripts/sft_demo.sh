#!/usr/bin/env bash
# The chat recipe at the tiny shape (configs/tiny-sft.yml), the StableLM-3B-4E1T -> SFT -> export path of
# configs/stablelm-3b-4e1t-sft.yml on a laptop: the demo corpus and tiny base model (as scripts/demo.sh makes
# them, when not there yet), a chat tokenizer for them, the shipped chat set preprocessed with its template,
# SFT on the replies only, the Hugging Face export, and a question answered by our generate.py --chat and by
# transformers (apply_chat_template + generate) on the export.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
PY=.venv/bin/python
[ -f data/demo/tokenizer.json ] || $PY tools/datasets/prepare_demo_data.py --output-dir data/demo
[ -f checkpoints/tiny/latest ] || $PY deepy.py train.py configs/tiny.yml
$PY tools/datasets/make_chat_tokenizer.py --vocab-file data/demo/tokenizer.json \
    --chat-template examples/chat/chat_template.jinja --output-dir data/demo/chat_tokenizer
for split in train valid; do
    $PY tools/datasets/preprocess_data_with_chat_template.py --input examples/chat/demo_chat_$split.jsonl \
        --output-prefix data/demo/chat_$split --tokenizer-path data/demo/chat_tokenizer --jsonl-keys messages
done
$PY deepy.py train.py configs/tiny.yml configs/tiny-sft.yml
$PY tools/convert_to_hf.py --input-dir checkpoints/tiny-sft --output-dir checkpoints/tiny-sft-hf
QUESTION="What colour is the sky in the demo world?"
echo "generate.py --chat: $QUESTION"
$PY generate.py --checkpoint checkpoints/tiny-sft --chat --prompt "$QUESTION" --max-new-tokens 32
echo "transformers on checkpoints/tiny-sft-hf: $QUESTION"
$PY tools/sample_hf.py checkpoints/tiny-sft-hf --chat --prompt "$QUESTION" --temperature 0 --max-new-tokens 32
