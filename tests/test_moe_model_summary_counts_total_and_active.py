"""model_summary on a Mixtral-8x7B-shaped config prints its total and active parameters, and FLOPs per token
from the active ones (MFU counts what a token costs). By hand, per layer (h 4096, 32 query / 8 key-value heads of
128, experts gated of width 14336, no biases, RMSNorm):
    attention   4096 x (32 + 2 x 8) x 128 + 4096 x 4096   =    41,943,040
    one expert  3 x 4096 x 14336                         =   176,160,768
    router      8 x 4096                                 =        32,768
    norms       2 x 4096                                 =         8,192
total:  32 x (41,943,040 + 8 x 176,160,768 + 32,768 + 8,192) + 2 x 32000 x 4096 + 4096 = 46,702,792,704
active: 32 x (41,943,040 + 2 x 176,160,768 + 32,768 + 8,192) + 2 x 32000 x 4096 + 4096 = 12,879,925,248
(the embeddings and the untied head count in both, as Mistral AI's 46.7B / 12.9B do).
FLOPs per token: 6 x N_active_non_embedding + 12 L h s + 6 V h with N = 12,879,925,248 - 262,144,000:
    6 x 12,617,781,248 + 12 x 32 x 4096 x 4096 + 6 x 32000 x 4096 = 82,935,570,432.
"""

import contextlib
import io
import re

import yaml

from neox_fork.perf.summary import print_summary

MIXTRAL_8X7B = dict(
    num_layers=32, hidden_size=4096, num_attention_heads=32, num_kv_heads=8, seq_length=4096,
    max_position_embeddings=32768, vocab_size=32000, tokenizer_type="HFTokenizer", norm="rmsnorm",
    pos_emb="rotary", rotary_emb_base=1000000, no_weight_tying=True, mlp_type="gated", activation="silu",
    intermediate_size=14336, use_bias_in_mlp=False, use_bias_in_attn_linear=False,
    moe_num_experts=8, moe_top_k=2, moe_router_type="topk", moe_normalize_expert_weights=True,
    moe_aux_loss_coeff=0.02, precision="bfloat16",
)


def summary(tmp_path, **overrides) -> str:
    path = tmp_path / "mixtral.yml"
    path.write_text(yaml.safe_dump({**MIXTRAL_8X7B, **overrides}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_summary([path], world_size=8)
    return out.getvalue()


def test_mixtral_8x7b_total_and_active_parameters_and_active_flops(one_process, tmp_path):
    out = summary(tmp_path)
    assert re.search(r"^parameters: 46702792704$", out, re.M)
    assert re.search(r"^active_parameters: 12879925248 ", out, re.M)
    assert re.search(r"^flops_per_token: 82935570432 ", out, re.M)


def test_moe_every_other_layer_counts_the_dense_layers_in_both(one_process, tmp_path):
    """interval 2: layers 0, 2, ... have experts (upstream counts layers from 0); the others a dense MLP of the
    same width (3 x 4096 x 14336 each) and no router."""
    out = summary(tmp_path, moe_expert_interval=2)
    dense = 3 * 4096 * 14336
    total = 46_702_792_704 - 16 * (7 * dense + 8 * 4096)
    active = 12_879_925_248 - 16 * (dense + 8 * 4096)
    assert re.search(rf"^parameters: {total}$", out, re.M)
    assert re.search(rf"^active_parameters: {active} ", out, re.M)


def test_expert_parallel_memory_per_gpu_holds_one_eighth_of_the_experts(one_process, tmp_path):
    """EP 8 on 8 GPUs: each holds the dense part and 1 of 8 experts per layer, by hand:
    experts 32 x 8 x 176,160,768 = 45,097,156,608; dense 46,702,792,704 - that = 1,605,636,096;
    a rank: 1,605,636,096 + 45,097,156,608 / 8 = 7,242,780,672 parameters, bf16 weights 14,485,561,344 bytes
    = 13.49 GiB (86.99 GiB at EP 1); ZeRO-1 over the 8 / 8 = 1 expert-data-parallel rank: optimizer 12 bytes each."""
    full, ep8 = summary(tmp_path, zero_optimization={"stage": 1}), summary(
        tmp_path, zero_optimization={"stage": 1}, expert_model_parallel_size=8)
    assert re.search(r"^memory_per_gpu_gib: weights 86\.99 ", full, re.M)
    assert re.search(r"^memory_per_gpu_gib: weights 13\.49 ", ep8, re.M)
    assert re.search(r"optimizer 80\.94 ", ep8)  # 7,242,780,672 x 12 / 2**30
    assert "experts over 8 data-parallel ranks (5637144576 expert parameters a rank of 45097156608" in ep8
