"""A tiny Mistral-shaped model (sliding window shorter than the sequence, grouped-query attention, RMSNorm,
SwiGLU, no biases, untied) exports to MistralForCausalLM and imports back with transformers' logits, and
decodes with a KV cache longer than the window exactly as transformers' generate does. fp32, 2 layers of
width 64: the same sums in another order differ by ~1e-6, so 1e-5; ignoring the window moves the logits by
far more (asserted, so these tests fail when the window is dropped)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from neox_fork.checkpoint import store as checkpoint
from neox_fork.config.loading import from_dict
from neox_fork.errors import UserError
from neox_fork.inference.generation import SamplingParams, generate, load_for_inference
from neox_fork.checkpoint.hf import export_folder, import_folder
from neox_fork.model.transformer import build_model

W = 6  # sliding_window_width: a query sees itself and 6 keys before it (HF sliding_window 7)
MISTRAL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, seq_length=128,
               vocab_size=1024, make_vocab_size_divisible_by=8, pos_emb="rotary", norm="rmsnorm",
               rms_norm_epsilon=1e-5, use_bias_in_norms=False, use_bias_in_attn_linear=False,
               use_bias_in_mlp=False, mlp_type="gated", activation="silu", intermediate_size=96,
               no_weight_tying=True, sliding_window_width=W)


def random_mistral(path, seed=0, **extra):
    config = from_dict({**MISTRAL, **extra})
    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.15) + (1.0 if p.dim() == 1 else 0.0))
    checkpoint.save_model_checkpoint(path, 1, [checkpoint.model_state(model)], config)
    return model


def without_window(model):
    for layer in model.layers:
        layer.attention.window = None
    return model


def test_export_to_mistral_equals_transformers_with_the_window_in_effect(one_process, tmp_path):
    ours = random_mistral(tmp_path / "ckpt")
    export_folder(tmp_path / "ckpt", tmp_path / "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == ["MistralForCausalLM"] and hf_config["sliding_window"] == W + 1
    theirs, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(theirs).__name__ == "MistralForCausalLM"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokens = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(1))  # 40 >> window
    with torch.no_grad():
        expected = theirs.eval()(tokens).logits
        assert (ours(tokens) - expected).abs().max().item() < 1e-5
        assert (without_window(ours)(tokens) - expected).abs().max().item() > 1e-2


def test_import_from_mistral_and_back_is_bit_exact(one_process, tmp_path):
    torch.manual_seed(5)
    theirs = MistralForCausalLM(MistralConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=128, rms_norm_eps=1e-5, sliding_window=W + 1))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.15 + (1.0 if p.dim() == 1 else 0.0))
    theirs.save_pretrained(tmp_path / "hf")
    import_folder(tmp_path / "hf", tmp_path / "ckpt", tp=2)
    ours, config, _ = load_for_inference(tmp_path / "ckpt")
    assert config.sliding_window_width == W
    tokens = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(tokens) - theirs.eval()(tokens).logits).abs().max().item() < 1e-5
    export_folder(tmp_path / "ckpt", tmp_path / "back")
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cached_decoding_past_the_window_equals_transformers_generate(one_process, tmp_path):
    """Prompts of 3 and 9 tokens (batched, so one is left-padded), 20 new tokens: the cache grows to 4-5
    windows; each row equals transformers' greedy generate of that prompt alone, and the cache-free path."""
    ours = random_mistral(tmp_path / "ckpt", seed=3)
    with torch.no_grad():  # sharper logits, so greedy paths are not near-ties
        for p in ours.parameters():
            p.mul_(3.0 if p.dim() > 1 else 1.0)
    checkpoint.save_model_checkpoint(tmp_path / "ckpt", 2, [checkpoint.model_state(ours)], from_dict(MISTRAL))
    export_folder(tmp_path / "ckpt", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompts = [[5, 17, 300], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
    expected = [hf.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    params = SamplingParams(max_new_tokens=20, temperature=0.0, stop_on_eod=False)
    cached, _ = generate(ours, prompts, params, use_cache=True)
    full, _ = generate(ours, prompts, params, use_cache=False)
    assert cached == expected and full == expected
    unwindowed, _ = generate(without_window(ours), prompts, params, use_cache=True)
    assert unwindowed != expected


@pytest.mark.parametrize("extra, why", [
    (dict(use_bias_in_mlp=True), "Mistral has no linear biases"),
    (dict(norm="layernorm", use_bias_in_norms=True), "only Mistral (RMSNorm, SwiGLU) has a sliding window"),
])
def test_a_window_no_hf_class_computes_is_refused_in_one_line(one_process, tmp_path, extra, why):
    random_mistral(tmp_path / "ckpt", **extra)
    with pytest.raises(UserError, match=why.replace("(", r"\(").replace(")", r"\)")):
        export_folder(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
