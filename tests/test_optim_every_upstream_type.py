"""Every optimizer type upstream's NeoXArgs offers: sgd, lion, madgrad_wd, sm3, cpu_adam, cpu_torch_adam (adam is
tested elsewhere; onebitadam is refused: DeepSpeed 0.19 has no 1-bit Adam).

* Updates: a few steps with fixed gradients equal upstream's update rule written out in float64
  (tests/reference_optimizers.py), over our parameter groups (decay on matrices, none on norms and biases;
  sm3 has none at all, as upstream's). fp32 against float64 over 3 steps: relative 1e-5 of a weight.
* Resume: at ZeRO-1 with DP=2 (cpu_adam and cpu_torch_adam with ZeRO-Offload), a run saved at step STOP
  through training/state.py (what train.py saves and loads) and resumed in fresh engines gives the same losses
  bit for bit as the run that went on, and the same weights at the end; the LR schedule (warmup, then decay)
  sets every step's lr; log_optimizer_states reads each type's state tensors whole through the ZeRO shards.
* cpu_adam / cpu_torch_adam with optimizer offload equal adam's losses (on the GPU-less device here the same
  AdamW arithmetic in another kernel) to fp32 rounding.
* Config: each type loads; what is not built, not installed, or not the type's parameter is one line."""

import sys

import pytest
import torch

from conftest import tiny_keys
from distributed import run_distributed
from reference_adamw import adamw_float64, three_random_steps
from reference_optimizers import lion_float64, madgrad_wd_float64, sgd_float64, sm3_float64
from neox_fork.config.ds_config import deepspeed_config
from neox_fork.config.loading import from_dict
from neox_fork.errors import UserError
from neox_fork.model.transformer import build_model
from neox_fork.training.optim import build_optimizer, decays

WD = 0.3
OFFLOAD = {"stage": 1, "offload_optimizer": {"device": "cpu"}}
# type -> (optimizer.params, the float64 reference of one parameter: (start, grads, weight decay) -> weights)
UPDATES = {
    "sgd": ({"lr": 0.05}, lambda w, gs, wd: sgd_float64(w, gs, lr=0.05, weight_decay=wd)),
    "sgd-nesterov": ({"lr": 0.05, "momentum": 0.9, "nesterov": True},
                     lambda w, gs, wd: sgd_float64(w, gs, lr=0.05, weight_decay=wd, momentum=0.9, nesterov=True)),
    "lion": ({"lr": 1e-3, "betas": [0.8, 0.95]},
             lambda w, gs, wd: lion_float64(w, gs, lr=1e-3, betas=(0.8, 0.95), weight_decay=wd)),
    "madgrad_wd": ({"lr": 1e-2, "momentum": 0.9, "eps": 1e-6},
                   lambda w, gs, wd: madgrad_wd_float64(w, gs, lr=1e-2, momentum=0.9, eps=1e-6, weight_decay=wd)),
    "madgrad_wd-no-momentum": ({"lr": 1e-2, "momentum": 0.0, "eps": 1e-6},
                               lambda w, gs, wd: madgrad_wd_float64(w, gs, lr=1e-2, momentum=0.0, eps=1e-6,
                                                                    weight_decay=wd)),
    "sm3": ({"lr": 0.1}, lambda w, gs, wd: sm3_float64(w, gs, lr=0.1)),
    "sm3-momentum": ({"lr": 0.1, "momentum": 0.5, "beta": 0.9},
                     lambda w, gs, wd: sm3_float64(w, gs, lr=0.1, momentum=0.5, beta=0.9)),
    "cpu_torch_adam": ({"lr": 1e-2, "betas": [0.8, 0.9], "eps": 1e-3},
                       lambda w, gs, wd: adamw_float64({"w": w}, [{"w": g} for g in gs], "w", lr=1e-2,
                                                       betas=(0.8, 0.9), eps=1e-3, weight_decay=wd)),
    "cpu_adam": ({"lr": 1e-2, "betas": [0.8, 0.9], "eps": 1e-3},
                 lambda w, gs, wd: adamw_float64({"w": w}, [{"w": g} for g in gs], "w", lr=1e-2,
                                                 betas=(0.8, 0.9), eps=1e-3, weight_decay=wd)),
}


def config_of(kind, params=None, **keys):
    zero = OFFLOAD if kind.startswith("cpu_") else {"stage": 1}
    return from_dict(tiny_keys(**{"optimizer": {"type": kind, "params": params or {"lr": 1e-3}},
                                  "zero_optimization": zero, **keys}))


@pytest.mark.parametrize("case", [pytest.param(k, marks=[pytest.mark.slow] if k == "cpu_adam" else [])
                                  for k in UPDATES])  # cpu_adam: DeepSpeed builds its C++ op (once a checkout)
