"""bf16 training (fp32 masters in ZeRO-1) lowers the loss; TensorBoard events and checkpoint pruning work; keys
that have no effect here are named at start."""

import pytest
import torch

from conftest import read_metrics, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint

pytestmark = [pytest.mark.slow]


def test_bf16_run_learns_logs_to_tensorboard_and_keeps_the_last_n_checkpoints(tmp_path, small_corpus):
    config = write_train_config(tmp_path, small_corpus, train_iters=12, precision="bfloat16",
                                checkpoint_factor=3, keep_last_n_checkpoints=2, eval_interval=6,
                                tensorboard_dir=str(tmp_path / "tb"), bias_gelu_fusion=True, s3_path="s3://bucket/x")
    run = run_training(config)
    # keys accepted for GPT-NeoX compatibility that do nothing here are named once at start (docs/config.md)
    ignored = [line for line in run.stdout.splitlines() if "no effect here" in line]
    assert len(ignored) == 1 and "bias_gelu_fusion=True, s3_path='s3://bucket/x'" in ignored[0]
    losses = read_metrics(tmp_path / "ckpt")
    assert losses[12] < losses[1] - 0.1
    evals = read_metrics(tmp_path / "ckpt", "eval_lm_loss")
    assert sorted(evals) == [6, 12] and evals[12] < evals[6]
    assert "validation loss" in run.stdout
    kept = sorted(p.name for p in (tmp_path / "ckpt").glob("global_step*"))
    assert kept == ["global_step12", "global_step9"]
    state, config_saved, folder = checkpoint.load_merged(tmp_path / "ckpt")
    assert config_saved.dtype_name == "bf16"
    assert state["layers.0.attention.query_key_value.weight"].dtype == torch.bfloat16
    assert any(p.name.startswith("bf16_zero_pp_rank_0") for p in folder.iterdir())  # fp32 masters live here
    # TensorBoard holds the logged scalars themselves (an empty SummaryWriter file has only its header),
    # stored as float32: each equals metrics.jsonl's float64 within float32 rounding (2^-24 relative)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "tb"))
    board.Reload()
    for key, want in (("lm_loss", losses), ("lr", read_metrics(tmp_path / "ckpt", "lr")), ("eval_lm_loss", evals)):
        got = {event.step: event.value for event in board.Scalars(key)}
        assert sorted(got) == sorted(want), key
        assert all(got[step] == pytest.approx(want[step], rel=2**-24) for step in want), (key, got, want)


def test_eval_tasks_run_during_training_and_reach_metrics(tmp_path, small_corpus, one_process):
    """The accuracy logged at step 2 is the one written out by hand on the weights saved at step 2."""
    from neox_fork.inference.generation import load_for_inference
    from test_eval_in_memory_configs_and_errors import facts_accuracy_by_hand

    config = write_train_config(tmp_path, small_corpus, train_iters=2, eval_interval=2, eval_tasks=["neox_facts"],
                                eval_batch_size=16)
    run = run_training(config)
    accuracy = read_metrics(tmp_path / "ckpt", "neox_facts/acc")
    model, _, tokenizer = load_for_inference(tmp_path / "ckpt", step=2, tp_cooperate=False)
    assert list(accuracy) == [2]
    assert accuracy[2] == facts_accuracy_by_hand(model, tokenizer, limit=None)
    assert "neox_facts/acc " in run.stdout


def test_wandb_offline_run_records_the_metrics(tmp_path, small_corpus, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    config = write_train_config(tmp_path, small_corpus, train_iters=3, use_wandb=True, wandb_project="neox-test")
    run_training(config)
    runs = list((tmp_path / "ckpt" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history = _wandb_history(runs[0])
    # the same float64 values as metrics.jsonl, both written as JSON
    for key in ("lm_loss", "lr", "grad_norm"):
        want = read_metrics(tmp_path / "ckpt", key)
        assert sorted(want) == [1, 2, 3], key
        assert {step: row[key] for step, row in history.items() if key in row} == want, key


def _wandb_history(path):
    """{step: {key: value}} of the history records of a W&B run file: LevelDB's log format (header
    ':W&B' + magic + version, 32 KiB blocks of records with a 7-byte header: crc32, length, type) holding
    wandb_internal_pb2.Record messages, each logged value as JSON."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, history = path.read_bytes(), 32768, 7, b"", {}
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's last bytes too short for a header are padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                # a key is in `key` or, split at dots, in `nested_key` (which one depends on wandb's version)
                row = {item.key or ".".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                history[record.history.step.num] = row
    return history
