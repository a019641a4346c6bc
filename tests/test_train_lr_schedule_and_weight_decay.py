"""The LR schedule follows its formula; norms and biases get no weight decay."""

import pytest
import torch

from conftest import tiny_keys
from neox_fork.config.loading import from_dict
from neox_fork.model.transformer import build_model
from neox_fork.training.optim import build_optimizer, lr_at, param_groups


def test_warmup_then_cosine_to_min_lr():
    c = from_dict(tiny_keys(train_iters=1000, lr_decay_iters=1000, warmup=0.1, min_lr=1e-5,
                            optimizer={"type": "Adam", "params": {"lr": 1e-3}}))
    assert c.warmup_steps == 100
    assert lr_at(c, 0) == pytest.approx(1e-3 / 100)
    assert lr_at(c, 49) == pytest.approx(5e-4)  # halfway through warmup: 1e-3 * 50 / 100
    assert lr_at(c, 99) == pytest.approx(1e-3)  # end of warmup
    # Off the midpoint, where cosine and linear differ (at the midpoint both give 0.5). Hand-worked:
    # step 325: progress 225/900 = 1/4, 0.5 * (1 + cos(pi/4)) = 0.853553..., 1e-5 + 9.9e-4 * 0.853553 = 8.55018e-4
    # (linear would give 7.525e-4); step 775: progress 3/4, 0.146447 -> 1.54982e-4 (linear: 2.575e-4)
    assert lr_at(c, 325) == pytest.approx(8.55018e-4, rel=1e-5)
    assert lr_at(c, 775) == pytest.approx(1.54982e-4, rel=1e-5)
    assert lr_at(c, 550) == pytest.approx(5.05e-4)  # midpoint: 1e-5 + 9.9e-4 / 2
    assert lr_at(c, 1000) == pytest.approx(1e-5)  # end of decay
    assert lr_at(c, 5000) == pytest.approx(1e-5)


def test_linear_and_constant_styles_and_warmup_iters():
    lin = from_dict(tiny_keys(train_iters=200, warmup_iters=20, lr_decay_style="linear", min_lr=0.0,
                              optimizer={"type": "Adam", "params": {"lr": 2e-3}}))
    assert lin.warmup_steps == 20
    # progress = (step - 20) / 180: 1/4 at step 65, 1/2 at 110, 3/4 at 155 (cosine would give 1.707e-3 at 65)
    assert lr_at(lin, 65) == pytest.approx(1.5e-3)
    assert lr_at(lin, 110) == pytest.approx(1e-3)
    assert lr_at(lin, 155) == pytest.approx(5e-4)
    assert lr_at(lin, 200) == pytest.approx(0.0, abs=1e-12)
    const = from_dict(tiny_keys(lr_decay_style="constant", optimizer={"type": "Adam", "params": {"lr": 2e-3}}))
    assert lr_at(const, 10_000) == pytest.approx(2e-3)


# Upstream's rule: every bias and every norm parameter is in the no-weight-decay group; the matrices
# (embeddings, QKV, dense, MLP, output) decay. Linear biases on, so a rule that decays them is seen.
DECAYED = {"word_embeddings.weight", "output_layer.weight"} | {
    f"layers.{i}.{m}.weight" for i in range(2)
    for m in ("attention.query_key_value", "attention.dense", "mlp.linear1", "mlp.linear2")}


def test_no_weight_decay_on_norms_and_biases(one_process):
    c = from_dict(tiny_keys(use_bias_in_attn_linear=True, use_bias_in_mlp=True, weight_decay=0.1,
                            optimizer={"type": "Adam", "params": {"lr": 0.5}}))
    model = build_model(c)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == DECAYED
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert no_decay_names == set(names.values()) - DECAYED
    assert {"layers.0.attention.query_key_value.bias", "layers.1.mlp.linear2.bias"} <= no_decay_names

    # What AdamW does with those groups: with zero gradients Adam's step is 0, so a decayed parameter
    # becomes exactly p * (1 - lr * wd) = 0.95 p and an undecayed one stays as it was.
    optimizer = build_optimizer(c, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for n, p in model.named_parameters():
        expected = before[n] * (1 - 0.5 * 0.1) if n in DECAYED else before[n]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0, msg=n)
