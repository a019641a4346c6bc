"""The family's new pieces train at TP=2 exactly as in one process: grouped-query attention split by groups,
biases in QKV/dense/MLP, RMSNorm, upstream's swiglu sizing, parallel residual, learned positions, tied
embeddings. Same runs and bounds as tests/test_parallel_equivalence.py (fp32, gloo, Adam eps 1e-5)."""

import pytest

from neox_fork.checkpoint import store as checkpoint
from test_parallel_equivalence import assert_same_losses, assert_same_weights, train

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

FAMILY = dict(num_kv_heads=2, norm="rmsnorm", use_bias_in_norms=False, mlp_type="regular", activation="swiglu",
              use_bias_in_attn_linear=True, use_bias_in_mlp=True, gpt_j_residual=True, pos_emb="learned",
              no_weight_tying=False, train_micro_batch_size_per_gpu=4)


def test_gqa_biases_rmsnorm_parallel_residual_learned_positions_tied_tp2_equals_one_process(tmp_path, small_corpus):
    one = train(tmp_path, small_corpus, "tp1", 1, **FAMILY)
    two = train(tmp_path, small_corpus, "tp2", 2, model_parallel_size=2, **FAMILY)
    weights, _, _ = checkpoint.load_merged(two)
    assert "position_embeddings.weight" in weights and "output_layer.weight" not in weights
    assert weights["layers.0.attention.query_key_value.bias"].shape == (16 * (4 + 2 * 2),)
    assert weights["layers.0.input_layernorm.scale"].shape == (64,)
    assert_same_losses(two, one)
    assert_same_weights(two, one)
