"""A pipelined run's checkpoint is GPT-NeoX's per-layer layout: saved at pipe 2 x tensor 2 (a 4-layer model),
its weights load at pipe 1 and pipe 4 (`finetune: true`) unchanged, its full state resumes at one process
through DeepSpeed's universal checkpoint; generate.py reads it; a full resume at another pipe size is one line naming the
way there; SIGUSR1 to deepy during a pipelined run saves on every stage and exits 0.

"Unchanged" is exact: the fine-tuning runs save their weights at iteration 0 (extra_save_iters), before any
update, and loading and saving only move and concatenate tensors.
"""

import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import PYTHON, REPO, read_metrics, run_cli, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint
from neox_fork.checkpoint import universal
from test_parallel_equivalence import LOSS_RTOL, LR, OPTIMIZER

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


# a 4-step schedule stopped after step 2 (exit_interval), no dropout: the universal resume continues it
RUN = dict(train_iters=4, hidden_dropout=0.0, optimizer=OPTIMIZER, num_layers=4)  # 4 layers: 4 stages fit


@pytest.fixture(scope="module")
def pp2_tp2(tmp_path_factory, small_corpus):
    folder = tmp_path_factory.mktemp("pp2tp2")
    config = write_train_config(folder, small_corpus, exit_interval=2, pipe_parallel_size=2, model_parallel_size=2,
                                make_vocab_size_divisible_by=128, gradient_accumulation_steps=2, **RUN)
    run_training(config, nproc=4)
    assert checkpoint.read_latest(folder / "ckpt") == 2
    return folder / "ckpt"


def finetune_from(tmp_path, small_corpus, source, nproc, **keys):
    ckpt = tmp_path / "ckpt"
    config = write_train_config(tmp_path, small_corpus, train_iters=1, load=str(source), finetune=True,
                                extra_save_iters=[0], make_vocab_size_divisible_by=256 // keys.get(
                                    "model_parallel_size", 1), **keys)
    run_training(config, nproc=nproc)
    return checkpoint.step_dir(ckpt, 0)


def assert_same_weights(a, b):
    wa, _, _ = checkpoint.load_merged(a)
    wb, _, _ = checkpoint.load_merged(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0, msg=name)


def test_pp2_tp2_save_is_upstreams_layer_layout(pp2_tp2):
    folder = checkpoint.resolve(pp2_tp2)
    layers = sorted(p.name for p in folder.glob("layer_*"))
    # every layer-list entry with tensors (0, 2-5, 7, 8; 1 the empty file ds_to_universal wants) per TP rank
    assert layers == [f"layer_{i:02d}-model_{r:02d}-model_states.pt" for i in (0, 1, 2, 3, 4, 5, 7, 8) for r in (0, 1)]
    # DeepSpeed's model states: one file per (stage, TP rank), as upstream's pipelined runs write them
    assert sorted(p.name for p in folder.glob("mp_rank_*")) == [f"mp_rank_{i:02d}_model_states.pt" for i in range(4)]
    assert checkpoint.tp_size_of(folder) == 2 and checkpoint.pp_size_of(folder) == 2


@pytest.mark.parametrize("nproc, keys", [(1, {}), (4, dict(pipe_parallel_size=4, gradient_accumulation_steps=4,
                                                           train_micro_batch_size_per_gpu=1))])
def test_pp2_tp2_weights_load_at_pp1_and_pp4(tmp_path, small_corpus, pp2_tp2, nproc, keys):
    step0 = finetune_from(tmp_path, small_corpus, pp2_tp2, nproc, num_layers=4, **keys)
    assert_same_weights(step0, pp2_tp2)


