"""LoRA with pipeline parallelism and through universal checkpoints: one process is the reference.

- A PP=2 x TP=2 LoRA launch (4 ranks, one transformer layer a stage) stops at step 2; its checkpoint holds only
  the adapters (each stage's in GPT-NeoX's per-layer files) and names the base; DeepSpeed's universal checkpoint
  of it resumes at one process (PP=1, TP=1) with the adapters and their Adam states, the base read again from the
  folder it names. Steps 1-2 (PP x TP) and 3-4 (after the change) are one uninterrupted process's, within
  test_parallel_equivalence's bounds (the runs differ in summation order only): losses within LOSS_RTOL relative,
  adapters within WEIGHT_TOL; the base weights are bit-identical to the base checkpoint's. Resharding the step-2
  folder to TP=1 (weights only) reads back the same base and adapters, bit for bit.
- A PP=2 run with dropout on (adapters' and hidden) resumed at PP=2 from its step-2 checkpoint takes steps 3-4 bit
  for bit as it did uninterrupted (the same fp32 operations in the same order), and the merged HF export of a
  PP LoRA checkpoint is the base plus s B A.
"""

import json
import shutil

import pytest
import torch
import yaml

from conftest import read_metrics, run_cli, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint
from neox_fork.checkpoint import universal
from neox_fork.checkpoint.hf import to_hf_state_dict
from neox_fork.model.adapters import merge_into
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

STEPS, STOP, LR = 4, 2, 3e-2
LOSS_RTOL, WEIGHT_TOL = 1e-5, 1e-3 * LR * STEPS  # test_parallel_equivalence's (Adam eps 1e-5 as there)
LORA = dict(adapter="lora", lora_r=4, lora_alpha=8, lora_target_modules="all-linear", finetune=True,
            train_iters=STEPS, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2,
            lr_decay_style="cosine", warmup=0.0, lora_dropout=0.0, hidden_dropout=0.0,
            make_vocab_size_divisible_by=64,  # the base's 640 padded rows at TP 1 and 2
            optimizer={"type": "Adam", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-5}})
PIPE = dict(pipe_parallel_size=2, pipe_partition_method="type:transformer")  # a layer, so adapters, a stage


def _run(folder, corpus, base, nproc=1, **keys):
    folder.mkdir(parents=True)
    config = write_train_config(folder, corpus, **{**LORA, "load": str(base), **keys})
    run_training(config, nproc=nproc)
    return config


def _resume(config, nproc, **changes):
    keys = yaml.safe_load(config.read_text())
    keys.update(exit_interval=None, finetune=False, **changes)
    keys["load"] = keys["save"]
    config.write_text(yaml.safe_dump(keys))
    return run_training(config, nproc=nproc)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, small_corpus, trained_checkpoint):
    folder = tmp_path_factory.mktemp("lora_one")
    _run(folder / "run", small_corpus, trained_checkpoint, train_micro_batch_size_per_gpu=4,
         gradient_accumulation_steps=1)
    return folder / "run" / "ckpt"


