"""GPT-NeoX's own workflow, end to end through deepy.py with upstream-style config files: a Pythia-style and a
Llama-style model train (`deepy.py train.py -d DIR model.yml local_setup.yml`), sample from a
text_generation.yml (`deepy.py generate.py -d DIR ... text_generation.yml`) and evaluate
(`deepy.py eval.py -d DIR ... --eval_tasks neox_facts`). Greedy samples are checked against transformers'
greedy generate on the Hugging Face export, TP=2 sampling against the same, and the task accuracy against
neox_facts scored by hand."""

import json
import os
import subprocess

import pytest
import torch

from conftest import PYTHON, REPO
from neox_fork.data.tokenizer import build_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

RECORD_KEYS = {"context", "text", "length", "finished", "message", "duration_seconds"}
PROMPTS = ["def main():", "import os", "The file is"]
MAX_TOKENS = 10
FAMILIES = {
    # Pythia: parallel residual, partial rotary, LayerNorm, GeLU, untied output layer
    "pythia": dict(pos_emb="rotary", rotary_pct=0.25, gpt_j_residual=True, norm="layernorm", activation="gelu",
                   no_weight_tying=True),
    # Llama: RMSNorm, full rotary, SwiGLU (upstream's 2/3 sizing), no biases, untied output layer
    "llama": dict(pos_emb="rotary", rotary_pct=1.0, norm="rmsnorm", rms_norm_epsilon=1e-6, activation="swiglu",
                  intermediate_size=256, mlp_multiple_of=32, use_bias_in_norms=False, use_bias_in_attn_linear=False,
                  use_bias_in_mlp=False, no_weight_tying=True),
}


def write(path, keys):
    path.write_text(json.dumps(keys, indent=2))  # upstream's config files are YAML in JSON style
    return path.name


def deepy(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([PYTHON, "deepy.py", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert done.returncode == 0, f"deepy {args[0]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def run(request, tmp_path_factory, small_corpus):
    """One short training run per family through deepy, in a folder of upstream-style config files."""
    family = request.param
    conf = tmp_path_factory.mktemp(f"neoxgen_{family}")
    model = write(conf / f"{family}.yml", dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64, max_position_embeddings=64,
        **FAMILIES[family], train_micro_batch_size_per_gpu=2, train_iters=3, log_interval=1, eval_interval=1000,
        eval_iters=1, optimizer={"type": "Adam", "params": {"lr": 3e-3, "betas": [0.9, 0.95]}}, warmup=0.1,
        seed=5, num_workers=0, distributed_backend="gloo"))
    local = write(conf / "local_setup.yml", dict(
        train_data_paths=[str(small_corpus / "train_text_document")],
        valid_data_paths=[str(small_corpus / "valid_text_document")],
        tokenizer_type="HFTokenizer", vocab_file=str(small_corpus / "tokenizer.json"),
        save=str(conf / "checkpoints"), load=str(conf / "checkpoints")))
    (conf / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n\n  \n" + PROMPTS[2] + "\n")  # blanks are dropped
    textgen = write(conf / "text_generation.yml", dict(
        text_gen_type="input-file", maximum_tokens=MAX_TOKENS, prompt_end="\n", temperature=0.0, top_p=0.0, top_k=0,
        recompute=False, num_samples=10, sample_input_file=str(conf / "prompts.txt"),
        sample_output_file=str(conf / "samples.jsonl")))
    deepy("train.py", "-d", conf, model, local)
    return family, conf, [model, local], textgen


def hf_greedy(run, prompts, max_new_tokens):
    """transformers' greedy generate on the exported folder: (text, length, finished) per prompt."""
    from transformers import AutoModelForCausalLM

    from neox_fork.checkpoint.hf import export_folder

    _, conf, _, _ = run
    if not (conf / "hf").is_dir():
        export_folder(conf / "checkpoints", conf / "hf")
    hf = AutoModelForCausalLM.from_pretrained(conf / "hf").eval()
    tokenizer = build_tokenizer("HFTokenizer", str(conf / "hf" / "tokenizer.json"))
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt) if prompt else [tokenizer.eod]
        with torch.no_grad():
            new = hf.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=tokenizer.eod, pad_token_id=tokenizer.eod)[0, len(ids):].tolist()
        finished = bool(new) and new[-1] == tokenizer.eod
        new = new[:-1] if finished else new
        out.append((tokenizer.decode(new) if new else None, len(new), finished))
    return out


def records_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_input_file_greedy_samples_equal_transformers(run):
    family, conf, configs, textgen = run
    deepy("generate.py", "-d", conf, *configs, textgen)
    records = records_of(conf / "samples.jsonl")
    assert len(records) == len(PROMPTS)  # one per non-blank line of sample_input_file
    for record, prompt in zip(records, PROMPTS):
        assert set(record) == RECORD_KEYS and record["context"] == prompt
        assert record["duration_seconds"] > 0 and record["message"] is None
    assert [(r["text"], r["length"], r["finished"]) for r in records] == hf_greedy(run, PROMPTS, MAX_TOKENS)


def test_unconditional_sampling_draws_num_samples_to_the_output_flag(run):
    family, conf, configs, textgen = run
    overlay = write(conf / "unconditional.yml", dict(text_gen_type="unconditional", num_samples=3, temperature=1.0,
                                                     top_k=50))
    out = conf / "unconditional.jsonl"
    deepy("generate.py", "-d", conf, *configs, textgen, overlay, "-o", out)
    records = records_of(out)
    assert len(records) == 3 and all(set(r) == RECORD_KEYS and r["context"] == "" for r in records)
    assert all(r["length"] <= MAX_TOKENS and isinstance(r["finished"], bool) for r in records)
    # each sample has its own seed: three samples of a barely trained 600-token model are not all alike
    assert len({r["text"] for r in records}) > 1


def test_tp2_ranks_through_deepy_give_the_tp1_greedy_samples(run):
    family, conf, configs, textgen = run
    if family != "llama":
        pytest.skip("one family is enough for the TP=2 launch")
    overlay = write(conf / "tp2.yml", dict(model_parallel_size=2, num_gpus=2))
    out = conf / "tp2.jsonl"
    done = deepy("generate.py", "-d", conf, *configs, textgen, overlay, "-o", out)
    assert "world size 2" in done.stdout
    records = records_of(out)
    assert [(r["text"], r["length"], r["finished"]) for r in records] == hf_greedy(run, PROMPTS, MAX_TOKENS)


@pytest.mark.parametrize("tp", [1, 2])
def test_eval_tasks_flag_writes_results_named_by_prefix(run, tp):
    from neox_fork.parallel import groups as parallel
    from neox_fork.inference.generation import load_for_inference
    from test_eval_in_memory_configs_and_errors import facts_accuracy_by_hand

    family, conf, configs, _ = run
    if tp == 2:
        if family != "llama":
            pytest.skip("one family is enough for the TP=2 launch")
        configs = [*configs, write(conf / "tp2.yml", dict(model_parallel_size=2, num_gpus=2))]
    prefix = conf / f"{family}_tp{tp}"
    deepy("eval.py", "-d", conf, *configs, "--eval_tasks", "neox_facts", "--eval_results_prefix", prefix)
    written = sorted(conf.glob(f"{family}_tp{tp}_eval_results_*.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text())
    model, _, tokenizer = load_for_inference(conf / "checkpoints")
    try:
        expected = facts_accuracy_by_hand(model, tokenizer, limit=None)
    finally:
        parallel.destroy()
    assert results["results"]["neox_facts"]["acc,none"] == expected
