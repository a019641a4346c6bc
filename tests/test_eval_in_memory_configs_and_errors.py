"""evaluate_model on an in-memory model (as the training loop calls it), eval.py with NeoX configs, and
one-line errors for an unknown task, a checkpoint without a tokenizer and bad task data."""

import json
import random

import pytest
import torch
import yaml

from conftest import run_cli, tiny_keys
from neox_fork.checkpoint import store as checkpoint
from neox_fork.config.loading import from_dict
from neox_fork.data.tokenizer import build_tokenizer
from neox_fork.errors import UserError
from neox_fork.inference.evaluation import evaluate_checkpoint, evaluate_model, results_table
from neox_fork.model.transformer import build_model
from test_generate_matches_transformers import trained_looking_checkpoint


def facts_accuracy_by_hand(model, tokenizer, limit):
    """neox_facts scored as its YAML says, written out: the first `limit` questions, the choice with the
    highest log-likelihood of " " + choice after "Question: ...\nAnswer:" (lm-eval's pair encoding)."""
    from neox_fork.inference.evaluation import TASKS_DIR

    model.eval()
    lines = (TASKS_DIR / "neox_facts" / "facts.jsonl").read_text().splitlines()[:limit]
    right = 0
    for doc in map(json.loads, lines):
        context = f"Question: {doc['question']}\nAnswer:"
        scores = []
        for choice in doc["choices"]:
            whole, ctx = tokenizer.encode(context + " " + choice), tokenizer.encode(context)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).double(), -1)[0]
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        right += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    return right / len(lines)


def test_evaluate_model_in_memory_restores_mode_and_rng(one_process, tmp_path):
    model = trained_looking_checkpoint(tmp_path / "ckpt", seed=9)
    tokenizer = build_tokenizer("HFTokenizer", str(tmp_path / "ckpt" / "global_step7" / "tokenizer.json"))
    model.train()
    torch.manual_seed(123)
    random.seed(123)
    expected_torch, expected_random = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(123)
    out = evaluate_model(model, tokenizer, ["neox_facts", "neox_prose"], limit=8, batch_size=4)
    assert model.training
    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_random
    assert out["results"]["neox_facts"]["acc,none"] == facts_accuracy_by_hand(model, tokenizer, limit=8)
    assert out["results"]["neox_prose"]["word_perplexity,none"] > 1.0
    json.dumps(out)  # JSON-safe for the metrics log
    assert "| neox_prose | 0 | bits_per_byte |" in results_table(out)


@pytest.mark.slow
def test_eval_py_takes_tasks_batch_size_and_checkpoint_from_configs(one_process, tmp_path):
    trained_looking_checkpoint(tmp_path / "ckpt", seed=10)
    config = tmp_path / "eval.yml"
    config.write_text(yaml.safe_dump({"eval_tasks": ["neox_facts"], "eval_batch_size": 3,
                                      "load": str(tmp_path / "ckpt")}))
    done = run_cli("eval.py", str(config), "--limit", "5")
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "ckpt" / "eval" / "results_step7.json").read_text())
    assert list(results["results"]) == ["neox_facts"] and results["checkpoint"]["step"] == 7
    assert "| neox_facts | 0 | acc |" in done.stdout


@pytest.mark.slow
def test_bad_input_gives_one_line_errors(one_process, tmp_path):
    trained_looking_checkpoint(tmp_path / "ckpt", seed=11)
    done = run_cli("eval.py", "--checkpoint", str(tmp_path / "ckpt"), "--tasks", "neox_facts,nope")
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown task(s) nope; available in") and "neox_arith, neox_facts, neox_prose" in last

    config = from_dict(tiny_keys())
    checkpoint.save_model_checkpoint(tmp_path / "bare", 3, [checkpoint.model_state(build_model(config))], config)
    with pytest.raises(UserError, match="has no tokenizer.json"):
        evaluate_checkpoint(tmp_path / "bare", ["neox_facts"])

    task = tmp_path / "mytasks" / "broken"
    task.mkdir(parents=True)
    (task / "broken.yaml").write_text(yaml.safe_dump({
        "task": "broken", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "missing.jsonl"}},
        "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}"}))
    with pytest.raises(UserError, match=r"broken.yaml: data_files entry 'missing.jsonl' not found"):
        evaluate_checkpoint(tmp_path / "ckpt", ["broken"], include_path=tmp_path / "mytasks")
    with pytest.raises(UserError, match="no tasks given"):
        evaluate_checkpoint(tmp_path / "ckpt", [])