def test_pp2_tp2_trains_like_one_process_and_resumes_at_tp1_through_universal(tmp_path, small_corpus,
                                                                            trained_checkpoint, one_process):
    config = _run(tmp_path / "run", small_corpus, trained_checkpoint, nproc=4, model_parallel_size=2,
                  exit_interval=STOP, **PIPE)
    saved = checkpoint.resolve(tmp_path / "run" / "ckpt")
    assert checkpoint.folder_step(saved) == STOP
    # only adapters: each stage's layer files (layer 0 on stage 0, layer 1 on stage 1; the other entries empty),
    # per TP rank
    assert checkpoint.lora_info(saved)["base"] == str(checkpoint.resolve(trained_checkpoint).resolve())
    for f in saved.glob("layer_*-model_*-model_states.pt"):
        names = torch.load(f, weights_only=True)
        assert all(".lora." in n for n in names), (f.name, sorted(names))
    assert sorted(f.name for f in saved.glob("layer_*")) == [
        f"layer_{i:02d}-model_{r:02d}-model_states.pt" for i in range(7) for r in (0, 1)]
    # tools/ckpts/reshard_checkpoint.py: the adapters at TP=1 (mp_rank files) on the same base, read back unchanged
    resharded = checkpoint.reshard(saved, tmp_path / "tp1", 1)
    assert checkpoint.lora_info(resharded)["base"] == checkpoint.lora_info(saved)["base"]
    x, _, _ = checkpoint.load_merged(saved)
    y, _, _ = checkpoint.load_merged(resharded)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    universal.convert(tmp_path / "run" / "ckpt", workers=1)
    out = _resume(config, 1, model_parallel_size=1, pipe_parallel_size=1, train_micro_batch_size_per_gpu=4,
                  gradient_accumulation_steps=1, load_universal=True)
    assert f"at TP=1 x DP=1, iteration {STOP}" in out.stdout
    run, one = read_metrics(tmp_path / "run" / "ckpt"), read_metrics(one_process)
    assert sorted(run) == sorted(one) == list(range(1, STEPS + 1))
    for it in one:
        assert abs(run[it] - one[it]) <= LOSS_RTOL * max(abs(one[it]), 1.0), (it, run[it], one[it])
    a, _, _ = checkpoint.load_merged(one_process)
    b, _, _ = checkpoint.load_merged(tmp_path / "run" / "ckpt")
    base, _, _ = checkpoint.load_merged(trained_checkpoint)
    assert a.keys() == b.keys()
    for name in a:
        if ".lora." in name:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=WEIGHT_TOL, msg=name)
        else:
            assert torch.equal(b[name], base[name]) and torch.equal(a[name], base[name]), name
    assert all(torch.count_nonzero(b[n]) for n in b if n.endswith(".lora.B"))  # B trained away from 0


def test_pp2_resume_with_dropout_is_exact_and_exports(tmp_path, small_corpus, trained_checkpoint):
    dropout = dict(lora_dropout=0.1, hidden_dropout=0.1, **PIPE)
    whole_run = _run(tmp_path / "whole", small_corpus, trained_checkpoint, nproc=2, checkpoint_factor=STOP, **dropout)
    # the run as it stood after step 2 (its step-2 folder, `latest` naming it, its metrics of steps 1-2), resumed
    half = tmp_path / "half" / "ckpt"
    shutil.copytree(tmp_path / "whole" / "ckpt", half, ignore=shutil.ignore_patterns(f"global_step{STEPS}"))
    (half / checkpoint.LATEST_FILE).write_text(f"global_step{STOP}")
    rows = (half / "metrics.jsonl").read_text().splitlines()
    (half / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r)["iteration"] <= STOP))
    config = tmp_path / "half" / "config.yml"
    config.write_text(whole_run.read_text())
    _resume(config, 2, save=str(half))
    whole, again = read_metrics(tmp_path / "whole" / "ckpt"), read_metrics(tmp_path / "half" / "ckpt")
    assert again == whole and sorted(whole) == list(range(1, STEPS + 1))
    a, _, _ = checkpoint.load_merged(tmp_path / "whole" / "ckpt")
    b, _, _ = checkpoint.load_merged(tmp_path / "half" / "ckpt")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the exports read the PP layout: the merged model is the HF mapping of W + s B A (s = alpha / r = 2; the
    # product summed in another order: 1e-6), the PEFT folder holds A and B of every adapted linear
    run = run_cli("tools/convert_to_hf.py", "--input-dir", str(tmp_path / "whole" / "ckpt"), "--output-dir",
                  str(tmp_path / "hf"), "--peft-adapter", str(tmp_path / "peft"))
    assert run.returncode == 0, run.stdout + run.stderr
    saved_config = checkpoint.load_config_of(checkpoint.resolve(tmp_path / "whole" / "ckpt"))
    want = to_hf_state_dict(merge_into(a, 2.0), saved_config)
    got = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        got.update(load_file(f))
    assert want.keys() <= got.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
    peft = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert len(peft) == 2 * 2 * 7  # lora_A and lora_B of q, k, v, o, gate, up, down in 2 layers
