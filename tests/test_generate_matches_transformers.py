"""generate.py's greedy output equals transformers' greedy generate on the converted model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import NEOX_TOKENIZER, run_cli, tiny_keys
from neox_fork.checkpoint import store as checkpoint
from neox_fork.config.loading import from_dict
from neox_fork.inference.generation import SamplingParams, generate
from neox_fork.checkpoint.hf import export_folder
from neox_fork.model.transformer import build_model


def trained_looking_checkpoint(path, seed=0):
    config = from_dict(tiny_keys(vocab_size=None, vocab_file=str(NEOX_TOKENIZER)))
    torch.manual_seed(seed)
    model = build_model(config, 50277)
    with torch.no_grad():  # sharper logits than at init, so greedy paths are not ties
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    checkpoint.save_model_checkpoint(path, 7, [checkpoint.model_state(model)], config, NEOX_TOKENIZER)
    return model.eval()


@pytest.mark.slow
def test_greedy_generate_py_equals_transformers_generate(one_process, tmp_path):
    trained_looking_checkpoint(tmp_path / "ckpt")
    export_folder(tmp_path / "ckpt", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = [510, 4495, 273, 1495, 310]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    run = run_cli("generate.py", "--checkpoint", str(tmp_path / "ckpt"), "--prompt-ids",
                  ",".join(map(str, prompt)), "--max-new-tokens", "20", "--temperature", "0", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["token_ids"][: len(expected)] == expected[: len(out["token_ids"])]
    assert len(out["token_ids"]) == 20 or out["token_ids"][-1] == 0
    assert isinstance(out["text"], str)


def test_kv_cache_decoding_equals_full_recomputation(one_process, tmp_path):
    model = trained_looking_checkpoint(tmp_path / "ckpt", seed=1)
    params = SamplingParams(max_new_tokens=25, temperature=0.0, stop_on_eod=False)
    prompts = [[5, 6, 7, 8], [100, 200, 300, 400, 500, 600, 700]]
    cached, _ = generate(model, prompts, params, use_cache=True)
    full, _ = generate(model, prompts, params, use_cache=False)
    assert cached == full


@pytest.mark.slow
def test_text_prompt_uses_the_checkpoint_tokenizer(one_process, tmp_path):
    """The config's vocab_file is gone after saving: a text prompt can only be encoded (and the output
    decoded) by the checkpoint's own tokenizer.json, and gives exactly the ids of that tokenizer."""
    import shutil

    from neox_fork.data.tokenizer import build_tokenizer

    (tmp_path / "tok").mkdir()
    vocab = shutil.copy(NEOX_TOKENIZER, tmp_path / "tok" / "tokenizer.json")
    config = from_dict(tiny_keys(vocab_size=None, vocab_file=str(vocab)))
    torch.manual_seed(0)
    model = build_model(config, 50277)
    checkpoint.save_model_checkpoint(tmp_path / "ckpt", 7, [checkpoint.model_state(model)], config, vocab)
    shutil.rmtree(tmp_path / "tok")
    tokenizer = build_tokenizer("HFTokenizer", str(tmp_path / "ckpt" / "global_step7" / "tokenizer.json"))
    prompt = "Hello, tokenizer world"
    expected, _ = generate(model.eval(), [tokenizer.encode(prompt)],
                           SamplingParams(max_new_tokens=5, temperature=0.0, stop_on_eod=False))
    run = run_cli("generate.py", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", prompt,
                  "--max-new-tokens", "5", "--temperature", "0", "--no-stop-on-eod", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["token_ids"] == expected[0] and len(expected[0]) == 5
    assert out["text"] == tokenizer.decode(expected[0])
