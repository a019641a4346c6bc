"""LoRA adapters (neox_fork/model/adapters.py): each adapted linear computes W x + s B A x, only the adapters train,
and TP=2 computes what TP=1 computes (forward, gradients, dropout on) from the same seed.

Tolerances: fp32 throughout; TP=2 sums the same products in another order (a split matmul, an all-reduce), so
values agree to a few fp32 ulps of their magnitude: 1e-5 absolute on logits of order 1, 1e-4 relative on
gradients.
"""

import math

import pytest
import torch

from conftest import tiny_keys
from distributed import run_distributed
from neox_fork.config.loading import from_dict
from neox_fork.errors import UserError

LORA = dict(adapter="lora", lora_r=4, lora_alpha=8, lora_target_modules=["query_key_value", "dense", "linear1",
                                                                           "linear2"])


def _tokens(length=24):
    return torch.randint(0, 1000, (2, length), generator=torch.Generator().manual_seed(5))


def test_adapted_linear_is_w_x_plus_scaled_b_a_x(one_process):
    from neox_fork.model.transformer import build_model

    for rslora, scale in ((False, 8 / 4), (True, 8 / math.sqrt(4))):
        model = build_model(from_dict(tiny_keys(**LORA, use_rslora=rslora))).eval()
        layer = model.layers[1]
        for linear in (layer.attention.query_key_value, layer.attention.dense, layer.mlp.linear1, layer.mlp.linear2):
            assert torch.count_nonzero(linear.lora.B) == 0  # B starts at zero: the model starts as its base
            with torch.no_grad():
                linear.lora.B.normal_(generator=torch.Generator().manual_seed(1))
            x = torch.randn(3, 5, linear.weight.shape[1], generator=torch.Generator().manual_seed(2))
            w, a, b = linear.weight, linear.lora.A, linear.lora.B
            expected = x @ w.T + scale * ((x @ a.T) @ b.T)  # no biases in the tiny StableLM's linears
            with torch.no_grad():
                got, _ = linear(x)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_only_adapters_train_and_base_is_unchanged_by_adding_them(one_process):
    from neox_fork.model.transformer import build_model
    from neox_fork.parallel import groups as parallel

    parallel.seed_everything(3)
    plain = build_model(from_dict(tiny_keys()))
    parallel.seed_everything(3)
    model = build_model(from_dict(tiny_keys(**{**LORA, "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"layers.{i}.attention.{m}.lora.{t}" for i in range(2)
                               for m in ("query_key_value", "dense") for t in "AB")
    base = {n: p for n, p in model.named_parameters() if ".lora." not in n}
    assert base.keys() == dict(plain.named_parameters()).keys()
    for name, p in plain.named_parameters():
        assert torch.equal(p, base[name]), name
    with torch.no_grad():
        assert torch.equal(model.eval()(_tokens()), plain.eval()(_tokens()))


def test_bad_lora_keys_are_one_line():
    for keys, words in ((dict(lora_r=0), "lora_r"), (dict(lora_target_modules=["q_proj", "v_proj"]), "k_proj"),
                        (dict(lora_target_modules=["attn"]), "unknown target 'attn'"),
                        (dict(adapter="dora"), "not built"), (dict(lora_dropout=1.0), "lora_dropout"),
                        (dict(adapter="qlora", pipe_parallel_size=2), "adapter qlora with pipe_parallel_size 2"),
                        (dict(adapter="qlora", model_parallel_size=2, sequence_parallel=True),
                         "adapter qlora with sequence_parallel at model_parallel_size 2"),
                        (dict(use_bnb_optimizer=True), "bitsandbytes' optimizer is not built"),
                        (dict(pipe_parallel_size=2, train_impl="dpo", dataset_impl="pairwise",
                              pos_train_data_paths=["a"], neg_train_data_paths=["b"]),
                         "train_impl 'dpo' with pipe_parallel_size 2 is not built"),  # as for dense runs
                        (dict(train_impl="rm", dataset_impl="pairwise", pos_train_data_paths=["a"],
                              neg_train_data_paths=["b"]), "train_impl rm")):
        with pytest.raises(UserError, match=words):
            from_dict(tiny_keys(**{**LORA, **keys}))


def _train_two_steps(rank, keys, weights=None, length=24):
    """Forward+backward, an SGD step on the adapters, forward+backward again, with dropout on the adapters:
    the losses, logits and this rank's adapter tensors and gradients (with their TP split) of each step.
    `weights` (whole, TP=1) replace those of the seeded model first. For tests/test_lora_qlora_trains_on_cpu.py:
    `adapter: qlora` quantizes the base, and the dequantized weights of this rank come back too."""
    from neox_fork.checkpoint.store import split_tp
    from neox_fork.model.adapters import adapter_sharding, quantize_base
    from neox_fork.model.transformer import build_model
    from neox_fork.parallel import groups as parallel

    config = from_dict(keys)
    parallel.initialize(config.model_parallel_size, backend="gloo")
    parallel.seed_everything(config.seed)
    model = build_model(config)
    parallel.sum_sequence_parallel_grads(model)  # as build_engine does (sequence parallelism's replicated params)
    out = {"specs": adapter_sharding(model), "steps": []}
    if weights is not None:
        mine = split_tp(weights, config.model_parallel_size)[rank]
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in mine:
                    p.copy_(mine[name])
    if config.adapter == "qlora":
        import bitsandbytes as bnb

        quantize_base(model)
        out["dequantized"] = {name: bnb.functional.dequantize_4bit(p.data, p.quant_state)
                              for name, p in model.named_parameters() if p.dtype == torch.uint8}
    tokens = _tokens(length)
    for _ in range(2):
        model.train()
        parallel.seed_everything(11)  # the same dropout masks at both sizes
        loss = model(tokens[:, :-1], labels=tokens[:, 1:])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        values = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            logits = model.eval()(tokens)
            for p in model.parameters():
                if p.requires_grad:
                    p -= 0.5 * p.grad
                    p.grad = None
        out["steps"].append((loss.item(), logits, values, grads))
    assert all(p.grad is None for p in model.parameters())  # frozen base: no gradient ever reached it
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp2_trains_like_tp1_with_adapter_dropout(sequence_parallel):
    """With sequence parallelism too: the adapter of a column-parallel base gathers its input's positions as the base
    does, a row-parallel one reduce-scatters A x, and B of the latter (seeing this rank's positions) has its
    gradient summed over the TP group; the dropout masks are TP=1's."""
    from neox_fork.checkpoint.store import merge_tp_shards

    keys = tiny_keys(**LORA, lora_dropout=0.2, seed=9)
    length = 25 if sequence_parallel else 24  # 24 positions in: divisible by the TP size under SP
    one = run_distributed(_train_two_steps, 1, dict(keys, model_parallel_size=1), None, length)[0]
    two = run_distributed(_train_two_steps, 2, dict(keys, model_parallel_size=2, sequence_parallel=sequence_parallel),
                          None, length)
    specs = two[0]["specs"]
    assert specs["layers.0.attention.query_key_value.lora.B"] == (0, 1)
    assert specs["layers.0.mlp.linear1.lora.B"] == (0, 2)  # split like the gated [up_r; gate_r] rows
    assert specs["layers.0.attention.dense.lora.A"] == (1, 1)
    assert specs["layers.0.mlp.linear2.lora.B"] is None and specs["layers.0.attention.query_key_value.lora.A"] is None
    for step in range(2):
        loss1, logits1, values1, grads1 = one["steps"][step]
        loss2, logits2, _, _ = two[0]["steps"][step]
        assert abs(loss1 - loss2) < 1e-5
        torch.testing.assert_close(logits2, logits1, rtol=0, atol=1e-5)
        for i in (2, 3):  # the adapters and their gradients, merged over the TP ranks
            merged = merge_tp_shards([t["steps"][step][i] for t in two], specs)
            for name, tensor in (values1 if i == 2 else grads1).items():
                torch.testing.assert_close(merged[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    assert any(torch.count_nonzero(g) for g in one["steps"][1][3].values() if g.dim())  # A gets gradients once B != 0


def test_activation_checkpointing_replays_the_adapter_dropout(one_process):
    """The 3B recipe recomputes each layer in the backward: the adapters' dropout masks must be drawn again alike,
    so the gradients equal those of the run that keeps its activations (the same fp32 operations: equal)."""
    from neox_fork.model.transformer import build_model
    from neox_fork.parallel import groups as parallel

    grads = []
    for recompute in (False, True):
        parallel.seed_everything(4)
        model = build_model(from_dict(tiny_keys(**LORA, lora_dropout=0.3, checkpoint_activations=recompute))).train()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".lora.B"):
                    p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(n)))
        parallel.seed_everything(5)
        tokens = _tokens()
        model(tokens[:, :-1], labels=tokens[:, 1:]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0, msg=name)
