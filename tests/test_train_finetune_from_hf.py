"""A Hugging Face StableLM imported with convert_from_hf trains with `finetune: true` from its exact weights."""


import pytest
import torch
from transformers import StableLmConfig, StableLmForCausalLM

from checkpoint_bytes import assert_files_hold_only_their_tensors
from conftest import finetune_from_random_hf_model, read_metrics, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint
from neox_fork.checkpoint.hf import from_hf_state_dict

pytestmark = [pytest.mark.slow]


def test_finetune_starts_from_the_imported_weights(tmp_path, small_corpus):
    config_path = write_train_config(tmp_path, small_corpus, train_iters=3, extra_save_iters=[0])
    hf, config = finetune_from_random_hf_model(config_path, StableLmForCausalLM, StableLmConfig, tmp_path / "hf",
                                               tmp_path / "imported")
    assert assert_files_hold_only_their_tensors(tmp_path / "imported") >= 1  # the weights (tests/checkpoint_bytes.py)
    run = run_training(config_path)
    assert "fine-tuning from the weights of" in run.stdout
    start, _, _ = checkpoint.load_merged(tmp_path / "ckpt", step=0)
    expected = from_hf_state_dict(hf.state_dict(), config)
    assert start.keys() == expected.keys()
    for name in start:
        assert torch.equal(start[name], expected[name]), name
    assert sorted(read_metrics(tmp_path / "ckpt")) == [1, 2, 3]  # a fresh schedule: iterations start at 1