def test_each_type_steps_as_upstreams_update(one_process, case):
    kind = case.split("-")[0]
    params, reference = UPDATES[case]
    config = config_of(kind, params, weight_decay=WD, use_bias_in_attn_linear=True, use_bias_in_mlp=True,
                       vocab_size=100, num_layers=1)
    model, start, grads, opt = three_random_steps(config)
    decayed = set()
    for n, p in model.named_parameters():
        wd = WD if decays(n, p) else 0.0
        decayed |= {n} if wd else set()
        w = reference(start[n], [s[n] for s in grads], wd)
        assert not torch.equal(p.detach().double(), start[n].double()), n  # the step moved it
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6,
                                   msg=f"{case}: {n}")
    assert "layers.0.attention.query_key_value.weight" in decayed and "word_embeddings.weight" in decayed
    assert "layers.0.attention.query_key_value.bias" not in decayed and "layers.0.input_layernorm.weight" not in decayed


def test_sm3_keeps_no_parameter_sized_state_without_momentum(one_process):
    """SM3's memory: a row and a column accumulator per matrix (upstream's keeps no momentum buffer at momentum
    0; pytorch-optimizer's would)."""
    config = config_of("sm3")
    model = build_model(config)
    opt = build_optimizer(config, model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    w = model.layers[0].attention.query_key_value.weight
    assert sorted(opt.state[w]) == ["accumulator_0", "accumulator_1"]
    assert [t.numel() for t in opt.state[w].values()] == list(w.shape)


def test_madgrad_step_at_lr_zero_changes_nothing(one_process):
    """The loop's skipped step (non-finite loss) runs at lr 0 with zero gradients: the weights and MADGRAD's
    step counter stay (MADGRAD itself would move p towards its dual-averaging point)."""
    config = config_of("madgrad_wd", {"lr": 1e-2})
    model = build_model(config)
    opt = build_optimizer(config, model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert [g["k"] for g in opt.param_groups] == [1, 1] and "k" not in opt.state


@pytest.mark.parametrize("keys, message", [
    (dict(optimizer={"type": "OneBitAdam", "params": {"lr": 1e-4, "freeze_step": 2}}),
     "optimizer type 'OneBitAdam' is not supported: DeepSpeed 0.19 (requirements.txt) no longer has 1-bit Adam"),
    (dict(optimizer={"type": "adagrad", "params": {}}), "optimizer type 'adagrad' is not supported; valid: adam,"),
    (dict(optimizer={"type": "lion", "params": {"lr": 1e-4, "eps": 1e-8}}),
     "optimizer type lion has no parameter 'eps' (it takes lr, betas)"),
    (dict(optimizer={"type": "sgd", "params": {"lr": 1e-4, "weight_decay": 0.1}}),
     "optimizer type sgd has no parameter 'weight_decay' (weight decay is the top-level key weight_decay)"),
    (dict(optimizer={"type": "lion", "params": {"betas": 0.9}}), "optimizer lion parameter betas must be two numbers"),
    (dict(optimizer={"type": "sgd", "params": {"nesterov": 1}}), "optimizer sgd parameter nesterov must be true or"),
    (dict(optimizer={"type": "cpu_adam", "params": {}}, zero_optimization={"stage": 1}),
     "optimizer type cpu_adam steps on the CPU: it needs ZeRO-Offload, zero_optimization {stage: 1 or 2, "
     "offload_optimizer: {device: cpu}} (upstream's spelling: cpu_offload: true)"),
    (dict(optimizer={"type": "cpu_torch_adam", "params": {}}, zero_optimization={"stage": 0, "cpu_offload": True}),
     "optimizer type cpu_torch_adam steps on the CPU: it needs ZeRO-Offload"),
    (dict(optimizer={"type": "lion", "params": {}}, zero_optimization={"stage": 1, "cpu_offload": True}),
     "zero_optimization offloads the optimizer to the CPU, where optimizer type lion does not step"),
    (dict(optimizer={"type": "sm3", "params": {}}, zero_optimization={"stage": 1}, load_universal=True),
     "load_universal with optimizer type sm3: DeepSpeed's universal checkpoints carry Adam's exp_avg and "
     "exp_avg_sq only"),
])
def test_what_is_not_built_or_not_the_types_is_one_line(keys, message):
    with pytest.raises(UserError) as err:
        from_dict(tiny_keys(**keys))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind, module, package", [("lion", "lion_pytorch", "lion-pytorch"),
                                                    ("madgrad_wd", "madgrad", "madgrad"),
                                                    ("sm3", "pytorch_optimizer", "pytorch-optimizer")])
def test_a_missing_library_is_one_line(one_process, monkeypatch, kind, module, package):
    config = config_of(kind)
    model = build_model(config)
    monkeypatch.setitem(sys.modules, module, None)  # import -> ImportError
    with pytest.raises(UserError, match=f"optimizer type {kind} needs {package}, which is not installed") as err:
        build_optimizer(config, model)
    assert "\n" not in str(err.value)


