"""The chat set shipped in examples/chat/ and its template work with the demo tokenizer: every
conversation is kept, and the trained positions are exactly the assistant's replies."""

import json
from pathlib import Path

import pytest

from neox_fork.data.chat import ChatOptions, preprocess_chat, write_chat_tokenizer

CHAT = Path(__file__).resolve().parents[1] / "examples" / "chat"
EOS = "<|endoftext|>"


def _records(name):
    return [json.loads(line) for line in (CHAT / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo_chat_tokenizer(small_corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sftdata_demo_chat") / "tokenizer"
    write_chat_tokenizer(str(small_corpus / "tokenizer.json"), str(CHAT / "chat_template.jinja"), str(folder))
    return str(folder)


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_the_shipped_sets_are_consistent_conversations():
    train, valid, pairs = _records("demo_chat_train.jsonl"), _records("demo_chat_valid.jsonl"), _records(
        "demo_chat_pairs.jsonl")
    assert 50 <= len(train) + len(valid) <= 200
    conversations = [r["messages"] for r in train + valid] + [r[k] for r in pairs for k in ("chosen", "rejected")]
    answer_of = {}
    for conv in [r["messages"] for r in train + valid] + [r["chosen"] for r in pairs]:
        roles = [m["role"] for m in conv if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        for question, answer in zip(conv[-len(roles)::2], conv[-len(roles) + 1::2]):
            # one fixed answer per question, in every file: a tiny model can learn it
            assert answer_of.setdefault(question["content"], answer["content"]) == answer["content"]
    for pair in pairs:
        assert pair["chosen"][:-1] == pair["rejected"][:-1] and pair["chosen"][-1] != pair["rejected"][-1]
    assert any(m["role"] == "system" for conv in conversations for m in conv)
    assert any(len(conv) > 2 for conv in conversations)


@pytest.mark.parametrize("name, keys", [("demo_chat_train.jsonl", ["messages"]), ("demo_chat_valid.jsonl", ["messages"]),
                                        ("demo_chat_pairs.jsonl", ["chosen", "rejected"])])
def test_shipped_set_preprocesses_and_trains_only_the_replies(tmp_path, demo_chat_tokenizer, name, keys):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(demo_chat_tokenizer)
    records = _records(name)
    result = preprocess_chat([str(CHAT / name)], str(tmp_path / "demo"), demo_chat_tokenizer, jsonl_keys=keys,
                             options=ChatOptions())
    assert (result.bad, result.documents) == (0, len(records))
    for key in keys:
        tokens = _read(tmp_path / f"demo_{key}_document")
        labels = _read(tmp_path / f"demo_{key}_label_document")
        for record, doc_tokens, doc_labels in zip(records, tokens, labels):
            conv = record[key]
            # the template as written, by hand: "<|role|>\n" + content + eos + "\n" per turn, then eos
            rendered = "".join(f"<|{m['role']}|>\n{m['content']}{EOS}\n" for m in conv) + EOS
            assert hf.decode(doc_tokens) == rendered
            replies = "".join(f"{m['content']}{EOS}\n" for m in conv if m["role"] == "assistant") + EOS
            assert hf.decode([t for t in doc_labels if t >= 0]) == replies
            # targets sit on their own tokens: a label is either -100 or the token at its position
            assert all(label in (-100, token) for label, token in zip(doc_labels, doc_tokens))
