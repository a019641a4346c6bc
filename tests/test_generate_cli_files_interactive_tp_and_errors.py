"""generate.py end to end: prompt files in and out, interactive stdin, torchrun TP=2, clear errors."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from conftest import NEOX_TOKENIZER, PYTHON, REPO, run_cli, tiny_keys
from neox_fork.checkpoint import store as checkpoint
from neox_fork.config.loading import from_dict
from neox_fork.data.tokenizer import build_tokenizer
from neox_fork.inference.generation import SamplingParams, generate
from neox_fork.launch.launcher import free_port
from neox_fork.model.transformer import build_model
from test_generate_matches_transformers import trained_looking_checkpoint

TEXTS = ["Hello world", "The capital of France is a city that", "Once"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A TP=1 checkpoint with the NeoX tokenizer, the same weights split at TP=2, and the TP=1 model."""
    from neox_fork.parallel import groups as parallel

    root = tmp_path_factory.mktemp("gen_cli")
    parallel.initialize(1)
    model = trained_looking_checkpoint(root / "tp1", seed=6)
    state, config, folder = checkpoint.load_merged(root / "tp1")
    checkpoint.save_model_checkpoint(root / "tp2", 7, checkpoint.split_tp(state, 2), config,
                                     folder / checkpoint.TOKENIZER_FILE)
    tokenizer = build_tokenizer("HFTokenizer", str(NEOX_TOKENIZER))
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    expected, _ = generate(model, [tokenizer.encode(t) for t in TEXTS], params, eod=tokenizer.eod)
    parallel.destroy()
    return root, expected


def load_cli():
    spec = importlib.util.spec_from_file_location("generate_cli", REPO / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run(*args, stdin=None, launcher=None):
    """generate.py ARGS (run_cli), or a new interpreter where the test gives it standard input or a launcher."""
    if stdin is None and launcher is None:
        return run_cli("generate.py", *args)
    return subprocess.run([*(launcher or [PYTHON]), "generate.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, input=stdin)


@pytest.mark.slow
def test_input_file_jsonl_and_text_write_output_jsonl(ckpts, tmp_path):
    root, expected = ckpts
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n")
    for name in ("in.jsonl", "in.txt"):
        out = tmp_path / f"{name}.out.jsonl"
        done = run("--checkpoint", root / "tp1", "--input-file", tmp_path / name, "--output-file", out,
                   "--max-new-tokens", 8, "--batch-size", 2)
        assert done.returncode == 0, done.stderr
        assert "tokens/s" in done.stderr
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["prompt"] for r in records] == TEXTS
        assert [r["token_ids"] for r in records] == expected
        assert all(isinstance(r["text"], str) for r in records)


@pytest.mark.slow
def test_interactive_reads_stdin_until_eof(ckpts):
    root, expected = ckpts
    done = run("--checkpoint", root / "tp1", "--interactive", "--max-new-tokens", 8, "--json",
               stdin="\n".join(TEXTS) + "\n\n")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["token_ids"] for line in done.stdout.splitlines()] == expected
    assert "3 prompts" in done.stderr and "tokens/s" in done.stderr


@pytest.mark.multiproc
def test_torchrun_tp2_ranks_cooperate_and_equal_tp1(ckpts):
    root, expected = ckpts
    args = ["--checkpoint", root / "tp2", "--max-new-tokens", 8, "--json"]
    for text in TEXTS:
        args += ["--prompt", text]
    # torchrun as this interpreter's module: a venv need not have the console script
    done = run(*args, launcher=(sys.executable, "-m", "torch.distributed.run", "--master_port", str(free_port()),
                                "--nproc_per_node", "2"))
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["token_ids"] for line in done.stdout.splitlines()] == expected


def test_bad_input_gives_one_line_errors(ckpts, tmp_path, capsys):
    from neox_fork.parallel import groups as parallel

    root, _ = ckpts
    parallel.initialize(1)
    config = from_dict(tiny_keys())
    torch.manual_seed(0)
    checkpoint.save_model_checkpoint(tmp_path / "bare", 1, [checkpoint.model_state(build_model(config))], config)
    parallel.destroy()
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    cases = [
        (["--checkpoint", tmp_path / "bare", "--prompt", "Hello"], "has no tokenizer.json"),
        (["--checkpoint", root / "tp1", "--prompt", "word " * 300], "exceeds seq-length 256"),
        (["--checkpoint", root / "tp1", "--input-file", tmp_path / "bad.jsonl"], "bad.jsonl:2: expected an object"),
        (["--checkpoint", root / "tp1", "--input-file", tmp_path / "missing.txt"], "missing.txt: no such file"),
        (["--checkpoint", root / "tp1", "--prompt", "Hi", "--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    ]
    main = load_cli()
    for args, message in cases:  # in this process: a subprocess per case would cost seconds each
        with pytest.raises(SystemExit) as exited:
            main([str(a) for a in args])
        assert exited.value.code == 2, args
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, last
        parallel.destroy()
    bare = run("--checkpoint", tmp_path / "bare", "--prompt-ids", "1,2,3", "--max-new-tokens", 4, "--json")
    assert bare.returncode == 0, bare.stderr
    assert len(json.loads(bare.stdout)["token_ids"]) == 4 and json.loads(bare.stdout)["text"] is None