def test_a_value_the_library_refuses_is_one_line(one_process):
    config = config_of("sgd", {"lr": 0.1, "momentum": -0.5})
    with pytest.raises(UserError, match="optimizer sgd: Invalid momentum value: -0.5") as err:
        build_optimizer(config, build_model(config))
    assert "\n" not in str(err.value)


def test_offload_configs_reach_deepspeed():
    ds = deepspeed_config(config_of("cpu_torch_adam"), 1)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert ds["zero_force_ds_cpu_optimizer"] is False  # torch's AdamW on the CPU masters
    upstream_spelling = config_of("cpu_adam", zero_optimization={"stage": 2, "cpu_offload": True})
    ds = deepspeed_config(upstream_spelling, 1)
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert "zero_force_ds_cpu_optimizer" not in ds  # DeepSpeedCPUAdam is DeepSpeed's own


# ---------------------------------------------------------------------------------------------- resume at ZeRO-1
STEPS, STOP, SEQ = 4, 2, 32
RESUMED = {"sgd": {"lr": 0.05, "momentum": 0.9}, "lion": {"lr": 1e-3}, "madgrad_wd": {"lr": 1e-2},
           "sm3": {"lr": 0.1, "momentum": 0.5}, "cpu_torch_adam": {"lr": 3e-3}, "cpu_adam": {"lr": 3e-3}}


def _train_stop_resume(rank, kind, folder):
    """Rank `rank` of DP=2 at ZeRO-1: STEPS steps saving at STOP; then fresh engines resumed from that save take
    the steps after it. Returns (uninterrupted losses, resumed losses, lr before each step, whether the final
    weights are equal, adam's losses for the cpu types)."""
    from neox_fork.parallel import groups as parallel
    from neox_fork.training import state as training_state
    from neox_fork.training.optim import build_engine, lr_at, state_keys
    from neox_fork.training.step_logging import _optimizer_state

    keys = dict(optimizer={"type": kind, "params": RESUMED[kind]}, weight_decay=WD, seq_length=SEQ,
                train_iters=STEPS, warmup=0.5, lr_decay_style="cosine", min_lr=1e-5, save=folder,
                hidden_dropout=0.0, attention_dropout=0.0, zero_optimization=OFFLOAD if kind.startswith("cpu_") else
                {"stage": 1})
    parallel.initialize(1, backend="gloo")

    def engine_of(**more):
        c = from_dict(tiny_keys(**{**keys, **more}))
        torch.manual_seed(0)
        model = build_model(c)
        return c, model, build_engine(c, model, 2)

    def step(engine, it):
        g = torch.Generator().manual_seed(100 * it + parallel.dp_rank())
        tokens = torch.randint(0, 1000, (2, SEQ + 1), generator=g)
        loss = engine(tokens[:, :-1], labels=tokens[:, 1:])
        engine.backward(loss)
        engine.step()
        return loss.item()

    c, model, engine = engine_of()
    full, lrs = [], []
    for it in range(STEPS):
        lrs.append((engine.optimizer.param_groups[0]["lr"], lr_at(c, it)))
        full.append(step(engine, it))
        if it + 1 == STOP:
            training_state.save(engine, c, training_state.TrainState(iteration=STOP))
    c2, model2, engine2 = engine_of(load=folder)
    state = training_state.TrainState()
    training_state.resume(engine2, model2, c2, state)
    assert state.iteration == STOP
    resumed = [step(engine2, it) for it in range(STOP, STEPS)]
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    w = model2.layers[0].attention.query_key_value.weight  # log_optimizer_states reads each state tensor whole
    states = {key: tuple(_optimizer_state(engine2, w, key).shape) for key in state_keys(c2)}
    assert states == {key: tuple(w.shape) for key in state_keys(c2)} and (states or kind == "sm3"), states
    adam = None
    if kind.startswith("cpu_"):
        _, _, engine3 = engine_of(optimizer={"type": "adam", "params": RESUMED[kind]}, zero_optimization={"stage": 1})
        adam = [step(engine3, it) for it in range(STEPS)]
    return full, resumed, lrs, same, adam


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("kind", list(RESUMED))
def test_each_type_resumes_exactly_at_zero1_over_two_ranks(tmp_path, kind):
    for rank, (full, resumed, lrs, same, adam) in enumerate(run_distributed(_train_stop_resume, 2, kind,
                                                                             str(tmp_path / "ckpt"))):
        assert resumed == full[STOP:], (rank, full, resumed)
        assert same, rank
        assert len(set(full)) == STEPS  # each rank's batches differ by step
        for got, expected in lrs:
            assert got == pytest.approx(expected, rel=1e-12)
        assert len({lr for lr, _ in lrs}) == 3  # warmup (2 steps), then cosine decay
        if adam is not None:  # the same AdamW in DeepSpeed's C++ op / torch's AdamW on CPU masters
            assert full == pytest.approx(adam, rel=1e-5), (full, adam)
