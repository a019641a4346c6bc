"""The family's new pieces train at TP=2 exactly as in one process: grouped-query attention split by groups,
biases in QKV/dense/MLP, RMSNorm, upstream's swiglu sizing, parallel residual, learned positions, tied
embeddings. Same bounds as tests/test_parallel_equivalence.py (fp32, gloo)."""

from conftest import read_metrics, run_training, write_train_config
from neox_fork import checkpoint
from test_parallel_equivalence import assert_same_weights

STEPS = 6
FAMILY = dict(num_kv_heads=2, norm="rmsnorm", use_bias_in_norms=False, mlp_type="regular", activation="swiglu",
              use_bias_in_attn_linear=True, use_bias_in_mlp=True, gpt_j_residual=True, pos_emb="learned",
              no_weight_tying=False, train_micro_batch_size_per_gpu=4, hidden_dropout=0.0, train_iters=STEPS)


def train(folder, corpus, tp):
    folder.mkdir()
    config = write_train_config(folder, corpus, model_parallel_size=tp, make_vocab_size_divisible_by=256 // tp,
                                **FAMILY)
    run_training(config, nproc=tp)
    return folder / "ckpt"


def test_gqa_biases_rmsnorm_parallel_residual_learned_positions_tied_tp2_equals_one_process(tmp_path, small_corpus):
    one, two = train(tmp_path / "tp1", small_corpus, 1), train(tmp_path / "tp2", small_corpus, 2)
    weights, config, _ = checkpoint.load_merged(two)
    assert "position_embeddings.weight" in weights and "output_layer.weight" not in weights
    assert weights["layers.0.attention.query_key_value.bias"].shape == (16 * (4 + 2 * 2),)
    assert weights["layers.0.input_layernorm.scale"].shape == (64,)
    la, lb = read_metrics(one), read_metrics(two)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    assert all(abs(la[i] - lb[i]) <= 1e-5 * abs(la[i]) for i in la), (la, lb)
    assert_same_weights(two, one)
