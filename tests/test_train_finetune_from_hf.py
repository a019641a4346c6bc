"""A Hugging Face StableLM imported with convert_from_hf trains with `finetune: true` from its exact weights."""


import pytest
import torch
from transformers import StableLmConfig, StableLmForCausalLM

from checkpoint_bytes import assert_files_hold_only_their_tensors
from conftest import read_metrics, run_cli, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint
from neox_fork.config.loading import load_config
from neox_fork.checkpoint.hf import from_hf_state_dict, hf_config_dict

pytestmark = [pytest.mark.slow]


def test_finetune_starts_from_the_imported_weights(tmp_path, small_corpus):
    config_path = write_train_config(tmp_path, small_corpus, train_iters=3, extra_save_iters=[0])
    config = load_config(config_path)
    keys = hf_config_dict(config, config.padded_vocab_size(600), "fp32")
    for k in ("architectures", "model_type", "torch_dtype"):
        keys.pop(k)
    torch.manual_seed(0)
    hf = StableLmForCausalLM(StableLmConfig(**keys))
    hf.save_pretrained(tmp_path / "hf")
    done = run_cli("tools/ckpts/convert_hf_llama_to_neox.py", "--hf-dir", str(tmp_path / "hf"),
                   "--output-dir", str(tmp_path / "imported"))
    assert done.returncode == 0, done.stderr
    assert assert_files_hold_only_their_tensors(tmp_path / "imported") >= 1  # the weights (tests/checkpoint_bytes.py)

    text = config_path.read_text() + f"load: {tmp_path / 'imported'}\nfinetune: true\n"
    config_path.write_text(text)
    run = run_training(config_path)
    assert "fine-tuning from the weights of" in run.stdout
    start, _, _ = checkpoint.load_merged(tmp_path / "ckpt", step=0)
    expected = from_hf_state_dict(hf.state_dict(), config)
    assert start.keys() == expected.keys()
    for name in start:
        assert torch.equal(start[name], expected[name]), name
    assert sorted(read_metrics(tmp_path / "ckpt")) == [1, 2, 3]  # a fresh schedule: iterations start at 1
