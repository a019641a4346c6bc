"""MixtralForCausalLM (docs/moe.md): a transformers Mixtral imports with its logits and greedy text, and exports
back bit-exact; a Mixtral-shaped model trained here (from an imported one) exports with transformers' logits, and
generate.py and eval.py on its checkpoint equal transformers' generate and lm-eval's hf model; MoE models no HF
class computes are one line each.

Tolerance: fp32, the same sums in another order (megatron-core runs the experts on permuted tokens and takes the
softmax over the k chosen logits, transformers over all experts and then renormalises the k): ~2e-6 seen on
logits of size ~1 at width 64, bound 1e-5 as the dense families' test."""

import contextlib
import io
import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from conftest import finetune_from_random_hf_model, read_metrics, run_cli, run_training, write_train_config
from neox_fork.checkpoint import store as checkpoint
from neox_fork.checkpoint.hf import config_from_hf, export_folder, family, from_hf_state_dict, import_folder
from neox_fork.config.loading import from_dict, load_config
from neox_fork.errors import UserError
from neox_fork.inference.generation import SamplingParams, generate, load_for_inference
from neox_fork.perf.summary import print_summary

HF_KEYS = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
               rms_norm_eps=1e-5)
TOKENS = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
PROMPT = [5, 17, 300, 2, 999]


def hf_mixtral(path, **keys):
    """A transformers Mixtral, every parameter random (norms too), saved as transformers saves it."""
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**{**HF_KEYS, **keys}))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    model.save_pretrained(path)
    return model.eval()


def summary(*configs) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_summary(list(configs), world_size=1)
    return out.getvalue()


@pytest.mark.parametrize("window", [None, 6])  # 6: a sliding window shorter than the 40 tokens
def test_import_equals_transformers_and_export_back_is_bit_exact(one_process, tmp_path, window):
    theirs = hf_mixtral(tmp_path / "hf", sliding_window=window)
    import_folder(tmp_path / "hf", tmp_path / "ckpt")
    ours, config, _ = load_for_inference(tmp_path / "ckpt")
    assert (config.moe_num_experts, config.moe_top_k, config.moe_router_type, config.moe_normalize_expert_weights,
            config.sliding_window_width) == (4, 2, "topk", True, None if window is None else window - 1)
    with torch.no_grad():
        assert (ours(TOKENS) - theirs(TOKENS).logits).abs().max().item() < 1e-5
    expected = theirs.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(PROMPT):].tolist()
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_on_eod=False)
    assert generate(ours, [PROMPT], params, use_cache=True)[0] == [expected]

    export_folder(tmp_path / "ckpt", tmp_path / "back")
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and any(".block_sparse_moe.experts.3.w3." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    source, back = (json.loads((tmp_path / f / "config.json").read_text()) for f in ("hf", "back"))
    for key in ("architectures", "num_local_experts", "num_experts_per_tok", "sliding_window", "intermediate_size",
                "num_key_value_heads", "rms_norm_eps", "router_jitter_noise", "output_router_logits"):
        assert back[key] == source[key], key

    # model_summary counts the imported model: all its parameters, and per token the router and 2 of 4 experts
    out = summary(checkpoint.resolve(tmp_path / "ckpt") / checkpoint.CONFIG_FILE)
    total = sum(p.numel() for p in theirs.parameters())
    assert re.search(rf"^parameters: {total}$", out, re.M)
    assert re.search(rf"^active_parameters: {total - 2 * 2 * 3 * 64 * 96} ", out, re.M)


def test_import_at_tp2_splits_the_experts_as_training_at_tp2_saves_them(one_process, tmp_path):
    """--tp 2 writes two ranks' files whose merge is the --tp 1 import, bit for bit: the experts split with the
    table a TP=2 MoE training run saves by (that merge is checked against one process's weights in
    test_moe_expert_parallel_equals_one_process.py), so the split is that training layout."""
    hf_mixtral(tmp_path / "hf")
    import_folder(tmp_path / "hf", tmp_path / "tp1")
    import_folder(tmp_path / "hf", tmp_path / "tp2", tp=2)
    assert checkpoint.tp_size_of(checkpoint.resolve(tmp_path / "tp2")) == 2
    a, _, _ = checkpoint.load_merged(tmp_path / "tp1")
    b, config, _ = checkpoint.load_merged(tmp_path / "tp2")
    assert config.model_parallel_size == 2 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_round_trip_is_bit_exact(one_process, tmp_path):
    """Released Mixtrals are bf16: import and export keep every tensor's bits and dtype."""
    hf_mixtral(tmp_path / "hf").to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    import_folder(tmp_path / "hf", tmp_path / "ckpt")
    assert load_config(checkpoint.resolve(tmp_path / "ckpt") / checkpoint.CONFIG_FILE).dtype_name == "bf16"
    export_folder(tmp_path / "ckpt", tmp_path / "back")
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)


