"""HF -> ours -> HF is bit-exact at any TP size; TP shards merge to the TP=1 weights."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, StableLmConfig, StableLmForCausalLM

from conftest import NEOX_TOKENIZER, tiny_keys
from distributed import build_save_and_run, run_distributed
from neox_fork.checkpoint import store as checkpoint
from neox_fork.config.loading import from_dict
from neox_fork.checkpoint.hf import export_folder, hf_config_dict, import_folder


def released_like_folder(path, dtype=torch.bfloat16):
    """A tiny StableLM saved by transformers, like the released model (bf16, tokenizer included)."""
    config = from_dict(tiny_keys(vocab_size=50304))
    keys = hf_config_dict(config, 50304, "bf16")
    for k in ("architectures", "model_type", "torch_dtype"):
        keys.pop(k)
    torch.manual_seed(0)
    model = StableLmForCausalLM(StableLmConfig(**keys)).to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(path)
    from neox_fork.checkpoint.hf import save_hf_tokenizer

    save_hf_tokenizer(NEOX_TOKENIZER, path, 256)
    return path


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_hf_to_ours_to_hf_is_bit_exact(tmp_path, tp):
    src = released_like_folder(tmp_path / "hf")
    import_folder(src, tmp_path / "ckpt", tp=tp)
    assert checkpoint.tp_size_of(checkpoint.resolve(tmp_path / "ckpt")) == tp
    export_folder(tmp_path / "ckpt", tmp_path / "back")
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.bfloat16
        assert torch.equal(a[name], b[name]), name
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == ["StableLmForCausalLM"] and config["vocab_size"] == 50304
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert type(model).__name__ == "StableLmForCausalLM"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "back")
    assert tokenizer.eos_token_id == 0 and tokenizer("Hello world").input_ids == [12092, 1533]


def test_export_casts_dtype_and_shards_large_models(tmp_path, monkeypatch):
    import neox_fork.checkpoint.hf as hf

    src = released_like_folder(tmp_path / "hf")
    import_folder(src, tmp_path / "ckpt")
    monkeypatch.setattr(hf, "MAX_SHARD_SIZE", "4MB")
    export_folder(tmp_path / "ckpt", tmp_path / "out", dtype="fp32")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert p.dtype == torch.float32 and torch.equal(p, q), n


@pytest.mark.multiproc
def test_tp2_model_merges_to_the_tp1_model_with_the_same_seed(tmp_path):
    (tmp_path / "a").mkdir()
    tp1_logits = run_distributed(build_save_and_run, 1, tiny_keys(model_parallel_size=1, vocab_size=1000),
                                 str(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    tp2_logits = run_distributed(build_save_and_run, 2, tiny_keys(model_parallel_size=2, vocab_size=1000),
                                 str(tmp_path / "b"))
    full = torch.load(tmp_path / "a" / "rank0.pt")
    merged = checkpoint.merge_tp_shards([torch.load(tmp_path / "b" / f"rank{r}.pt") for r in range(2)])
    assert full.keys() == merged.keys()
    for name in full:
        assert torch.equal(full[name], merged[name]), name
    # and the two ranks together compute the same logits as one process
    assert torch.allclose(tp2_logits[0], tp1_logits[0], atol=1e-5)
    assert torch.equal(tp2_logits[0], tp2_logits[1])
    # splitting the TP=1 weights gives back the TP=2 shards
    for rank, shard in enumerate(checkpoint.split_tp(full, 2)):
        saved = torch.load(tmp_path / "b" / f"rank{rank}.pt")
        assert all(torch.equal(shard[k], saved[k]) for k in saved)
