"""Every writer of ours that can fill a disk (the Hugging Face export, preprocessing, resharding, universal
conversion, result files) reports a full filesystem in one line naming the path, and leaves nothing half
written: the filesystem holds afterwards exactly what it held before."""

import shutil

import pytest

from conftest import run_cli
from neox_fork.checkpoint import store as checkpoint
from neox_fork.checkpoint import universal
from neox_fork.data.preprocess import preprocess
from neox_fork.errors import UserError

pytestmark = [pytest.mark.slow]


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_the_hugging_face_export_onto_a_full_filesystem_is_one_line_and_writes_nothing(trained_checkpoint,
                                                                                      small_tmpfs):
    full = small_tmpfs("256k")  # the model's fp32 weights take 0.76 MB
    out = full / "hf"
    done = run_cli("tools/convert_to_hf.py", "--input-dir", str(trained_checkpoint),
                   "--output-dir", str(out), timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    # the tiny model's 189,056 parameters (training logs that count) in fp32; the tmpfs's 256 KiB free
    assert lines[0] == (f"error: {out}: the filesystem is full (no space left on device); the converted model "
                        f"needs about {189_056 * 4 / 1000:.1f} kB, {256 * 1024 / 1000:.1f} kB free there"), lines[0]
    assert listing(full) == []


def test_preprocessing_onto_a_full_filesystem_is_one_line_and_writes_nothing(small_corpus, small_tmpfs):
    full = small_tmpfs("64k")  # the tokens of train.jsonl take about 0.3 MB
    prefix = full / "data" / "train"
    with pytest.raises(UserError) as err:
        preprocess([str(small_corpus / "train.jsonl")], str(prefix), str(small_corpus / "tokenizer.json"))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{prefix.parent}: the filesystem is full (no space left on device); "), message
    assert listing(full) == ["data"]  # the folder it made; no .bin/.idx or temporary file


def test_resharding_and_results_onto_a_full_filesystem_are_one_line_and_write_nothing(trained_checkpoint,
                                                                                     small_tmpfs):
    full = small_tmpfs("256k")
    with pytest.raises(UserError) as err:
        checkpoint.reshard(trained_checkpoint, full / "tp2", 2)
    assert str(err.value).startswith(f"{full / 'tp2'}: the filesystem is full (no space left on device); "
                                     "the converted model needs about 7"), str(err.value)  # 0.76 MB and buffers
    assert listing(full) == ["tp2"]  # the checkpoint folder, without a step folder, `latest` or a partial one
    results = full / "eval" / "results.json"
    results.parent.mkdir()
    results.write_text("{}")  # an earlier result stays as it was
    with pytest.raises(UserError) as err:
        checkpoint.write_atomic(results, "x" * 1_000_000)  # what evaluation writes its results with
    assert str(err.value).startswith(f"{results}: the filesystem is full (no space left on device); ")
    assert results.read_text() == "{}" and listing(full) == ["eval", "eval/results.json", "tp2"]


def test_universal_conversion_onto_a_full_filesystem_is_one_line_and_writes_nothing(trained_checkpoint,
                                                                                   small_tmpfs):
    step = checkpoint.read_latest(trained_checkpoint)
    size = sum(f.stat().st_size for f in checkpoint.step_dir(trained_checkpoint, step).iterdir())
    full = small_tmpfs(f"{size + 1_000_000}")  # the step fits, its conversion (larger still) does not
    ckpt = full / "ckpt"
    ckpt.mkdir()
    shutil.copytree(checkpoint.step_dir(trained_checkpoint, step), checkpoint.step_dir(ckpt, step))
    (ckpt / "latest").write_text(checkpoint.step_name(step))
    before = listing(full)
    with pytest.raises(UserError) as err:
        universal.convert(ckpt, workers=1)
    out = checkpoint.universal_dir(ckpt, step)
    assert str(err.value).startswith(f"{out}: the filesystem is full (no space left on device); a copy of "
                                     f"{checkpoint.step_name(step)} needs about "), str(err.value)
    assert listing(full) == before