def test_transformers_5_fused_experts_import_as_the_released_layout(one_process, tmp_path):
    """transformers 5 holds each layer's experts fused (gate_up_proj [E, 2I, h], gate first; down_proj): a
    state dict in that layout imports to the same weights as the per-expert files. An expert missing a tensor
    is one line."""
    theirs = hf_mixtral(tmp_path / "hf")
    config = from_dict(config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text())))
    fused = from_hf_state_dict(theirs.state_dict(), config)
    released = from_hf_state_dict(load_file(tmp_path / "hf" / "model.safetensors"), config)
    assert fused.keys() == released.keys()
    assert all(torch.equal(fused[k], released[k]) for k in fused)
    partial = {k: v for k, v in load_file(tmp_path / "hf" / "model.safetensors").items()
               if k != "model.layers.1.block_sparse_moe.experts.2.w3.weight"}
    with pytest.raises(UserError, match="Mixtral layer 1 expert 2 has w1, w2; each expert needs w1, w2 and w3"):
        from_hf_state_dict(partial, config)


# Mixtral-8x7B's published config.json (mistralai/Mixtral-8x7B-v0.1), the fields the import reads
MIXTRAL_8X7B = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
                "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
                "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
                "num_key_value_heads": 8, "num_local_experts": 8, "rms_norm_eps": 1e-05, "rope_theta": 1e6,
                "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
                "vocab_size": 32000}


def test_mixtral_8x7b_config_json_imports_as_its_published_size(one_process, tmp_path):
    """46.7B parameters, 12.9B active (as tests/test_moe_model_summary_counts_total_and_active.py works out)."""
    import yaml

    keys = {**config_from_hf(MIXTRAL_8X7B), "tokenizer_type": "HFTokenizer", "precision": "bfloat16",
            "make_vocab_size_divisible_by": 128}
    (tmp_path / "mixtral.yml").write_text(yaml.safe_dump(keys))
    out = summary(tmp_path / "mixtral.yml")
    assert re.search(r"^parameters: 46702792704$", out, re.M)
    assert re.search(r"^active_parameters: 12879925248 ", out, re.M)


MIXTRAL_KEYS = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=128, vocab_size=1024,
                    pos_emb="rotary", norm="rmsnorm", num_kv_heads=2, mlp_type="gated", activation="silu",
                    intermediate_size=96, use_bias_in_attn_linear=False, use_bias_in_mlp=False,
                    use_bias_in_norms=False, no_weight_tying=True, moe_num_experts=4, moe_top_k=2,
                    moe_router_type="topk", moe_normalize_expert_weights=True)
