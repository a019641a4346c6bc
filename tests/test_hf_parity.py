"""Our model computes exactly what transformers' StableLmForCausalLM computes on the same weights."""

import pytest
import torch
from transformers import StableLmConfig, StableLmForCausalLM

from conftest import tiny_keys
from neox_fork.checkpoint import store as checkpoint
from neox_fork.config.loading import from_dict
from neox_fork.checkpoint.hf import export_folder, hf_config_dict, import_folder
from neox_fork.model.transformer import build_model


def hf_model_for(config):
    keys = hf_config_dict(config, config.padded_vocab_size(), "fp32")
    for k in ("architectures", "model_type", "torch_dtype"):
        keys.pop(k)
    return StableLmForCausalLM(StableLmConfig(**keys)).eval()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exported_model_logits_match_transformers(one_process, tmp_path, seed):
    config = from_dict(tiny_keys(seed=seed))
    torch.manual_seed(seed)
    ours = build_model(config).eval()
    checkpoint.save_model_checkpoint(tmp_path / "ckpt", 1, [checkpoint.model_state(ours)], config)
    export_folder(tmp_path / "ckpt", tmp_path / "hf")
    theirs = StableLmForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 1000, (2, 200), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        diff = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    assert diff < 1e-5


@pytest.mark.parametrize("seed", [0, 1])
def test_imported_hf_model_logits_match_transformers(one_process, tmp_path, seed):
    config = from_dict(tiny_keys(rotary_pct=0.5, rotary_emb_base=500))
    torch.manual_seed(seed)
    theirs = hf_model_for(config)
    for p in theirs.parameters():  # LayerNorms start at 1/0: make them matter
        torch.nn.init.normal_(p, std=0.3 if p.dim() == 1 else 0.05)
    theirs.save_pretrained(tmp_path / "hf")
    import_folder(tmp_path / "hf", tmp_path / "ckpt")
    from neox_fork.inference.generation import load_for_inference

    ours, _, _ = load_for_inference(tmp_path / "ckpt")
    tokens = torch.randint(0, 1000, (3, 256), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        diff = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    assert diff < 1e-5


def test_tied_embeddings_export_and_match(one_process, tmp_path):
    config = from_dict(tiny_keys(no_weight_tying=False))
    torch.manual_seed(3)
    ours = build_model(config).eval()
    checkpoint.save_model_checkpoint(tmp_path / "ckpt", 1, [checkpoint.model_state(ours)], config)
    export_folder(tmp_path / "ckpt", tmp_path / "hf")
    theirs, info = StableLmForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokens = torch.randint(0, 1000, (1, 64))
    with torch.no_grad():
        assert (ours(tokens) - theirs.eval()(tokens).logits).abs().max() < 1e-5
