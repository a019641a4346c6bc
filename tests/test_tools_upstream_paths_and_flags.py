"""The tools at upstream gpt-neox's paths take upstream's flag spellings: tools/datasets/preprocess_data.py,
tools/ckpts/convert_neox_to_hf.py and tools/ckpts/convert_hf_llama_to_neox.py (tools/convert_to_hf.py is the same
program as the export). Tokenizer files and a tiny Pythia-shaped checkpoint are made here; the reference ids come
from transformers' GPT2Tokenizer, the reference weights from the model that was saved."""

import importlib.util
import json
import runpy
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from neox_fork.checkpoint import store as checkpoint
from neox_fork.config.loading import from_dict
from neox_fork.data._megatron import indexed_dataset
from neox_fork.data.tokenizer import TokenizerSource
from neox_fork.model.transformer import build_model

DOCS = ["Hello world, a tiny corpus.", "def f(x):\n    return x * 2\n", "Numbers 12345 and more words.",
        "The quick brown fox jumps over the lazy dog."]
PYTHIA = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64, pos_emb="rotary", rotary_pct=0.25,
              gpt_j_residual=True, no_weight_tying=True, make_vocab_size_divisible_by=8)


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer

    root = tmp_path_factory.mktemp("neoxtok_gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(DOCS * 4, vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    bpe.save_model(str(root))
    return root / "vocab.json", root / "merges.txt"


def gpt2_ids(vocab, merges, text):
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer(str(vocab), str(merges)).encode(text)


def run_tool(path, *args):
    """Run a tool file as `python PATH ARGS` does, in this process (saves a start of torch): its exit status."""
    argv = sys.argv
    sys.argv = [str(REPO / path), *map(str, args)]
    try:
        runpy.run_path(str(REPO / path), run_name="__main__")
        return 0
    except SystemExit as stop:
        return stop.code
    finally:
        sys.argv = argv


def test_preprocess_data_takes_upstreams_flags(gpt2_files, tmp_path, capsys):
    vocab, merges = gpt2_files
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:2]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[2:]))
    upstream = ["--input", f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}", "--jsonl-keys", "text",
                "--num-docs", "4", "--tokenizer-type", "GPT2BPETokenizer", "--vocab", vocab, "--merge-file", merges,
                "--append-eod", "--output-prefix", tmp_path / "out" / "corpus", "--dataset-impl", "mmap",
                "--workers", "2", "--log-interval", "1"]
    assert run_tool("tools/datasets/preprocess_data.py", *upstream) == 0, capsys.readouterr().err
    eod = json.loads(vocab.read_text())["<|endoftext|>"]
    dataset = indexed_dataset().IndexedDataset(str(tmp_path / "out" / "corpus_text_document"))
    assert [dataset[i].tolist() for i in range(len(dataset))] == [gpt2_ids(vocab, merges, d) + [eod] for d in DOCS]

    capsys.readouterr()
    assert run_tool("tools/datasets/preprocess_data.py", *upstream[:-6], "--dataset-impl", "lazy") == 2
    assert capsys.readouterr().err.strip() == ("error: --dataset-impl lazy: only mmap is written here (upstream's "
                                               "lazy and cached formats are not built)")


def test_preprocess_ftfy_fixes_text_or_says_it_is_missing(gpt2_files, tmp_path, capsys):
    vocab, merges = gpt2_files
    broken = "The Mona Lisa doesnâ€™t have eyebrows."  # UTF-8 read as Windows-1252, which ftfy undoes
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": broken}) + "\n")
    status = run_tool("tools/datasets/preprocess_data.py", "--input", tmp_path / "in.jsonl", "--tokenizer-type",
                      "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges, "--ftfy", "--output-prefix",
                      tmp_path / "out", "--workers", "1", "--no-progress")
    if importlib.util.find_spec("ftfy") is None:
        assert status == 2
        assert capsys.readouterr().err.strip() == ("error: --ftfy needs the ftfy package, which is not installed "
                                                   "(pip install ftfy)")
        assert not list(tmp_path.glob("out*"))
        return
    assert status == 0
    dataset = indexed_dataset().IndexedDataset(str(tmp_path / "out_text_document"))
    assert dataset[0].tolist() == gpt2_ids(vocab, merges, "The Mona Lisa doesn't have eyebrows.")


@pytest.fixture
def pythia_checkpoint(gpt2_files, tmp_path, one_process):
    vocab, merges = gpt2_files
    config = from_dict({**PYTHIA, "vocab_file": str(vocab), "merge_file": str(merges)})  # upstream's default type
    assert config.tokenizer_type == "GPT2BPETokenizer"
    torch.manual_seed(0)
    model = build_model(config, TokenizerSource.of_config(config).build().vocab_size)
    checkpoint.save_model_checkpoint(tmp_path / "ckpt", 1, [checkpoint.model_state(model)], config,
                                     TokenizerSource.of_config(config))
    return tmp_path / "ckpt", model


