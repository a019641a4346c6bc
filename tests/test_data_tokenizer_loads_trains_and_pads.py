"""Tokenizer loading (GPT-NeoX-20B), vocabulary padding, and training a tokenizer both loaders accept."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import conftest
from neox_fork.config.neox_config import padded_vocab_size
from neox_fork.data.tokenizer import build_tokenizer
from neox_fork.errors import UserError

REPO = Path(__file__).resolve().parents[1]
NEOX_TOKENIZER = conftest.NEOX_TOKENIZER


def test_gpt_neox_tokenizer_ids_eod_and_real_vocab_size():
    tokenizer = build_tokenizer("HFTokenizer", str(NEOX_TOKENIZER))
    assert tokenizer.vocab_size == 50277
    assert tokenizer.eod == 0
    assert tokenizer.encode("Hello world") == [12092, 1533]
    assert tokenizer.encode_batch(["Hello world", "Hello"]) == [[12092, 1533], tokenizer.encode("Hello")]
    text = "def f(x):\n    return x  # ünïcode\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize(
    "vocab, divisible, tp, expected",
    [(50277, 128, 1, 50304), (50277, 128, 2, 50432), (50304, 128, 1, 50304), (8192, 128, 4, 8192), (1, 8, 1, 8)],
)
def test_padded_vocab_size_rounds_up_to_multiple_of_divisible_by_times_tp(vocab, divisible, tp, expected):
    assert padded_vocab_size(vocab, divisible, tp) == expected


def test_missing_and_invalid_vocab_files_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(UserError, match=f"vocab-file {missing}: no such file"):
        build_tokenizer("HFTokenizer", str(missing))
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(UserError, match=f"vocab-file {broken}: not a valid Hugging Face tokenizer.json"):
        build_tokenizer("HFTokenizer", str(broken))
    with pytest.raises(UserError, match="merge-file must be set for tokenizer-type GPT2BPETokenizer .* set "
                                        "tokenizer-type HFTokenizer"):
        build_tokenizer("GPT2BPETokenizer", str(NEOX_TOKENIZER))
    with pytest.raises(UserError, match="tokenizer-type 'BertTokenizer' is not supported; valid: GPT2BPETokenizer"):
        build_tokenizer("BertTokenizer", str(NEOX_TOKENIZER))


def test_train_tokenizer_cli_writes_a_tokenizer_both_loaders_read_identically(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": f"The quick brown fox {i} jumps over the lazy dog.\n"}) for i in range(300)]
    corpus.write_text("\n".join(lines + ["not json"]) + "\n")
    (tmp_path / "extra.txt").write_text("A whole text file is one document.\n\nWith two paragraphs.\n")
    out = tmp_path / "tok"
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "datasets" / "train_tokenizer.py"), "--input", str(corpus),
         str(tmp_path / "*.txt"), "--output-dir", str(out), "--vocab-size", "400"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "skipped 1 malformed records" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]  # no temp file left

    ours = build_tokenizer("HFTokenizer", str(out / "tokenizer.json"))
    assert 257 < ours.vocab_size <= 400 and ours.eod == 0  # a tiny corpus runs out of merges
    assert ours.token_to_id("<|endoftext|>") == 0

    from transformers import PreTrainedTokenizerFast

    theirs = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    text = "The quick brown fox 7 jumps. Ünïcode and  spaces\n"
    assert theirs(text)["input_ids"] == ours.encode(text)
    assert ours.decode(ours.encode(text)) == text  # byte-level: lossless


def test_train_tokenizer_rejects_a_vocab_too_small_for_the_bytes(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "hello"}) + "\n")
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "datasets" / "train_tokenizer.py"), "--input", str(corpus),
         "--output-dir", str(tmp_path / "tok"), "--vocab-size", "100"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: --vocab-size 100: must be at least 257 (256 bytes + <|endoftext|>)"
