"""Preprocessing writes exactly the tokenizer's ids, for every input format, with any worker count."""

import gzip
import json
from pathlib import Path

import numpy
import pytest
import zstandard

import conftest
from neox_fork.data._megatron import indexed_dataset
from neox_fork.data.preprocess import preprocess
from neox_fork.data.tokenizer import build_tokenizer

NEOX_TOKENIZER = str(conftest.NEOX_TOKENIZER)

DOCS = [
    "Hello world.",
    "def f(x):\n    return x * 2\n",
    "Ünïcödé, emoji 🙂 and tabs\tand  double  spaces.",
    "A longer paragraph. " * 40,
    "\n\nleading newlines",
]


def _write_inputs(folder: Path, fmt: str) -> list[str]:
    lines = "".join(json.dumps({"text": doc, "meta": i}) + "\n" for i, doc in enumerate(DOCS))
    if fmt == "jsonl":
        (folder / "in.jsonl").write_text(lines)
        return [str(folder / "in.jsonl")]
    if fmt == "jsonl.gz":
        (folder / "in.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
        return [str(folder / "in.jsonl.gz")]
    if fmt == "jsonl.zst":
        (folder / "in.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
        return [str(folder / "in.jsonl.zst")]
    for i, doc in enumerate(DOCS):  # one .txt file per document, matched by a glob in sorted order
        (folder / f"doc{i:02d}.txt").write_text(doc)
    return [str(folder / "*.txt")]


@pytest.mark.parametrize("append_eod", [False, True])
@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "txt"])
def test_indexed_dataset_reads_back_the_tokenizer_ids(tmp_path, fmt, append_eod):
    inputs = _write_inputs(tmp_path, fmt)
    result = preprocess(inputs, str(tmp_path / "out" / "corpus"), NEOX_TOKENIZER, append_eod=append_eod)
    tokenizer = build_tokenizer("HFTokenizer", NEOX_TOKENIZER)
    expected = [tokenizer.encode(doc) + ([tokenizer.eod] if append_eod else []) for doc in DOCS]

    assert result.outputs == [str(tmp_path / "out" / "corpus_text_document")]
    dataset = indexed_dataset().IndexedDataset(result.outputs[0])
    assert dataset.index.dtype == numpy.uint16  # 50277 ids fit; Megatron's rule is < 65500
    assert len(dataset) == len(DOCS) == result.documents
    assert [dataset[i].tolist() for i in range(len(DOCS))] == expected
    assert result.tokens == sum(map(len, expected))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["corpus_text_document.bin", "corpus_text_document.idx"]


def test_several_jsonl_keys_give_one_dataset_each(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"q": f"question {i}", "a": f"answer {i}!"}) + "\n" for i in range(5)))
    result = preprocess([str(path)], str(tmp_path / "qa"), NEOX_TOKENIZER, jsonl_keys=["q", "a"])
    tokenizer = build_tokenizer("HFTokenizer", NEOX_TOKENIZER)
    answers = indexed_dataset().IndexedDataset(str(tmp_path / "qa_a_document"))
    assert result.outputs == [str(tmp_path / "qa_q_document"), str(tmp_path / "qa_a_document")]
    assert answers[3].tolist() == tokenizer.encode("answer 3!")


def test_multi_worker_output_is_byte_identical_to_single_worker(tmp_path):
    rng = numpy.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "δέλτα", "\n", "def", "(", ")", "  ", "42"]
    path = tmp_path / "many.jsonl"
    with open(path, "w") as stream:
        for i in range(600):
            text = " ".join(rng.choice(words, size=int(rng.integers(1, 200))))
            stream.write(json.dumps({"text": text}) + "\n")
    outputs = {}
    for workers in (1, 2, 3):
        # Small chunks: many chunks finish out of order across workers.
        result = preprocess([str(path)], str(tmp_path / f"w{workers}"), NEOX_TOKENIZER,
                            append_eod=True, workers=workers, chunk_records=7)
        prefix = result.outputs[0]
        outputs[workers] = (Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes())
        assert result.documents == 600
    assert outputs[2] == outputs[1]
    assert outputs[3] == outputs[1]
