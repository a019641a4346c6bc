"""The 4k -> 16k recipe and the passkey task (docs/long-context.md):
- the passkey generator is deterministic (the shipped tasks/passkey/ is what the tool writes today) and puts the
  key where it says: prompt + answer at most `length` tokens and within one filler unit of it, the key's
  first token at `depth` of the prompt within one filler unit, counted with the tokenizer by hand;
- the StableLM overlay loads on the published file with the fields the recipe names;
- the tiny twin (configs/tiny.yml + configs/tiny-16k.yml, shrunk) fine-tunes from a trained tiny checkpoint at
  4x its length: its losses are finite, its held-out loss past the base's length falls, and its rotary
  frequencies and attention factor are transformers' ROPE_INIT_FUNCTIONS['yarn'] for the twin's fields;
- eval.py scores the fine-tuned checkpoint on passkey tasks end to end, choosing on each sample the choice
  picked by hand from the model's log-probabilities.
"""

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from conftest import NEOX_TOKENIZER, REPO, read_metrics, run_cli
from neox_fork.data.tokenizer import build_tokenizer
from neox_fork.inference import passkey

needs_neox_tokenizer = pytest.mark.skipif(not NEOX_TOKENIZER.exists(),
                                          reason="GPT-NeoX-20B tokenizer not installed (scripts/setup.sh)")


# ---------------------------------------------------------------------- the generator
@needs_neox_tokenizer
def test_shipped_passkey_tasks_are_what_the_tool_writes(tmp_path):
    tok = build_tokenizer("HFTokenizer", str(NEOX_TOKENIZER))  # what the tool's defaults call, in-process
    passkey.write_passkey_tasks(tok.encode, tmp_path / "a", tokenizer_name="gpt-neox-20b/tokenizer.json")
    shipped = REPO / "tasks" / "passkey"
    names = sorted(p.name for p in shipped.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "a").iterdir())
    for name in names:  # byte for byte: the same seed, tokenizer and lengths give the same files
        assert (tmp_path / "a" / name).read_bytes() == (shipped / name).read_bytes(), name


@needs_neox_tokenizer
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_the_key_sits_at_its_depth_and_the_prompt_fills_its_length(depth):
    tok = build_tokenizer("HFTokenizer", str(NEOX_TOKENIZER))
    length = 600
    samples = passkey.make_samples(tok.encode, length, depths=[depth], per_depth=3, seed=5)
    assert samples == passkey.make_samples(tok.encode, length, depths=[depth], per_depth=3, seed=5)
    assert samples != passkey.make_samples(tok.encode, length, depths=[depth], per_depth=3, seed=6)
    unit = len(tok.encode(passkey.FILLER))  # 20 tokens with GPT-NeoX's tokenizer
    for sample, tokens in samples:
        prompt = sample.prompt()
        ids = tok.encode(prompt)
        assert tokens == len(ids)
        whole = len(tok.encode(prompt + " " + sample.key))
        assert length - unit < whole <= length  # one more unit would not fit
        assert sample.choices[sample.answer] == sample.key and len(set(sample.choices)) == 10
        # the key's first token, found by decoding prefixes (no offsets API needed): where the needle starts
        needle_at = prompt.index(" The pass key is")
        first = next(i for i in range(len(ids) + 1) if len(tok.decode(ids[:i])) > needle_at) - 1
        filler_tokens = len(ids) - len(tok.encode(passkey.INTRO + passkey.NEEDLE.format(key=sample.key)
                                                   + passkey.QUESTION))
        intro = len(tok.encode(passkey.INTRO))
        assert first == intro + sample.before * unit  # the parts add up exactly with this tokenizer
        assert abs((first - intro) - depth * filler_tokens) <= unit / 2 + 1
        assert prompt.count(sample.key) == 2 and prompt.endswith(" The pass key is")


def test_the_task_yaml_renders_the_prompt_lm_eval_sees():
    from lm_eval.utils import apply_template

    sample, _ = passkey.make_samples(lambda s: s.split(), 200, depths=[0.5], per_depth=1)[0]
    record = sample.record(200, 0)
    text = passkey.task_yaml("passkey_x", "x.jsonl", generate=False)["doc_to_text"]
    assert apply_template(text, record) == sample.prompt()


