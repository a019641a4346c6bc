"""Upstream GPT-NeoX configs load unchanged and build the released models; what is not built is refused in one
line; upstream's defaults hold; no-effect keys are named; docs/config.md is what the config class generates."""

import contextlib
import io
import re

import pytest
import torch

from conftest import REPO
from neox_fork.config.neox_config import NeoXConfig
from neox_fork.config.loading import from_dict, ignored_settings, load_config, log_ignored_settings
from neox_fork.errors import UserError
from neox_fork.perf.summary import print_summary

UPSTREAM = REPO / "tests" / "upstream_configs"


def summary_parameters(*configs):
    """What tools/model_summary.py prints as `parameters:` (a meta-device build checked against the formula)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_summary(list(configs))
    return int(re.search(r"^parameters: (\d+)$", out.getvalue(), re.M)[1])


@pytest.mark.parametrize("config, released", [
    ("pythia/160M.yml", 162_322_944),      # EleutherAI/pythia-160m, vocab padded to 50,304
    ("pythia/1-4B.yml", 1_414_647_808),
    ("pythia/2-8B.yml", 2_775_208_960),
])
def test_upstream_pythia_configs_build_the_released_parameter_counts(one_process, config, released):
    assert summary_parameters(UPSTREAM / config) == released


def test_upstream_test_setup_yml_loads_and_steps_its_sm3(one_process):
    """Upstream's own tests/config/test_setup.yml: optimizer type sm3 with `params: {}`, fp16, `use_wandb: False`,
    `hostfile: "None"`. It loads, and its model takes SM3 steps at upstream's default lr (0.001): with every
    gradient 1, SM3's first update is g / sqrt(g^2) = 1 per weight, so each moves by exactly the lr."""
    from neox_fork.model.transformer import build_model
    from neox_fork.training.optim import build_optimizer

    c = load_config(UPSTREAM / "test_setup.yml")
    assert (c.optimizer_kind, c.dtype_name, c.learning_rate, c.use_wandb) == ("sm3", "fp16", 1e-3, False)
    model = build_model(c)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(c, model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(b - p.detach(), torch.full_like(b, 1e-3), rtol=1e-4, atol=1e-7)


def test_upstream_llama2_7b_builds_llama_2_7b_shapes(one_process, tmp_path):
    """llama2/7B.yml leaves use_bias_in_mlp at upstream's default (true), so gpt-neox itself builds MLP biases
    there: 32 x (22016 + 4096) more than Llama-2-7B's 6,738,415,616. Without them it is exactly Llama-2-7B.
    The vocabulary (32,000) comes from Llama's tokenizer, which the config leaves to an overlay."""
    tokenizer = tmp_path / "tokenizer.yml"
    tokenizer.write_text("vocab_size: 32000\n")
    assert summary_parameters(UPSTREAM / "llama2/7B.yml", tokenizer) == 6_738_415_616 + 32 * (22016 + 4096)
    no_bias = tmp_path / "no-mlp-bias.yml"
    no_bias.write_text("use_bias_in_mlp: false\n")
    assert summary_parameters(UPSTREAM / "llama2/7B.yml", tokenizer, no_bias) == 6_738_415_616
    c = load_config(UPSTREAM / "llama2/7B.yml", tokenizer)
    assert c.mlp_widths == (22016, 11008) and c.norm == "rmsnorm" and c.rms_norm_epsilon == 1e-5


def test_published_stablelm_config_keeps_its_architecture_under_upstream_defaults(one_process):
    assert summary_parameters(REPO / "configs" / "stablelm-3b-4e1t.yml") == 2_795_443_200


def test_defaults_are_upstream_gpt_neox_args():
    c = NeoXConfig()
    assert (c.activation, c.mlp_type, c.norm, c.pos_emb) == ("gelu", "regular", "layernorm", "learned")
    assert c.use_bias_in_attn_linear and c.use_bias_in_mlp and c.use_bias_in_norms and c.tie_word_embeddings
    assert (c.rotary_pct, c.lr_decay_style, c.pipe_parallel_size, c.rms_norm_epsilon) == (1.0, "linear", 0, 1e-8)
    assert (c.weight_decay, c.eval_iters, c.log_interval, c.zero_stage) == (0.1, 100, 100, 0)
    assert not c.mlp_gated and c.mlp_widths == (4 * c.hidden_size, 4 * c.hidden_size)


@pytest.mark.parametrize("keys, widths", [
    (dict(activation="swiglu", intermediate_size=32768, mlp_multiple_of=256, hidden_size=4096), (22016, 11008)),
    (dict(mlp_type="llama", activation="silu", hidden_size=4096), (22016, 11008)),          # older upstream
    (dict(mlp_type="gated", activation="silu", mlp_multiple_of=256, hidden_size=2560), (13824, 6912)),  # Stability
    (dict(expansion_factor=2.0, hidden_size=64), (128, 128)),
])
def test_every_spelling_of_the_mlp_keeps_its_meaning(keys, widths):
    assert from_dict({"num_attention_heads": 32, **keys}).mlp_widths == widths


@pytest.mark.parametrize("text, message", [
    ("pos_emb: alibi\n", "pos_emb 'alibi' is not supported: ALiBi attention biases are not built"),
    ("attention_config: [[[sparse_fixed], 2]]\n", "attention type 'sparse_fixed' is not supported: DeepSpeed sparse"),
    ("attention_config: [[[mamba], 2]]\n", "'mamba' is not supported: Mamba blocks are not built"),
    ("attention_config: [[[rwkv], 2]]\n", "'rwkv' is not supported: RWKV blocks are not built"),
    ("moe_num_experts: 8\nexpert_model_parallel_size: 3\n",
     "expert_model_parallel_size 3 does not divide moe_num_experts 8"),
    ("gpt_j_tied: true\n", "gpt_j_tied true is not supported (one norm shared by attention and MLP"),
    ("pipe_parallel_size: 2\nzero_optimization: {stage: 2}\n",
     "zero_optimization stage 2 with pipe_parallel_size 2: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1"),
    ("num_kv_heads: 3\n", "num_kv_heads 3 must divide num_attention_heads 4"),
    ("num_kv_heads: 2\nmodel_parallel_size: 4\n", "model_parallel_size 4 does not divide num_kv_heads 2"),
    ("gas: 2\ngradient_accumulation_steps: 4\n", "gas 2 and gradient_accumulation_steps 4 disagree"),
])
def test_what_is_not_built_is_refused_in_one_line_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_config(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_gas_is_gradient_accumulation_steps():
    assert from_dict({"gas": 4}).gradient_accumulation_steps == 4


def test_no_effect_keys_set_by_a_config_are_named_in_one_line(caplog):
    c = load_config(UPSTREAM / "pythia/160M.yml")
    assert ignored_settings(c) == {"synchronize_each_layer": True, "scaled_upper_triang_masked_softmax_fusion": True,
                                   "bias_gelu_fusion": True}
    with caplog.at_level("WARNING"):
        log_ignored_settings(c)
        log_ignored_settings(from_dict({"steps_per_print": 10, "s3_path": ""}))  # defaults / empty: silent
    assert len(caplog.records) == 1 and "synchronize_each_layer=True" in caplog.text


def test_config_doc_is_generated_from_the_config_class():
    from neox_fork.config.doc import render

    doc = (REPO / "docs" / "config.md").read_text()
    assert doc == render(), "docs/config.md is stale: run python tools/config_doc.py"
    for name, field in NeoXConfig.__dataclass_fields__.items():
        if "doc" in field.metadata:  # every config key (not the bookkeeping: sources, upstream_keys, ...)
            assert f"| `{name}` |" in doc
