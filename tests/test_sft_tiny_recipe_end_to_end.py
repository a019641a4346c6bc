"""The tiny SFT recipe end to end: the shipped chat set (examples/chat) preprocessed with the shipped template,
trained with configs/tiny.yml + configs/tiny-sft.yml (masked to the replies; shrunk and from scratch here, so it
fits in about a minute), exported; transformers' apply_chat_template + generate on the export answers training
questions with the trained answers, and generate.py --chat prints exactly what transformers does."""

import io
import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, run_cli
from neox_fork.checkpoint.hf import export_folder

CHAT = REPO / "examples" / "chat"
QUESTIONS = 6  # single-turn training questions asked after training
MEMORISED = 5  # of which at least this many must come back word for word (loss ends near 0.02 here)

pytestmark = pytest.mark.slow


def _training_questions():
    pairs = {}
    for line in (CHAT / "demo_chat_train.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        if len(messages) == 2:
            pairs.setdefault(messages[0]["content"], messages[1]["content"])
    return list(pairs.items())[::6][:QUESTIONS]  # spread over the set's facts


@pytest.fixture(scope="module")
def sft_run(sft_chat_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sftchat_recipe")
    overlay = {  # the shipped overlay's data keys, pointed at the session's preprocessed chat set
        "vocab-file": str(Path(sft_chat_data["tokenizer"]) / "tokenizer.json"),
        "train-data-paths": [sft_chat_data["train"][0]], "train-label-data-paths": [sft_chat_data["train"][1]],
        "valid-data-paths": [sft_chat_data["valid"][0]], "valid-label-data-paths": [sft_chat_data["valid"][1]],
        # from scratch at the tests' width, where the recipe fine-tunes the pretrained tiny model
        "load": None, "finetune": False, "save": str(tmp / "ckpt"), "num-layers": 2, "hidden-size": 128,
        "train-iters": 100, "checkpoint-factor": 100, "eval-interval": 100, "eval-iters": 2,
        "optimizer": {"type": "Adam", "params": {"lr": 5.0e-3, "betas": [0.9, 0.95]}}, "min_lr": 5.0e-4,
        "num-workers": 0, "log-interval": 10,
    }
    shipped = yaml.safe_load((REPO / "configs" / "tiny-sft.yml").read_text())
    assert {k for k in overlay if "data-paths" in k} <= set(shipped)  # the overlay replaces the shipped data keys
    (tmp / "test.yml").write_text(yaml.safe_dump(overlay))
    run = run_cli("train.py", REPO / "configs" / "tiny.yml", REPO / "configs" / "tiny-sft.yml", tmp / "test.yml",
                  timeout=900, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert run.returncode == 0, run.stderr[-3000:]
    export_folder(tmp / "ckpt", tmp / "hf")
    return tmp


def test_the_export_answers_training_questions_with_the_trained_answers(sft_run, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neox_fork.parallel import groups as parallel

    step = sft_run / "ckpt" / (sft_run / "ckpt" / "latest").read_text().strip()
    assert yaml.safe_load((step / "config.yml").read_text())["train_label_data_paths"]  # it trained masked
    tok = AutoTokenizer.from_pretrained(sft_run / "hf")
    model = AutoModelForCausalLM.from_pretrained(sft_run / "hf").eval()
    questions = _training_questions()
    replies = []
    for question, _ in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=48, do_sample=False, temperature=None, top_p=None)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        assert new[-1] == tok.eos_token_id  # the reply ends its turn well before max_new_tokens
        replies.append(tok.decode(new, skip_special_tokens=True).strip())
    matched = sum(reply == answer for reply, (_, answer) in zip(replies, questions))
    assert matched >= MEMORISED, list(zip(replies, questions))

    # generate.py --chat on the checkpoint: the same replies, each alone on its line
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    capsys.readouterr()
    args = ["--checkpoint", str(sft_run / "ckpt"), "--chat", "--max-new-tokens", "48"]
    for question, _ in questions:
        args += ["--prompt", question]
    try:
        runpy.run_path(str(REPO / "generate.py"))["main"](args)
    finally:
        parallel.destroy()
    assert capsys.readouterr().out.splitlines() == replies
