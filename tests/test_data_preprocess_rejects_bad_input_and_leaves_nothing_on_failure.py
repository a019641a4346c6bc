"""Bad input gives a one-line error naming file:line; a failed or interrupted run leaves no files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import conftest
from neox_fork.data import preprocess as preprocess_module
from neox_fork.data.preprocess import preprocess
from neox_fork.errors import UserError

REPO = Path(__file__).resolve().parents[1]
NEOX_TOKENIZER = str(conftest.NEOX_TOKENIZER)


def _jsonl(path: Path, good: int, bad_lines=()) -> Path:
    lines = [json.dumps({"text": f"document number {i}"}) for i in range(good)]
    lines.extend(bad_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_too_many_malformed_lines_fail_with_file_and_line_and_write_nothing(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", 10, ["{broken", json.dumps({"txt": "x"}), json.dumps({"text": 5}), "[1]"])
    with pytest.raises(UserError) as err:
        preprocess([str(src)], str(tmp_path / "out"), NEOX_TOKENIZER, max_bad_fraction=0.1)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("4 of 14 input records are malformed (28.6% > --max-bad-fraction 0.1); first: ")
    assert f"{src}:11: invalid JSON (Expecting property name enclosed in double quotes at column 2)" in message
    assert f"{src}:12: missing key 'text'" in message
    assert f"{src}:13: key 'text' is int, expected a string" in message
    assert f"{src}:14: expected a JSON object, got list" in message
    assert _listing(tmp_path) == ["in.jsonl"]


def test_malformed_lines_under_the_threshold_are_skipped_and_reported(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", 99, ["{broken"])
    result = preprocess([str(src)], str(tmp_path / "out"), NEOX_TOKENIZER, max_bad_fraction=0.01)
    assert (result.documents, result.bad, result.records) == (99, 1, 100)
    assert result.bad_examples == [f"{src}:100: invalid JSON (Expecting property name enclosed in double quotes at column 2)"]


def test_invalid_utf8_is_a_malformed_record(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(UserError, match=rf"{src}:2: not valid UTF-8 at byte 10"):
        preprocess([str(src)], str(tmp_path / "out"), NEOX_TOKENIZER)


@pytest.mark.parametrize(
    "inputs, expected",
    [
        (["{tmp}/nothing-*.jsonl"], "--input {tmp}/nothing-*.jsonl: the glob matches no files"),
        (["{tmp}/absent.jsonl"], "--input {tmp}/absent.jsonl: no such file"),
        (["{tmp}/data.csv"], "--input {tmp}/data.csv: unsupported file type; valid: .jsonl, .jsonl.gz, .jsonl.zst, .txt"),
        (["{tmp}/blank.jsonl"], "--input {tmp}/blank.jsonl: no non-empty documents found"),
        (["{tmp}/empty.txt"], "--input {tmp}/empty.txt: no non-empty documents found"),
        (["{tmp}/fake.jsonl.gz"], "--input {tmp}/fake.jsonl.gz: cannot read or decompress"),
        (["{tmp}/fake.jsonl.zst"], "--input {tmp}/fake.jsonl.zst: cannot read or decompress"),
    ],
)
def test_unusable_inputs_are_one_line_errors_naming_the_path(tmp_path, inputs, expected):
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "fake.jsonl.gz").write_bytes(b"not gzip at all")
    (tmp_path / "fake.jsonl.zst").write_bytes(b"not zstd at all")
    before = _listing(tmp_path)
    with pytest.raises(UserError) as err:
        preprocess([p.format(tmp=tmp_path) for p in inputs], str(tmp_path / "out"), NEOX_TOKENIZER)
    assert str(err.value).startswith(expected.format(tmp=tmp_path))
    assert _listing(tmp_path) == before


def test_a_worker_failing_midway_leaves_no_output_or_temp_files(tmp_path, monkeypatch):
    src = _jsonl(tmp_path / "in.jsonl", 400)
    real_call = preprocess_module._ChunkEncoder.__call__

    def failing_call(self, chunk):
        if any(b"document number 250" in record.raw for record in chunk):
            raise RuntimeError("worker exploded")
        return real_call(self, chunk)

    # Workers are forked, so they inherit the patched method.
    monkeypatch.setattr(preprocess_module._ChunkEncoder, "__call__", failing_call)
    with pytest.raises(RuntimeError, match="worker exploded"):
        preprocess([str(src)], str(tmp_path / "out"), NEOX_TOKENIZER, workers=2, chunk_records=10)
    assert _listing(tmp_path) == ["in.jsonl"]


def test_sigterm_during_preprocessing_leaves_no_output_or_temp_files(tmp_path):
    src = tmp_path / "big.jsonl"
    line = json.dumps({"text": "Some words to tokenize, again and again. " * 200}) + "\n"
    src.write_text(line * 4000)  # ~33 MB: several seconds of tokenizing
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "datasets" / "preprocess_data.py"), "--input", str(src),
         "--output-prefix", str(out / "big"), "--vocab-file", NEOX_TOKENIZER, "--workers", "2", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    deadline = time.time() + 60
    while not any(".tmp-" in name for name in os.listdir(out)):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "temporary output never appeared"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert os.listdir(out) == []


def test_cli_prints_error_line_and_exits_2(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "datasets" / "preprocess_data.py"),
         "--input", str(tmp_path / "none.jsonl"), "--output-prefix", str(tmp_path / "x"), "--vocab-file", NEOX_TOKENIZER],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"error: --input {tmp_path / 'none.jsonl'}: no such file"
    assert "Traceback" not in done.stderr
