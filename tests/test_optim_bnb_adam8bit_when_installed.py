"""use_bnb_optimizer: bitsandbytes' Adam8bit (upstream's choice) steps the model, with our parameter groups and
decoupled decay; without bitsandbytes it is one line naming the key. bitsandbytes runs its optimizer on the CPU
(its torch backend), so the real optimizer is tested here.

Against AdamW written out (as tests/test_fused_checkpointing_compile_and_adamw_match_eager.py): tensors under
4096 elements keep 32-bit moments in bitsandbytes, so they agree to fp32 rounding; larger ones keep 8-bit
blockwise-quantised moments (the point of the optimizer): the 8-bit dynamic map is within ~1% of each block's
scale, so over 3 steps the mean weight difference stays under 3% of one step's size (lr), while not exact."""

import sys

import pytest
import torch

from conftest import tiny_keys
from distributed import run_distributed
from reference_adamw import adamw_float64, three_random_steps
from neox_fork.config.loading import from_dict
from neox_fork.errors import UserError
from neox_fork.model.transformer import build_model
from neox_fork.training.optim import build_optimizer

bitsandbytes = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in requirements.txt")

LR, BETAS, EPS, WD = 1e-2, (0.8, 0.9), 1e-3, 0.3


def bnb_config(**extra):
    keys = dict(optimizer={"type": "Adam", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS}}, weight_decay=WD,
                use_bnb_optimizer=True)
    return from_dict(tiny_keys(**{**keys, **extra}))


def test_adam8bit_steps_as_adamw_within_its_quantisation(one_process):
    config = bnb_config()
    torch.manual_seed(0)
    model = build_model(config)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(config, model)
    assert type(opt) is bitsandbytes.optim.Adam8bit
    g = torch.Generator().manual_seed(1)
    grads = [{n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()} for _ in range(3)]
    for step in grads:
        for n, p in model.named_parameters():
            p.grad = step[n].clone()
        opt.step()
    for n, p in model.named_parameters():
        w = adamw_float64(start, grads, n, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD if p.dim() >= 2 else 0.0)
        diff = (p.detach().double() - w).abs()
        if p.numel() < 4096:
            assert opt.state[p]["state1"].dtype == torch.float32
            torch.testing.assert_close(p.detach().double(), w, atol=1e-6, rtol=1e-6, msg=n)
        else:
            assert opt.state[p]["state1"].dtype == torch.uint8, n
            assert 0 < diff.mean().item() < 0.03 * LR, n


def test_without_bitsandbytes_it_is_one_line_naming_the_key(one_process, monkeypatch):
    config = bnb_config()
    model = build_model(config)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(UserError, match="use_bnb_optimizer needs bitsandbytes, which is not installed") as err:
        build_optimizer(config, model)
    assert "\n" not in str(err.value)
    assert type(build_optimizer(from_dict(tiny_keys()), model)) is torch.optim.AdamW  # the default


def _train_steps_with_deepspeed(rank):
    from neox_fork.parallel import groups as parallel
    from neox_fork.training.optim import build_engine

    config = bnb_config(warmup=0.0, optimizer={"type": "Adam", "params": {"lr": 3e-3}})  # ZeRO stage 1
    parallel.initialize(1, backend="gloo")
    torch.manual_seed(0)
    engine = build_engine(config, build_model(config), 1)
    tokens = torch.randint(0, 1000, (2, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        loss = engine(tokens[:, :-1], labels=tokens[:, 1:])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    inner = engine.optimizer.optimizer  # DeepSpeed's ZeRO wrapper around the optimizer we built
    return type(inner).__name__, sorted({str(s["state1"].dtype) for s in inner.state.values()}), losses


@pytest.mark.slow
@pytest.mark.multiproc
def test_deepspeed_zero_trains_with_adam8bit():
    name, dtypes, losses = run_distributed(_train_steps_with_deepspeed, 1)[0]
    assert name == "Adam8bit" and "torch.uint8" in dtypes
    assert losses[-1] < losses[0] - 0.5  # the same batch four times at lr 3e-3: the loss falls
