"""The LR schedule follows its formula; norms and biases get no weight decay."""

import math

import pytest

from conftest import tiny_keys
from neox_fork.config import from_dict
from neox_fork.model import build_model
from neox_fork.optim import lr_at, param_groups


def test_warmup_then_cosine_to_min_lr():
    c = from_dict(tiny_keys(train_iters=1000, lr_decay_iters=1000, warmup=0.1, min_lr=1e-5,
                            optimizer={"type": "Adam", "params": {"lr": 1e-3}}))
    assert c.warmup_steps == 100
    assert lr_at(c, 0) == pytest.approx(1e-3 / 100)
    assert lr_at(c, 99) == pytest.approx(1e-3)  # end of warmup
    assert lr_at(c, 550) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(c, 1000) == pytest.approx(1e-5)  # end of decay
    assert lr_at(c, 5000) == pytest.approx(1e-5)


def test_linear_and_constant_styles_and_warmup_iters():
    lin = from_dict(tiny_keys(train_iters=200, warmup_iters=20, lr_decay_style="linear", min_lr=0.0,
                              optimizer={"type": "Adam", "params": {"lr": 2e-3}}))
    assert lin.warmup_steps == 20
    assert lr_at(lin, 110) == pytest.approx(2e-3 * (1 - 90 / 180))
    const = from_dict(tiny_keys(lr_decay_style="constant", optimizer={"type": "Adam", "params": {"lr": 2e-3}}))
    assert lr_at(const, 10_000) == pytest.approx(2e-3)


def test_no_weight_decay_on_norms_and_biases(one_process):
    model = build_model(from_dict(tiny_keys()))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert all("norm" in n for n in no_decay_names) and any(n.endswith(".bias") for n in no_decay_names)
    assert all(n.endswith(".weight") and "norm" not in n for n in decay_names)
    assert len(decay_names) + len(no_decay_names) == len(names)
