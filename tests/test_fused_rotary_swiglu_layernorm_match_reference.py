"""The fused paths of a block and the model's norms equal written-out references, forward and backward,
fp32 and bf16."""

import pytest
import torch

from conftest import tiny_keys
from neox_fork.model import fused
from neox_fork.config.loading import from_dict
from neox_fork.model.transformer import Rotary, build_model

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _qkv(dtype, b=2, s=24, heads=3, head_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, heads, 3, head_dim, generator=g).to(dtype).requires_grad_()


def _tables(rotary_dim, s, batch_rows=1, offset=0):
    positions = torch.arange(offset, offset + s).unsqueeze(0).expand(batch_rows, -1)
    return Rotary(rotary_dim, 10000.0)(positions)


def _reference_qkv(qkv, cos, sin, rotary_dim):
    q, k, v = qkv.unbind(dim=3)
    return fused.rotary_reference(q, cos, sin, rotary_dim), fused.rotary_reference(k, cos, sin, rotary_dim), v


def _assert_same_fwd_bwd(fast_fn, ref_fn, inputs, tol):
    fast_in = [x.detach().clone().requires_grad_() for x in inputs]
    ref_in = [x.detach().clone().requires_grad_() for x in inputs]
    fast, ref = fast_fn(*fast_in), ref_fn(*ref_in)
    fast, ref = (fast,) if torch.is_tensor(fast) else fast, (ref,) if torch.is_tensor(ref) else ref
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(r.shape, generator=g).to(r.dtype) for r in ref]
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, **tol)
    torch.autograd.backward(fast, upstream)
    torch.autograd.backward(ref, upstream)
    for f, r in zip(fast_in, ref_in):  # grads summed over many rows: tolerance scales with their size
        scale = max(1.0, r.grad.float().abs().max().item())
        torch.testing.assert_close(f.grad, r.grad, atol=tol["atol"] * scale, rtol=tol["rtol"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [8, 32])  # 25% of the head (StableLM) and the whole head
@pytest.mark.parametrize("batch_rows", [1, 2])  # shared positions (training) and per-row (left padding)
def test_rotary_qkv_matches_rotate_half_reference(dtype, rotary_dim, batch_rows):
    qkv = _qkv(dtype)
    cos, sin = _tables(rotary_dim, qkv.shape[1], batch_rows, offset=5)
    _assert_same_fwd_bwd(lambda x: fused.rotary_qkv(x, cos, sin, rotary_dim),
                         lambda x: _reference_qkv(x, cos, sin, rotary_dim), [qkv], TOL[dtype])


def _flash_stand_in(x, cos, sin, interleaved=False):
    """flash-attn's apply_rotary_emb contract: x [b, s, h, d], cos/sin [s, rotary_dim / 2], non-interleaved
    rotate-half on the first rotary_dim dims in fp32, the rest copied; dtypes of x and tables equal."""
    assert not interleaved and cos.dim() == 2 and cos.dtype == x.dtype and cos.shape[0] >= x.shape[1]
    rd = 2 * cos.shape[1]
    c = torch.cat((cos, cos), -1)[: x.shape[1], None, :].float()
    s = torch.cat((sin, sin), -1)[: x.shape[1], None, :].float()
    rot = x[..., :rd].float()
    return torch.cat(((rot * c + fused.rotate_half(rot) * s).to(x.dtype), x[..., rd:]), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_rotary_dispatch_passes_half_tables(monkeypatch, dtype):
    """The CUDA kernel cannot run here: a stand-in with its contract checks what we hand it."""
    monkeypatch.setattr(fused, "flash_rotary", _flash_stand_in)
    monkeypatch.setattr(fused, "on_cuda", lambda t: True)  # the device check stood in; the rest is fused's own
    qkv = _qkv(dtype)
    cos, sin = _tables(8, qkv.shape[1])
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)  # bf16 tables in the kernel
    _assert_same_fwd_bwd(lambda x: fused.rotary_qkv(x, cos, sin, 8),
                         lambda x: _reference_qkv(x, cos, sin, 8), [qkv], tol)


def test_flash_rotary_not_used_on_cpu_or_per_row_positions(monkeypatch):
    """The kernel takes one table for the whole batch: with positions per row (left-padded generation) the
    dispatch keeps the torch path even on CUDA with flash-attn installed (both stood in here)."""
    calls = []

    def recording(x, cos, sin, interleaved=False):
        calls.append(x.shape)
        return _flash_stand_in(x, cos, sin, interleaved)

    qkv = _qkv(torch.float32)
    s = qkv.shape[1]
    shared = _tables(8, s)
    per_row = Rotary(8, 10000.0)(torch.stack([torch.arange(3, 3 + s), torch.arange(7, 7 + s)]))  # rows differ
    monkeypatch.setattr(fused, "flash_rotary", recording)
    assert not fused.flash_rotary_usable(qkv, shared[0])  # not on CUDA
    monkeypatch.setattr(fused, "on_cuda", lambda t: True)
    assert fused.flash_rotary_usable(qkv, shared[0]) and not fused.flash_rotary_usable(qkv, per_row[0])
    _assert_same_fwd_bwd(lambda x: fused.rotary_qkv(x, *per_row, 8),
                         lambda x: _reference_qkv(x, *per_row, 8), [qkv], TOL[torch.float32])
    assert calls == []
    fused.rotary_qkv(qkv, *shared, 8)
    assert len(calls) == 2  # q and k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_eager_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    up, gate = (torch.randn(4, 16, 40, generator=g).to(dtype) for _ in range(2))
    _assert_same_fwd_bwd(lambda u, x: fused.swiglu(u, x, compiled=False),
                         lambda u, x: u * x * torch.sigmoid(x), [up, gate], TOL[dtype])


def test_swiglu_compiled_matches_reference():
    """The CUDA default (torch.compile, one fused kernel each way) run through Inductor's CPU backend."""
    g = torch.Generator().manual_seed(0)
    up, gate = (torch.randn(4, 16, 40, generator=g) for _ in range(2))
    _assert_same_fwd_bwd(lambda u, x: fused.swiglu(u, x, compiled=True),
                         lambda u, x: u * x * torch.sigmoid(x), [up, gate], TOL[torch.float32])
    assert not fused._compile_failed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_layernorms_match_written_out_formula_with_the_configs_eps(one_process, dtype):
    """Every norm the model builds (no Apex: torch's fused kernel) is (x - mean) / sqrt(var + eps) * w + b with
    the config's layernorm_epsilon; a large eps makes a dropped or default eps show."""
    eps = 0.5
    model = build_model(from_dict(tiny_keys(layernorm_epsilon=eps, use_bias_in_norms=True)))
    norms = {n: m for n, m in model.named_modules() if n.endswith(("layernorm", "final_norm"))}
    assert len(norms) == 2 * 2 + 1  # two per layer and the final one
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 64, generator=g).to(dtype)

    def written_out(x, w, b):
        x32 = x.float()
        mean = x32.mean(-1, keepdim=True)
        var = ((x32 - mean) ** 2).mean(-1, keepdim=True)
        return ((x32 - mean) / torch.sqrt(var + eps) * w.float() + b.float()).to(x.dtype)

    for name, norm in norms.items():
        w, b = (1 + 0.1 * torch.randn(64, generator=g)).to(dtype), (0.1 * torch.randn(64, generator=g)).to(dtype)

        def ours(x, w, b, norm=norm):
            return torch.func.functional_call(norm, {"weight": w, "bias": b}, (x,))

        _assert_same_fwd_bwd(ours, written_out, [x, w, b], TOL[dtype])
