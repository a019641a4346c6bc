"""eval.py on our checkpoint scores the shipped local tasks exactly as `lm_eval --model hf` scores the
exported Hugging Face folder (same accuracies, perplexities within 1e-4), offline."""

import json
import os
import tempfile
from pathlib import Path

import pytest

from conftest import run_cli
from neox_fork.inference.evaluation import TASKS_DIR, task_manager
from neox_fork.checkpoint.hf import export_folder
from test_generate_matches_transformers import trained_looking_checkpoint

pytestmark = [pytest.mark.slow]

TASKS = ["neox_facts", "neox_prose", "neox_arith"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from neox_fork.parallel import groups as parallel

    root = tmp_path_factory.mktemp("eval_parity")
    parallel.initialize(1)
    trained_looking_checkpoint(root / "ckpt", seed=8)
    parallel.destroy()
    export_folder(root / "ckpt", root / "hf")
    # The exported generation_config.json sets max_new_tokens=64, which would override lm-eval's
    # max_gen_toks in transformers' generate; drop it so both sides stop at the task's limit.
    config = root / "hf" / "generation_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "max_new_tokens"}))
    return root


def lm_eval_hf(hf_dir, tasks, limit):
    import lm_eval

    os.environ.pop("LOCAL_RANK", None)  # set by our one-process gloo group; accelerate would try env://
    with tempfile.TemporaryDirectory() as tmp:
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=tasks,
                                      device="cpu", batch_size=4, limit=limit, log_samples=False,
                                      task_manager=task_manager(TASKS_DIR, workdir=Path(tmp)))
    return out["results"]


def our_eval(ckpt, tasks, limit, output, *extra):
    done = run_cli("eval.py", "--checkpoint", str(ckpt), "--tasks", ",".join(tasks), "--limit",
                   str(limit), "--batch-size", "4", "--output", str(output), *map(str, extra))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(Path(output).read_text())["results"], done.stdout


def assert_same_scores(ours, theirs, tasks):
    for task in tasks:
        for key, value in theirs[task].items():
            if key == "alias" or "_stderr" in key:
                continue
            if "perplexity" in key or "bits_per_byte" in key:
                assert ours[task][key] == pytest.approx(value, rel=1e-4), (task, key)
            else:
                assert ours[task][key] == value, (task, key)


def test_eval_py_equals_lm_eval_hf_on_shipped_tasks(exported):
    ours, table = our_eval(exported / "ckpt", TASKS, 16, exported / "ours.json")
    theirs = lm_eval_hf(exported / "hf", TASKS, 16)
    assert_same_scores(ours, theirs, TASKS)
    assert "| neox_facts | 0 | acc |" in table and "| neox_prose | 0 | word_perplexity |" in table


def test_requests_at_a_short_context_match_lm_eval_hf_request_by_request(exported):
    """24-token context: truncated few-shot prompts, documents split into rolling windows, an empty
    context, stop strings; every log-likelihood within 1e-4 and every generation equal."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from neox_fork.parallel import groups as parallel
    from neox_fork.inference.evaluation import NeoxLM
    from neox_fork.inference.generation import load_for_inference

    model, _, tokenizer = load_for_inference(exported / "ckpt")
    ours = NeoxLM(model, tokenizer, batch_size=3, max_length=24)
    os.environ.pop("LOCAL_RANK", None)
    theirs = HFLM(pretrained=str(exported / "hf"), dtype="float32", device="cpu", batch_size=2, max_length=24)
    docs = [json.loads(line)["text"] for line in (TASKS_DIR / "neox_prose" / "prose.jsonl").read_text().splitlines()]
    shots = "Question: What is the capital of Spain?\nAnswer: Madrid\n\nQuestion: How many legs does a dog have?"
    pairs = [(shots + "\nAnswer:", " four"), ("Question: What color is snow?\nAnswer:", " white"),
             ("", "Hello world"), ("The river runs", " through the middle of the town and on to the sea")]
    def requests(kind, args):
        return [Instance(kind, {}, a, i) for i, a in enumerate(args)]

    for (lp, greedy), (lp_hf, greedy_hf) in zip(ours.loglikelihood(requests("loglikelihood", pairs)),
                                                theirs.loglikelihood(requests("loglikelihood", pairs))):
        assert lp == pytest.approx(lp_hf, rel=1e-4, abs=1e-4) and greedy == greedy_hf
    rolling = requests("loglikelihood_rolling", [(d,) for d in docs[:4]])
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(theirs.loglikelihood_rolling(rolling), rel=1e-4)
    until = {"until": ["\n", "."], "max_gen_toks": 6, "do_sample": False}
    gens = requests("generate_until", [(shots[:60], until), ("Once upon a", until), (docs[0][:80], until)])
    generated = ours.generate_until(gens)
    assert generated == theirs.generate_until(gens) and all(generated)
    stop_inside = [(a[0], {**until, "until": [generated[i][4:7]]}) for i, a in enumerate(r.args for r in gens)]
    stopped = ours.generate_until(requests("generate_until", stop_inside))
    assert stopped == theirs.generate_until(requests("generate_until", stop_inside))
    assert [len(s) for s in stopped] == [4, 4, 4]
    parallel.destroy()