# ---------------------------------------------------------------------- the recipe
def test_the_stablelm_overlay_names_the_recipe():
    from neox_fork.config.loading import load_config

    overlay = yaml.safe_load((REPO / "configs" / "stablelm-3b-4e1t-16k.yml").read_text())
    assert overlay["context_parallel_size"] == 4
    c = load_config(REPO / "configs" / "stablelm-3b-4e1t.yml", REPO / "configs" / "stablelm-3b-4e1t-16k.yml")
    assert c.context_parallel_size == 4
    assert (c.seq_length, c.max_position_embeddings) == (16384, 16384)
    assert c.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    assert c.reset_attention_mask and c.reset_position_ids and c.finetune
    assert c.load == "checkpoints/stablelm-3b-4e1t" and c.learning_rate == 2.0e-5 and c.weight_decay == 0.0


# ---------------------------------------------------------------------- the twin, trained
SHAPE = {"num-layers": 2, "hidden-size": 128, "num-workers": 0}


@pytest.fixture(scope="module")
def twin(small_corpus, tmp_path_factory):
    """A tiny base trained at 256 tokens (configs/tiny.yml, shrunk), then the twin's fine-tune at 1,024."""
    tmp = tmp_path_factory.mktemp("long_context_twin")
    data = {"vocab-file": str(small_corpus / "tokenizer.json"),
            "train-data-paths": [str(small_corpus / "train_text_document")],
            "valid-data-paths": [str(small_corpus / "valid_text_document")]}
    base = {**SHAPE, **data, "train-iters": 30, "save": str(tmp / "base"), "load": None, "checkpoint-factor": 30,
            "eval-interval": 1000, "log-interval": 10, "train_micro_batch_size_per_gpu": 4}
    (tmp / "base.yml").write_text(yaml.safe_dump(base))
    env = dict(os.environ, OMP_NUM_THREADS="2")
    run = run_cli("train.py", REPO / "configs" / "tiny.yml", tmp / "base.yml", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    # the shipped twin, with the test's shape, data and folders (and more steps a log line)
    shipped = yaml.safe_load((REPO / "configs" / "tiny-16k.yml").read_text())
    extend = {**SHAPE, **data, "load": str(tmp / "base"), "save": str(tmp / "twin"), "train-iters": 16,
              "log-interval": 1, "eval-interval": 1000, "checkpoint-factor": 16,
              "optimizer": {"type": "Adam", "params": {"lr": 1.0e-3, "betas": [0.9, 0.95], "eps": 1.0e-8}},
              "min_lr": 1.0e-3}
    assert shipped["finetune"] is True and shipped["load"] == "checkpoints/tiny"
    (tmp / "twin.yml").write_text(yaml.safe_dump(extend))
    run = run_cli("train.py", REPO / "configs" / "tiny.yml", REPO / "configs" / "tiny-16k.yml", tmp / "twin.yml",
                  env=env, nproc=2)  # the twin's context_parallel_size 2
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp


def _heldout_loss_past(model, windows, start):
    """Mean next-token loss of `windows` [n, 1025] at the positions from `start` on."""
    with torch.no_grad():
        logits = model.full_logits(model.hidden_states(windows[:, :-1])).float()
    return float(torch.nn.functional.cross_entropy(logits[:, start:].transpose(1, 2), windows[:, start + 1:]))


@pytest.mark.slow
def test_the_twin_finetunes_at_4x_with_yarn_scaled_rotary(twin, small_corpus):
    from transformers import StableLmConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from neox_fork.inference.generation import load_for_inference

    losses = read_metrics(twin / "twin", "lm_loss")
    assert sorted(losses) == list(range(1, 17)) and all(math.isfinite(v) for v in losses.values())
    # held out, past the base's 256 positions: 8 windows of 1,024 tokens of the validation documents, before
    # (the base, plain rotary) and after the fine-tune. Measured 5.492 -> 5.457: a 0.035-nat gap, where fp32
    # rounding between machines is orders of magnitude below that.
    tok = build_tokenizer("HFTokenizer", str(small_corpus / "tokenizer.json"))
    ids = []
    for line in (small_corpus / "valid.jsonl").read_text().splitlines():
        ids += tok.encode(json.loads(line)["text"]) + [tok.eod]
    windows = torch.tensor([ids[i * 1025:(i + 1) * 1025] for i in range(8)])
    before = _heldout_loss_past(load_for_inference(twin / "base")[0], windows, 256)
    model, config, _ = load_for_inference(twin / "twin")
    after = _heldout_loss_past(model, windows, 256)
    assert after < before, (before, after)
    assert config.finetune and config.seq_length == 1024 and config.reset_attention_mask
    assert config.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    hf = StableLmConfig(hidden_size=128, num_attention_heads=4, partial_rotary_factor=0.25,
                        max_position_embeddings=1024,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                         "factor": 4.0, "original_max_position_embeddings": 256})
    theirs, their_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, None)
    assert theirs.shape == (4,) and their_factor == pytest.approx(0.1 * math.log(4) + 1)
    assert torch.equal(model.rotary.inv_freq.cpu(), theirs)
    assert model.rotary.attention_factor == their_factor


