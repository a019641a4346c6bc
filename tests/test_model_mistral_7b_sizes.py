"""Upstream's configs/mistral/7B.yml loads and builds what upstream gpt-neox builds from it, which is not
Mistral-7B; a config with Mistral-7B's real shape builds its 7,241,732,096 parameters.

Upstream's ParallelMLP with `activation: swiglu` and `intermediate_size: 14336` (mlp_multiple_of 1):
    linear1 outputs: int(14336 * 2 / 3) = 9557, rounded up to a multiple of 2 -> 9558
    linear2 inputs:  9557 // 2 = 4778
and the MLP keeps upstream's default biases (use_bias_in_mlp true). Per layer, by hand:
    QKV      4096 x (32 + 2 x 8) x 128        = 25,165,824   (no attention biases in the config)
    dense    4096 x 4096                      = 16,777,216
    linear1  4096 x 9558 + 9558               = 39,159,126
    linear2  4778 x 4096 + 4096               = 19,574,784
    norms    2 x 4096 (RMSNorm scale)         =      8,192
    layer                                     = 100,685,142;  x 32 = 3,221,924,544
plus embedding and untied head 2 x 32000 x 4096 = 262,144,000 and the final norm 4096: 3,484,072,640.
9558 outputs split into halves of 4779 that linear2 (4778 inputs) cannot take: upstream's forward fails on it,
so here it is sized (tools/model_summary.py) but a model to run is refused in one line.
"""

import pytest
import torch

from conftest import tiny_keys
from neox_fork.config.loading import from_dict, load_config
from neox_fork.errors import UserError
from neox_fork.model.transformer import build_model
from test_config_upstream_defaults_families_and_docs import UPSTREAM, summary_parameters

MISTRAL_YML = UPSTREAM / "mistral" / "7B.yml"
# Mistral's tokenizer (32,000 ids) is left to an overlay by upstream's config. tokenizer_type: the config names
# SPMTokenizer, built by another part of this work; HFTokenizer here only so the sizing does not depend on it.
TOKENIZER = "vocab_size: 32000\ntokenizer_type: HFTokenizer\n"


def overlay(tmp_path, text):
    path = tmp_path / "overlay.yml"
    path.write_text(TOKENIZER + text)
    return path


def test_upstream_mistral_7b_yml_builds_what_upstream_builds(one_process, tmp_path):
    assert summary_parameters(MISTRAL_YML, overlay(tmp_path, "")) == 3_484_072_640
    c = load_config(MISTRAL_YML, overlay(tmp_path, ""))
    assert c.mlp_widths == (9558, 4778) and c.use_bias_in_mlp
    assert c.sliding_window_width == 4096 and c.kv_heads == 8 and c.norm == "rmsnorm"
    with torch.device("meta"), pytest.raises(UserError, match=r"linear1 gives 9558 outputs, linear2 takes 4778"):
        build_model(c, perform_initialization=False)


@pytest.mark.parametrize("spelling", [
    "intermediate_size: 43008\nuse_bias_in_mlp: false\n",  # upstream's: 43008 x 2/3 = 28672 = 2 x 14336
    "mlp_type: gated\nintermediate_size: 14336\nuse_bias_in_mlp: false\n",  # per-branch width, as HF writes it
])
def test_mistral_7b_real_shape_builds_7241732096_parameters(one_process, tmp_path, spelling):
    assert summary_parameters(MISTRAL_YML, overlay(tmp_path, spelling)) == 7_241_732_096


def test_mlp_widths_that_do_not_pair_load_but_do_not_run(one_process):
    c = from_dict(tiny_keys(mlp_type="regular", activation="swiglu", intermediate_size=98))
    with pytest.raises(UserError, match="the MLP widths do not fit together"):
        build_model(c)
