"""Activation checkpointing and torch.compile change speed and memory, not numbers; the training optimizer
takes the steps of AdamW written out."""

import functools

import pytest
import torch

from conftest import tiny_keys
from neox_fork.parallel import groups as parallel
from neox_fork.config.loading import from_dict
from neox_fork.model.transformer import build_model
from reference_adamw import adamw_float64, three_random_steps

B, S = 2, 32


def _loss_and_grads(**keys):
    parallel.seed_everything(0)  # also the model-parallel stream attention dropout forks (recompute replays it)
    model = build_model(from_dict(tiny_keys(num_layers=3, seq_length=S, **keys))).train()
    g = torch.Generator().manual_seed(0)
    tokens, labels = (torch.randint(0, 1000, (B, S), generator=g) for _ in range(2))
    loss = model(tokens, labels=labels)
    loss.backward()
    return model, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(a, b, tol):
    (_, loss_a, grads_a), (_, loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=tol, rtol=tol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=tol, rtol=tol, msg=name)


# 2 of 3 layers: an uneven last group; with dropout the recompute must replay the masks of the forward
@pytest.mark.parametrize("num_layers_per_checkpoint,dropout", [(1, 0.0), (1, 0.1), (2, 0.1)])
def test_activation_checkpointing_gives_the_same_loss_and_grads(one_process, num_layers_per_checkpoint, dropout):
    """Full recompute re-runs each group's forward in the backward: the same operations on the same inputs,
    so 1e-6 (a few fp32 ulps of values of order 1) bounds any difference, once the RNG is restored."""
    keys = dict(attention_dropout=dropout, hidden_dropout=dropout)
    eager = _loss_and_grads(**keys)
    checkpointed = _loss_and_grads(checkpoint_activations=True, checkpoint_num_layers=num_layers_per_checkpoint,
                                   **keys)
    assert checkpointed[0].shape.checkpoint_activations
    _assert_same(checkpointed, eager, 1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.1])  # with dropout the recompute must replay the same masks
def test_selective_recompute_gives_the_same_loss_and_grads(one_process, dropout):
    """Megatron-style selective recompute (rotary + attention core re-run in the backward) changes memory only.
    Both runs do the same operations in the same order on the same inputs, so 1e-6 (a few fp32 ulps of
    values of order 1) bounds any difference; the recompute must restore the RNG for the dropout masks."""
    keys = dict(attention_dropout=dropout, hidden_dropout=dropout)
    selective = _loss_and_grads(checkpoint_activations=True, recompute_granularity="selective", **keys)
    assert selective[0].shape.selective_recompute and not selective[0].shape.checkpoint_activations
    _assert_same(selective, _loss_and_grads(**keys), 1e-6)


def test_compiled_layers_keep_state_dict_names_and_graph_matches_eager(one_process, monkeypatch):
    """Dynamo capture + AOT autograd (with checkpointing) without Inductor's code generation: seconds."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = _loss_and_grads(torch_compile=True, checkpoint_activations=True)
    model = compiled[0]
    assert model.shape.torch_compile and len(model.compiled_layers()) == 3
    assert all(not name.startswith("_") and "_orig_mod" not in name for name in model.state_dict())
    _assert_same(compiled, _loss_and_grads(checkpoint_activations=True), 1e-5)


def test_inductor_compiled_model_matches_eager(one_process):
    """The real `torch_compile: true` path through Inductor (CPU C++ here; about 25-45 s cold on 2 cores)."""
    _assert_same(_loss_and_grads(torch_compile=True), _loss_and_grads(), 1e-5)


def test_cached_decoding_stays_eager_when_compiled(one_process, monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch.manual_seed(0)
    model = build_model(from_dict(tiny_keys(num_layers=2, seq_length=S, torch_compile=True))).eval()
    tokens = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        full = model(tokens)[:, -1]
        model.compiled_layers = None  # a cached call that reached the compiled layers would fail here
        cache = model.new_kv_cache()
        model(tokens[:, :-1], kv_cache=cache)
        last = model(tokens[:, -1:], kv_cache=cache)[:, -1]
    torch.testing.assert_close(last, full, atol=1e-5, rtol=1e-5)


def test_training_optimizer_is_adamw_with_decay_on_matrices_only(one_process):
    """build_optimizer (what the training loop steps) against AdamW written out: the config's lr, betas,
    eps and weight decay, decoupled decay on matrices, none on norms and biases."""
    lr, (b1, b2), eps, wd = 1e-2, (0.8, 0.9), 1e-3, 0.3
    config = from_dict(tiny_keys(optimizer={"type": "Adam", "params": {"lr": lr, "betas": [b1, b2], "eps": eps}},
                                 weight_decay=wd, use_bias_in_norms=True))
    model, start, grads, opt = three_random_steps(config)
    for n, p in model.named_parameters():
        w = adamw_float64(start, grads, n, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd if p.dim() >= 2 else 0.0)
        torch.testing.assert_close(p.detach().double(), w, atol=1e-6, rtol=1e-6, msg=n)
