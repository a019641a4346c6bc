"""Each NeoX family exports to and imports from its transformers class with equal logits, a bit-exact round
trip, tensor-parallel merge/split (grouped-query attention included) and greedy generation equal to
transformers'. Small random models: 2 layers, width 64, fp32; logits agree to 1e-5 (fp32 rounding of the
same sums in another order is ~1e-6 at these sizes)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import run_cli
from distributed import build_save_and_run, run_distributed
from neox_fork.checkpoint import store as checkpoint
from neox_fork.config.loading import from_dict
from neox_fork.checkpoint.hf import export_folder, import_folder
from neox_fork.model.transformer import build_model

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=128, vocab_size=1024,
            make_vocab_size_divisible_by=8)
# The keys as each family's upstream config spells them (everything else is upstream's default).
FAMILIES = {
    "pythia": dict(pos_emb="rotary", rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True),
    "neox-sequential-tied": dict(pos_emb="rotary", rotary_pct=0.5, use_bias_in_attn_linear=False),
    "llama2": dict(pos_emb="rotary", norm="rmsnorm", rms_norm_epsilon=1e-5, use_bias_in_norms=False,
                   use_bias_in_attn_linear=False, use_bias_in_mlp=False, activation="swiglu", intermediate_size=256,
                   mlp_multiple_of=16, no_weight_tying=True),
    "llama-gqa": dict(pos_emb="rotary", norm="rmsnorm", num_kv_heads=2, mlp_type="llama", activation="silu",
                      use_bias_in_attn_linear=False, use_bias_in_mlp=False, no_weight_tying=True),
    "stablelm-gqa": dict(pos_emb="rotary", rotary_pct=0.25, mlp_type="gated", activation="silu", num_kv_heads=2,
                         mlp_multiple_of=32, use_bias_in_attn_linear=False, use_bias_in_mlp=False,
                         no_weight_tying=True),
    "mistral-window": dict(pos_emb="rotary", norm="rmsnorm", num_kv_heads=2, mlp_type="gated", activation="silu",
                           intermediate_size=96, use_bias_in_attn_linear=False, use_bias_in_mlp=False,
                           no_weight_tying=True, sliding_window_width=4),  # window < the tests' 30-100 tokens
}
CLASS = {"pythia": "GPTNeoXForCausalLM", "neox-sequential-tied": "GPTNeoXForCausalLM",
         "llama2": "LlamaForCausalLM", "llama-gqa": "LlamaForCausalLM", "stablelm-gqa": "StableLmForCausalLM",
         "mistral-window": "MistralForCausalLM"}


def family_config(name, **extra):
    return from_dict({**BASE, **FAMILIES[name], **extra})


def random_checkpoint(name, path, seed=0, **extra):
    """Our model of the family with every parameter random (norms and biases too), saved as a checkpoint."""
    config = family_config(name, **extra)
    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.1) + (1.0 if p.dim() == 1 else 0.0))
    checkpoint.save_model_checkpoint(path, 1, [checkpoint.model_state(model)], config)
    return model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_logits_equal_transformers(one_process, tmp_path, name):
    ours = random_checkpoint(name, tmp_path / "ckpt")
    export_folder(tmp_path / "ckpt", tmp_path / "hf")
    theirs, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(theirs).__name__ == CLASS[name]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokens = torch.randint(0, 1000, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(tokens) - theirs.eval()(tokens).logits).abs().max().item() < 1e-5


def hf_random(name, path):
    """A transformers model of the family, all parameters random, saved as released models are."""
    torch.manual_seed(5)
    if name == "pythia":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
            rotary_pct=0.25, max_position_embeddings=128, use_parallel_residual=True))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=128, rms_norm_eps=1e-5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    model.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("name", ["pythia", "llama-gqa"])
def test_import_logits_equal_transformers_and_round_trip_is_bit_exact_at_tp2(one_process, tmp_path, name):
    from neox_fork.inference.generation import load_for_inference

    theirs = hf_random(name, tmp_path / "hf")
    import_folder(tmp_path / "hf", tmp_path / "ckpt", tp=2)
    assert checkpoint.tp_size_of(checkpoint.resolve(tmp_path / "ckpt")) == 2
    ours, _, _ = load_for_inference(tmp_path / "ckpt")
    tokens = torch.randint(0, 1000, (2, 100), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max().item() < 1e-5
    export_folder(tmp_path / "ckpt", tmp_path / "back")
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == [type(theirs).__name__]


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["pythia", "llama-gqa", "mistral-window"])
def test_tp2_shards_merge_to_the_tp1_model_and_compute_the_same(tmp_path, name):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    keys = {**BASE, **FAMILIES[name], "seed": 3}
    tp1 = run_distributed(build_save_and_run, 1, {**keys, "model_parallel_size": 1}, str(tmp_path / "a"))
    tp2 = run_distributed(build_save_and_run, 2, {**keys, "model_parallel_size": 2}, str(tmp_path / "b"))
    full = torch.load(tmp_path / "a" / "rank0.pt")
    shards = [torch.load(tmp_path / "b" / f"rank{r}.pt") for r in range(2)]
    merged = checkpoint.merge_tp_shards(shards)
    assert full.keys() == merged.keys()
    assert all(torch.equal(full[k], merged[k]) for k in full)
    for rank, shard in enumerate(checkpoint.split_tp(full, 2)):
        assert all(torch.equal(shard[k], shards[rank][k]) for k in shard)
    assert torch.allclose(tp2[0], tp1[0], atol=1e-5) and torch.equal(tp2[0], tp2[1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pythia", "llama-gqa"])
def test_greedy_generate_py_equals_transformers(one_process, tmp_path, name):
    random_checkpoint(name, tmp_path / "ckpt", seed=4)
    export_folder(tmp_path / "ckpt", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = [5, 17, 300, 2, 999]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    run = run_cli("generate.py", "--checkpoint", str(tmp_path / "ckpt"), "--prompt-ids",
                  ",".join(map(str, prompt)), "--max-new-tokens", "12", "--temperature", "0", "--json",
                  "--no-stop-on-eod")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1])["token_ids"] == expected


def test_learned_positions_build_train_step_and_refuse_export(one_process, tmp_path):
    """Upstream's default pos_emb (learned) builds: a position table shifts the logits; no HF class has it."""
    from neox_fork.errors import UserError

    config = from_dict(BASE)
    assert config.pos_emb == "learned"
    model = build_model(config).eval()
    assert model.position_embeddings.weight.shape == (128, 64)
    tokens = torch.full((1, 8), 7)
    with torch.no_grad():
        logits = model(tokens)
    assert not torch.allclose(logits[0, 0], logits[0, 5])  # same token, different position
    checkpoint.save_model_checkpoint(tmp_path / "ckpt", 1, [checkpoint.model_state(model)], config)
    with pytest.raises(UserError, match="pos_emb 'learned'"):
        export_folder(tmp_path / "ckpt", tmp_path / "hf")