REFUSED = {  # what changes in a Mixtral-shaped config -> the reason its one line names
    "sinkhorn": (dict(moe_router_type="sinkhorn", moe_normalize_expert_weights=False), "Sinkhorn"),
    "not-renormalised": (dict(moe_normalize_expert_weights=False), "moe_normalize_expert_weights false"),
    "interval-2": (dict(moe_expert_interval=2), "Mixtral has experts in every layer"),
    "gelu-experts": (dict(mlp_type="regular", activation="gelu"), "Mixtral's experts are SwiGLU"),
    "parallel-residual": (dict(gpt_j_residual=True), "parallel residual"),
    "layernorm": (dict(norm="layernorm", use_bias_in_norms=True), "Mixtral has RMSNorm"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_moe_models_no_hf_class_computes_are_one_line_each(one_process, tmp_path, name):
    change, why = REFUSED[name]
    with pytest.raises(UserError, match=re.escape(why)) as refused:
        family(from_dict({**MIXTRAL_KEYS, **change}))
    assert "\n" not in str(refused.value) and "no Hugging Face class computes this model" in str(refused.value)


def test_export_of_a_sinkhorn_checkpoint_and_import_of_olmoe_are_one_line(one_process, tmp_path):
    from neox_fork.model.transformer import build_model

    config = from_dict({**MIXTRAL_KEYS, "moe_router_type": "sinkhorn", "moe_normalize_expert_weights": False})
    checkpoint.save_model_checkpoint(tmp_path / "ckpt", 1, [checkpoint.model_state(build_model(config))], config)
    with pytest.raises(UserError, match="moe_router_type 'sinkhorn'"):
        export_folder(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    (tmp_path / "olmoe").mkdir()
    (tmp_path / "olmoe" / "config.json").write_text(json.dumps({"model_type": "olmoe"}))
    with pytest.raises(UserError, match=r"model_type 'olmoe': not importable \(q and k RMSNorms"):
        import_folder(tmp_path / "olmoe", tmp_path / "out")


# ---------------------------------------------------------------------- trained here, end to end (slow)
TRAIN_KEYS = dict(norm="rmsnorm", rotary_pct=1.0, use_bias_in_norms=False, num_kv_heads=2, intermediate_size=96,
                  sliding_window_width=16, moe_num_experts=4, moe_top_k=2, moe_router_type="topk",
                  moe_normalize_expert_weights=True, moe_aux_loss_coeff=0.01)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus):
    """A transformers Mixtral imported with the import tool, trained 3 steps here (finetune) and exported with
    the export tool: (folder, the transformers model it started from)."""
    root = tmp_path_factory.mktemp("mixtral")
    config_path = write_train_config(root, small_corpus, train_iters=3, extra_save_iters=[0], **TRAIN_KEYS)
    start, _ = finetune_from_random_hf_model(config_path, MixtralForCausalLM, MixtralConfig, root / "start",
                                             root / "imported")
    run_training(config_path)
    done = run_cli("tools/convert_to_hf.py", "--input-dir", str(root / "ckpt"), "--output-dir", str(root / "hf"))
    assert done.returncode == 0, done.stderr
    return root, start


@pytest.mark.slow
def test_imported_mixtral_trains_from_its_weights_and_exports_with_transformers_logits(one_process, trained):
    root, start = trained
    config = load_config(root / "config.yml")
    begin, _, _ = checkpoint.load_merged(root / "ckpt", step=0)
    expected = from_hf_state_dict(start.state_dict(), config)
    assert begin.keys() == expected.keys() and all(torch.equal(begin[k], expected[k]) for k in begin)
    losses, lbl = read_metrics(root / "ckpt"), read_metrics(root / "ckpt", "moe_lbl")
    assert sorted(losses) == [1, 2, 3] and sorted(lbl) == [1, 2, 3]
    final, _, _ = checkpoint.load_merged(root / "ckpt")
    assert not torch.equal(final["layers.0.mlp.moe.router.weight"], begin["layers.0.mlp.moe.router.weight"])

    ours, _, _ = load_for_inference(root / "ckpt")
    theirs, info = AutoModelForCausalLM.from_pretrained(root / "hf", output_loading_info=True)
    assert type(theirs).__name__ == "MixtralForCausalLM"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokens = torch.randint(0, 600, (2, 100), generator=torch.Generator().manual_seed(3))  # 100 > the window of 16
    with torch.no_grad():
        assert (ours(tokens) - theirs.eval()(tokens).logits).abs().max().item() < 1e-5


@pytest.mark.slow
def test_generate_py_greedy_equals_transformers_generate(one_process, trained):
    root, _ = trained
    hf = AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    prompt = [5, 17, 300, 2, 99]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    run = run_cli("generate.py", "--checkpoint", str(root / "ckpt"), "--prompt-ids", ",".join(map(str, prompt)),
                  "--max-new-tokens", "24", "--temperature", "0", "--json", "--no-stop-on-eod")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1])["token_ids"] == expected


@pytest.mark.slow
def test_eval_py_equals_lm_eval_hf_on_the_exported_mixtral(trained):
    from test_eval_matches_lm_eval_hf import assert_same_scores, lm_eval_hf, our_eval

    root, _ = trained
    tasks = ["neox_facts", "neox_prose"]
    ours, _ = our_eval(root / "ckpt", tasks, 8, root / "ours.json")
    assert_same_scores(ours, lm_eval_hf(root / "hf", tasks, 8), tasks)
