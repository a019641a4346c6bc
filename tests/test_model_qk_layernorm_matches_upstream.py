"""use_qk_layernorm as upstream gpt-neox builds it: one norm of the config's kind over [heads, head_dim]
applied to the queries and the keys after the QKV split and before rotary. LayerNorm (torch's, with a bias)
normalises over heads and head_dim together; upstream's RMSNorm normalises each head over head_dim, with a
[heads, head_dim] scale. Checked against the attention written out here; the weights keep upstream's
checkpoint names (attention.qk_layernorm.*) and split over tensor-parallel ranks by heads."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_keys
from neox_fork.checkpoint import store as checkpoint
from neox_fork.config.loading import from_dict
from neox_fork.errors import UserError
from neox_fork.checkpoint.hf import export_folder
from neox_fork.model.transformer import build_model
from neox_fork.checkpoint.neox_layout import to_neox
from neox_fork.training.optim import param_groups

H, D = 4, 16  # tiny_keys: hidden 64, 4 heads


def qk_model(norm, seed=0, **extra):
    keys = tiny_keys(rotary_pct=1.0, use_qk_layernorm=True, norm=norm, **extra)
    if norm == "rmsnorm":
        keys.update(use_bias_in_norms=False)
    config = from_dict(keys)
    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
        for name, p in model.named_parameters():
            if "qk_layernorm" in name:  # a random per-(head, dim) affine, so its layout matters
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith(("weight", "scale")) else 0.0))
    return config, model


def by_hand(attn, x, norm, eps, qk=True):
    """The layer's attention block written out: QKV per head [q, k, v], the qk norm, rotate-half rotary over
    the whole head, causal softmax, output projection (biases off in tiny_keys)."""
    b, s, _ = x.shape
    qkv = (x @ attn.query_key_value.weight.T).view(b, s, H, 3, D)
    q, k, v = qkv.unbind(3)
    if qk:
        n = attn.qk_layernorm
        if norm == "layernorm":
            def f(t):
                mean = t.mean(dim=(-2, -1), keepdim=True)
                var = ((t - mean) ** 2).mean(dim=(-2, -1), keepdim=True)
                return (t - mean) / torch.sqrt(var + eps) * n.weight + n.bias
        else:
            def f(t):
                return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * n.scale
        q, k = f(q), f(k)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.arange(s).float()[:, None] * inv
    cos, sin = (torch.cat((t, t), -1)[None, :, None] for t in (ang.cos(), ang.sin()))

    def rot(t):
        return t * cos + torch.cat((-t[..., D // 2:], t[..., : D // 2]), -1) * sin

    q, k = rot(q), rot(k)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, H * D)
    return out @ attn.dense.weight.T


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_queries_and_keys_are_normalised_before_rotary_as_upstream(one_process, norm):
    config, model = qk_model(norm)
    eps = config.rms_norm_epsilon if norm == "rmsnorm" else config.layernorm_epsilon
    attn = model.layers[0].attention
    x = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(3))
    cos, sin = model.rotary(torch.arange(24).unsqueeze(0))
    with torch.no_grad():
        ours = attn(x, model.rotary, cos, sin)
        torch.testing.assert_close(ours, by_hand(attn, x, norm, eps), atol=2e-5, rtol=2e-5)
        assert (ours - by_hand(attn, x, norm, eps, qk=False)).abs().max() > 1e-2


@pytest.mark.parametrize("norm, params", [("layernorm", ("weight", "bias")), ("rmsnorm", ("scale",))])
def test_weights_keep_upstreams_names_split_by_heads_and_get_no_decay(one_process, norm, params):
    config, model = qk_model(norm)
    state = checkpoint.model_state(model)
    layer = to_neox(state)[2]  # upstream's layer index of transformer layer 0
    assert sorted(k for k in layer if "qk_layernorm" in k) == sorted(f"attention.qk_layernorm.{p}" for p in params)
    full = state["layers.0.attention.qk_layernorm." + params[0]]
    assert full.shape == (H, D)
    shards = checkpoint.split_tp(state, 2)
    assert [s["layers.0.attention.qk_layernorm." + params[0]].shape for s in shards] == [(H // 2, D)] * 2
    assert torch.equal(checkpoint.merge_tp_shards(shards)["layers.0.attention.qk_layernorm." + params[0]], full)
    no_decay = {id(p) for p in param_groups(model, 0.1)[1]["params"]}
    assert all(id(p) in no_decay for n, p in model.named_parameters() if "qk_layernorm" in n)
    without = sum(p.numel() for p in build_model(from_dict({**tiny_keys(rotary_pct=1.0, norm=norm),
                                                             "use_qk_layernorm": False})).parameters())
    assert sum(p.numel() for p in model.parameters()) - without == 2 * len(params) * H * D  # 2 layers


@pytest.mark.parametrize("keys, message", [
    (dict(num_kv_heads=2), "use_qk_layernorm with grouped-query attention"),
    (dict(model_parallel_size=2), "use_qk_layernorm with norm layernorm at model_parallel_size > 1"),
])
def test_what_upstream_cannot_run_or_would_change_with_tp_is_refused(keys, message):
    with pytest.raises(UserError, match=message):
        from_dict(tiny_keys(use_qk_layernorm=True, **keys))


def test_export_is_refused_in_one_line(one_process, tmp_path):
    """StableLm's qk_layernorm is a bias-free LayerNorm per head, separate for q and k: not upstream's."""
    config, model = qk_model("layernorm")
    checkpoint.save_model_checkpoint(tmp_path / "ckpt", 1, [checkpoint.model_state(model)], config)
    with pytest.raises(UserError, match="use_qk_layernorm: upstream's one norm over"):
        export_folder(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_fused_rotary_path_is_not_taken_around_the_norm(one_process):
    """With one key/value head per query head the model normally rotates the fused QKV in one kernel; the qk
    norm must come first, so the whole model's logits move when the norm's weights do."""
    _, model = qk_model("rmsnorm")
    tokens = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens)
        model.layers[0].attention.qk_layernorm.scale.mul_(F.softplus(torch.randn(H, D)))
        assert (model(tokens) - before).abs().max() > 1e-3