@pytest.mark.slow
def test_eval_py_scores_passkey_as_the_model_log_probabilities_say(twin, small_corpus):
    """The tiny twin picks distractors (acc 0 here), so an accuracy alone would prove little: the reference picks
    each sample's choice from the model's log-probabilities by hand, the tasks' answers are then set to that choice
    on even samples and to another on odd ones, and eval.py's acc must be exactly the even samples' share."""
    from neox_fork.inference.generation import load_for_inference

    tasks = twin / "tasks"
    tok = build_tokenizer("HFTokenizer", str(small_corpus / "tokenizer.json"))
    passkey.write_passkey_tasks(tok.encode, tasks, lengths=[300, 1024], depths=[0.0, 1.0], per_depth=2,
                                generate=False)
    model, _, _ = load_for_inference(twin / "twin")
    expected = {}
    for name in ("passkey_300", "passkey_1k"):
        records = [json.loads(line) for line in (tasks / f"{name}.jsonl").read_text().splitlines()]
        for n, r in enumerate(records):  # the reference: our model's summed log-probability of " KEY" after the prompt
            text = r["intro"] + r["filler"] * r["before"] + r["needle"] + r["filler"] * r["after"] + r["question"]
            prompt = tok.encode(text)
            scores = []
            for choice in r["choices"]:
                ids = tok.encode(text + " " + choice)  # as lm-eval splits context and continuation
                assert ids[:len(prompt)] == prompt
                with torch.no_grad():
                    logits = model.full_logits(model.hidden_states(torch.tensor([ids[:-1]])))[0].float()
                picked = torch.tensor(ids[len(prompt):])[:, None]
                scores.append(float(torch.log_softmax(logits, -1)[len(prompt) - 1:].gather(1, picked).sum()))
            best = max(range(len(scores)), key=scores.__getitem__)
            r["answer"] = best if n % 2 == 0 else (best + 1) % len(scores)
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        expected[name] = sum(n % 2 == 0 for n in range(len(records))) / len(records)
    out = twin / "results.json"
    run = run_cli("eval.py", "--checkpoint", str(twin / "twin"), "--tasks", "passkey", "--include-path",
                  str(tasks), "--output", str(out), "--batch-size", "4")
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    for name, acc in expected.items():
        assert results[name]["acc,none"] == acc, name
    assert results["passkey"]["acc,none"] == pytest.approx(0.5)  # the group: the mean over both lengths' samples


@pytest.mark.slow
def test_deepy_passes_the_task_folders_on_to_eval_py():
    run = run_cli("deepy.py", "eval.py", "-d", "configs", "tiny.yml", "tiny-16k.yml", "--eval_tasks", "passkey",
                  "--include-path", "data/a", "--include_path", "data/b", "--dry-run")
    assert run.returncode == 0, run.stderr[-2000:]
    command = next(line for line in run.stdout.splitlines() if line.startswith("command:"))
    assert command.endswith("eval.py configs/tiny.yml configs/tiny-16k.yml --eval_tasks passkey "
                            "--include-path data/a --include-path data/b"), command