def test_pp2_tp2_full_state_resumes_at_pp1_through_the_universal_checkpoint(tmp_path, small_corpus, pp2_tp2):
    """Steps 3-4 resumed at one process from the universal checkpoint of the pipe 2 x tensor 2 run's step 2
    equal one process trained 4 steps uninterrupted, within test_parallel_equivalence's bounds (TP sums in
    another order; 1e-3 of lr a step on the weights, 1e-5 relative on the losses): the optimizer moments,
    step count and LR schedule came back, not only the weights."""
    universal.convert(pp2_tp2)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    same_vocab = dict(make_vocab_size_divisible_by=256, train_micro_batch_size_per_gpu=4)  # 768 rows, as at TP 2
    run_training(write_train_config(resumed, small_corpus, load=str(pp2_tp2), load_universal=True, **same_vocab,
                                    **RUN))
    one = tmp_path / "one"
    one.mkdir()
    run_training(write_train_config(one, small_corpus, **same_vocab, **RUN))
    got, want = read_metrics(resumed / "ckpt"), read_metrics(one / "ckpt")
    assert sorted(got) == [3, 4]
    for it in got:
        assert abs(got[it] - want[it]) <= LOSS_RTOL * abs(want[it]), (it, got[it], want[it])
    wa, _, _ = checkpoint.load_merged(resumed / "ckpt")
    wb, _, _ = checkpoint.load_merged(one / "ckpt")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-3 * LR * 4, msg=name)


def test_full_resume_at_another_pipe_size_is_one_line(tmp_path, small_corpus, pp2_tp2):
    config = write_train_config(tmp_path, small_corpus, train_iters=3, load=str(pp2_tp2))
    run = run_training(config, check=False)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert "was saved at pipe_parallel_size 2 but this run uses 1" in last and "finetune: true" in last
    assert "Traceback" not in run.stderr


def test_usr1_to_deepy_during_a_pipelined_run_saves_and_exits_zero(tmp_path, small_corpus):
    config = write_train_config(tmp_path, small_corpus, train_iters=100_000, lr_decay_iters=1000, num_gpus=2,
                                pipe_parallel_size=2, gradient_accumulation_steps=2)
    ckpt = tmp_path / "ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([PYTHON, "deepy.py", "train.py", str(config)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = ckpt / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "all 2 rank(s) saved and stopped on SIGUSR1" in out
    step = checkpoint.read_latest(ckpt)
    assert step == max(read_metrics(ckpt)) >= 2
    folder = checkpoint.step_dir(ckpt, step)
    assert len(list(folder.glob("zero_pp_rank_0_mp_rank_*_optim_states.pt"))) == 2  # both stages saved
    state, _, _ = checkpoint.load_merged(ckpt)
    assert all(torch.isfinite(t).all() for t in state.values())


def test_generate_py_reads_a_pipelined_checkpoint(pp2_tp2, one_process):
    """generate.py (greedy, one process) on the pipe 2 x tensor 2 checkpoint continues a prompt as the
    merged weights do in a model built here, step by step without a cache."""
    import json
    from dataclasses import replace

    from neox_fork.model.transformer import build_model

    run = run_cli("generate.py", "--checkpoint", str(pp2_tp2), "--prompt-ids", "1,2,3",
                  "--temperature", "0", "--max-new-tokens", "6", "--json", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.splitlines()[0])["token_ids"]
    state, config, _ = checkpoint.load_merged(pp2_tp2)
    rows = state["word_embeddings.weight"].shape[0]
    model = build_model(replace(config, model_parallel_size=1, pipe_parallel_size=0, make_vocab_size_divisible_by=1,
                                vocab_size=rows), perform_initialization=False)
    model.load_state_dict(state, strict=False)
    tokens = [1, 2, 3]
    with torch.no_grad():
        for _ in range(6):
            tokens.append(int(model.eval()(torch.tensor([tokens]))[0, -1].argmax()))
    assert got == tokens[3:]


def test_eval_py_scores_a_pipelined_checkpoint_as_lm_eval_hf_scores_its_export(pp2_tp2, tmp_path):
    """eval.py (one process) on the pipe 2 x tensor 2 checkpoint, whose weights lie in GPT-NeoX's per-layer
    files, scores the shipped log-likelihood tasks as `lm_eval --model hf` scores its Hugging Face export
    (bounds: test_eval_matches_lm_eval_hf.py)."""
    from neox_fork.checkpoint.hf import export_folder
    from test_eval_matches_lm_eval_hf import assert_same_scores, lm_eval_hf, our_eval

    tasks = ["neox_facts", "neox_prose"]
    export_folder(pp2_tp2, tmp_path / "hf")
    ours, _ = our_eval(pp2_tp2, tasks, 8, tmp_path / "ours.json")
    assert_same_scores(ours, lm_eval_hf(tmp_path / "hf", tasks, 8), tasks)