def test_convert_neox_to_hf_takes_upstreams_flags(pythia_checkpoint, gpt2_files, tmp_path, capsys):
    from transformers import AutoTokenizer

    ckpt, model = pythia_checkpoint
    vocab, merges = gpt2_files
    step = ckpt / "global_step1"
    status = run_tool("tools/ckpts/convert_neox_to_hf.py", "--input_dir", step, "--config_file", step / "config.yml",
                      "--output_dir", tmp_path / "hf", "--precision", "fp16", "--architecture", "neox",
                      "--pad-token-id", "1")
    assert status == 0, capsys.readouterr().err
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == ["GPTNeoXForCausalLM"] and hf_config["torch_dtype"] == "float16"
    assert hf_config["pad_token_id"] == 1
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(weights["gpt_neox.embed_in.weight"], model.state_dict()["word_embeddings.weight"].half())
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert [tokenizer.encode(d) for d in DOCS] == [gpt2_ids(vocab, merges, d) for d in DOCS]
    assert tokenizer.pad_token_id == 1

    # our spellings, at the path users already have: the same program
    assert run_tool("tools/convert_to_hf.py", "--input-dir", ckpt, "--output-dir", tmp_path / "plain",
                    "--no_save_tokenizer") == 0
    assert (tmp_path / "plain" / "config.json").is_file() and not (tmp_path / "plain" / "tokenizer.json").exists()
    assert not (tmp_path / "plain" / "tokenizer_config.json").exists()

    assert run_tool("tools/ckpts/convert_neox_to_hf.py", "--input_dir", step, "--output_dir", tmp_path / "no",
                    "--architecture", "llama") == 2
    assert capsys.readouterr().err.strip().endswith(
        "error: --architecture llama: this checkpoint's model exports as GPTNeoXForCausalLM (--architecture neox); "
        "the architecture comes from its config")
    assert not (tmp_path / "no").exists()


def test_convert_neox_to_hf_vocab_is_hf_tokenizer_saves_that_folder(one_process, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(DOCS * 4, vocab_size=280, special_tokens=["<|endoftext|>"], show_progress=False)
    folder = tmp_path / "hf_tokenizer"
    saved = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    saved.chat_template = "{{ messages[0]['content'] }}"  # only the folder has it; a rebuilt tokenizer would not
    saved.save_pretrained(str(folder))
    config = from_dict({**PYTHIA, "tokenizer_type": "HFTokenizer", "vocab_file": str(folder / "tokenizer.json")})
    model = build_model(config, 280)
    checkpoint.save_model_checkpoint(tmp_path / "ckpt", 1, [checkpoint.model_state(model)], config)
    assert run_tool("tools/ckpts/convert_neox_to_hf.py", "--input_dir", tmp_path / "ckpt" / "global_step1",
                    "--config_file", tmp_path / "ckpt" / "global_step1" / "config.yml", "--output_dir",
                    tmp_path / "hf", "--vocab-is-hf-tokenizer") == 0
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert exported.chat_template == saved.chat_template
    assert [exported.encode(d) for d in DOCS] == [bpe.encode(d).ids for d in DOCS]


def test_convert_hf_llama_to_neox_takes_upstreams_flags(pythia_checkpoint, tmp_path, capsys):
    ckpt, model = pythia_checkpoint
    assert run_tool("tools/ckpts/convert_neox_to_hf.py", "--input_dir", ckpt, "--output_dir", tmp_path / "hf") == 0
    status = run_tool("tools/ckpts/convert_hf_llama_to_neox.py", "--model", tmp_path / "hf", "--model_path",
                      tmp_path / "back", "--tp", "2", "--pp", "0")
    assert status == 0, capsys.readouterr().err
    assert checkpoint.tp_size_of(tmp_path / "back" / "global_step0") == 2
    state, _, _ = checkpoint.load_merged(tmp_path / "back")
    original = checkpoint.model_state(model)
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)


def test_inspect_checkpoints_takes_upstreams_flags(pythia_checkpoint, tmp_path, capsys):
    ckpt, model = pythia_checkpoint
    step = ckpt / "global_step1"
    name = "module/sequential.2.attention.dense.weight"  # layer 0's attention output, GPT-NeoX's name
    assert run_tool("tools/ckpts/inspect_checkpoints.py", step, "--attributes", "iteration", name) == 0
    shape = tuple(model.state_dict()["layers.0.attention.dense.weight"].shape)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "== mp_rank_00_model_states.pt"
    assert sorted(lines[1:]) == sorted(["iteration: 1", f"{name}: tensor {shape} float32"])
    # a copy with one tensor changed: --compare --diff names exactly that tensor
    other = tmp_path / "other"
    shutil.copytree(step, other)
    states = torch.load(other / "mp_rank_00_model_states.pt", weights_only=True)
    states["module"]["sequential.2.attention.dense.weight"] += 1
    torch.save(states, other / "mp_rank_00_model_states.pt")
    assert run_tool("tools/ckpts/inspect_checkpoints.py", f"{step},{other}", "--compare", "--diff") == 0
    assert capsys.readouterr().out.splitlines() == [
        "== mp_rank_00_model_states.pt", f"{name}: differs (tensor {shape} float32 / tensor {shape} float32)"]
