"""NeoX YAML files load into one typed config; bad configs fail with one line naming file and key."""


import pytest

from conftest import REPO, run_cli
from neox_fork.config.loading import load_config
from neox_fork.errors import UserError

STABLELM = REPO / "configs" / "stablelm-3b-4e1t.yml"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_published_stablelm_config_builds_the_hf_architecture():
    c = load_config(STABLELM)
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.seq_length) == (32, 2560, 32, 4096)
    assert c.ffn_hidden_size == 6912  # from mlp_multiple_of 256 and mlp_type gated
    assert c.rotary_dim == 20 and c.head_dim == 80
    assert c.use_bias_in_norms and not c.use_bias_in_attn_linear and not c.use_bias_in_mlp
    assert not c.tie_word_embeddings
    assert c.padded_vocab_size() == 50304
    assert c.dtype_name == "bf16" and c.zero_stage == 1
    assert c.warmup_steps == 4775 and c.adam_betas == (0.9, 0.95) and c.adam_eps == 1e-6
    assert c.train_iters == 955_000 and c.save_every == 2000
    assert c.attention_types == ["flash"] * 32


def test_dash_and_underscore_keys_are_the_same_and_later_files_override(tmp_path, caplog):
    a = write(tmp_path, "a.yml", "num-layers: 3\nhidden_size: 96\nnum-attention-heads: 4\n")
    b = write(tmp_path, "b.yml", "num_layers: 5\nlr: 1e-4\n")
    with caplog.at_level("INFO"):
        c = load_config(a, b)
    assert c.num_layers == 5 and c.hidden_size == 96
    assert c.lr == 1e-4 and isinstance(c.lr, float)  # '1e-4' without a dot is a float, not a string
    assert "overrides num_layers = 5 (was 3" in caplog.text
    assert c.where("num_layers") == str(b)


@pytest.mark.parametrize("text, message", [
    ("hiden_size: 64\n", "unknown key 'hiden_size'; did you mean 'hidden_size'?"),
    ("num_layers: two\n", "key 'num_layers' must be int, got 'two' (str)"),
    ("hidden_size: 100\nnum_attention_heads: 3\n", "num_attention_heads 3 does not divide hidden_size 100"),
    ("num_gpus: 2\ntrain_micro_batch_size_per_gpu: 4\ntrain_batch_size: 10\n",
     "train_batch_size 10 != train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 1 x data-parallel size 2"),
    ("num_gpus: 3\nmodel_parallel_size: 2\n", "model_parallel_size 2 does not divide the world size 3"),
    ("num_layers: [1,\n", "YAML syntax error at line"),
    ("mlp_type: moe\n", "mlp_type 'moe' is not supported: mixture of experts is moe_num_experts > 1 (upstream's "
                       "key), not an MLP type; valid: regular, gated, llama"),
    ("train_data_paths: [a, b]\ntrain_data_weights: [1.0]\n", "train_data_weights has 1 entries but train_data_paths has 2"),
    ("context_parallel_size: 2\npipe_parallel_size: 2\n", "context_parallel_size 2 with pipeline stages is not built; "
                                                          "use context_parallel_size 1 for it"),
])
def test_bad_config_is_one_clear_error_naming_file_and_key(tmp_path, text, message):
    path = write(tmp_path, "bad.yml", text)
    with pytest.raises(UserError) as err:
        load_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(UserError, match="config file '.*nope.yml' not found"):
        load_config(tmp_path / "nope.yml")


@pytest.mark.slow
def test_entry_point_prints_one_line_and_no_traceback(tmp_path):
    path = write(tmp_path, "bad.yml", "num_attention_head: 4\n")
    run = run_cli("tools/model_summary.py", str(path))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"error: {path}: unknown key 'num_attention_head'; did you mean 'num_attention_heads'?"]
    assert "Traceback" not in run.stderr + run.stdout
