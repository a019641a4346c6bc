"""bf16 training (fp32 masters in ZeRO-1) lowers the loss; TensorBoard events and checkpoint pruning work; keys
that have no effect here are named at start."""

import pytest
import torch

from conftest import read_metrics, run_training, write_train_config
from neox_fork import checkpoint

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
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_eval_tasks_run_during_training_and_reach_metrics(tmp_path, small_corpus, one_process):
    """The accuracy logged at step 2 is the one written out by hand on the weights saved at step 2."""
    from neox_fork.generation import load_for_inference
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
    assert runs and runs[0].stat().st_size > 0
