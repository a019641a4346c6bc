"""The CPU attention path (SDPA; also what `flash` falls back to without flash-attn on CUDA) equals the
written-out fp32 softmax reference, forward and backward: causal, and after a cached prefix with a mask."""

import pytest
import torch

from conftest import tiny_keys
from neox_fork.model import attention as attention_module
from neox_fork.model.attention import attention, flash_available
from neox_fork.config.loading import from_dict
from neox_fork.model.transformer import build_model

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _inputs(dtype, sq, sk, b=2, heads=4, head_dim=80, seed=0):  # head_dim 80 as in StableLM
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, heads, head_dim, generator=g)
    k, v = (torch.randn(b, sk, heads, head_dim, generator=g) for _ in range(2))
    return [t.to(dtype) for t in (q, k, v)]


def _prefix_mask(sq, sk):
    """What Attention builds for sq new tokens after sk - sq cached ones: bottom-right causal."""
    return torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)


def _fwd_bwd(backend, inputs, **kwargs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = attention(*leaves, backend=backend, **kwargs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(upstream)
    return out, [x.grad for x in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["causal", "cached_prefix_mask", "one_query_no_mask"])
def test_sdpa_matches_reference(dtype, case):
    """SDPA (`global`, and `flash` here: test_flash_kernel_only_for_cuda_half_precision_without_a_mask shows
    it falls back to this very path) against the written-out fp32 softmax."""
    backend = "global"
    sq, sk = {"causal": (33, 33), "cached_prefix_mask": (7, 40), "one_query_no_mask": (1, 40)}[case]
    kwargs = {"causal": case == "causal"}
    if case == "cached_prefix_mask":
        kwargs = {"causal": True, "mask": _prefix_mask(sq, sk)}
    inputs = _inputs(dtype, sq, sk)
    out, grads = _fwd_bwd(backend, inputs, **kwargs)
    ref_out, ref_grads = _fwd_bwd("reference", inputs, **kwargs)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL[dtype])


def test_flash_kernel_only_for_cuda_half_precision_without_a_mask(monkeypatch):
    """The dispatch itself: flash-attn's kernel (a recording stand-in) is taken for `flash` in fp16/bf16 on
    CUDA (attention.on_cuda, stood in for) with no mask; otherwise SDPA, bit for bit what `global` gives."""
    inputs = _inputs(torch.bfloat16, 9, 9)
    assert not flash_available(inputs[0])  # this machine, as it is
    calls = []

    def kernel(q, k, v, dropout_p, causal):
        calls.append((q.dtype, dropout_p, causal))
        return attention_module.reference(q, k, v, causal=causal)

    monkeypatch.setattr(attention_module, "flash_attn_func", kernel)
    assert not flash_available(inputs[0])  # installed, but the tensors are not on CUDA
    assert torch.equal(attention(*inputs, backend="flash"), attention(*inputs, backend="global")) and calls == []
    monkeypatch.setattr(attention_module, "on_cuda", lambda t: True)
    assert flash_available(inputs[0])
    attention(*inputs, backend="flash", causal=False)
    assert calls == [(torch.bfloat16, 0.0, False)]
    attention(*inputs, backend="global")  # SDPA by name
    attention(*(t.float() for t in inputs), backend="flash")  # flash-attn has no fp32 kernel
    attention(*inputs, backend="flash", mask=_prefix_mask(9, 9))  # nor a mask argument
    assert len(calls) == 1


def test_attention_config_selects_backend_and_model_matches_reference(one_process):
    """attention-config [[["flash"], N]] as in the StableLM YAML; the same weights on the reference agree."""
    config = from_dict(tiny_keys(num_layers=2, seq_length=64, attention_config=[[["flash"], 1], [["global"], 1]]))
    torch.manual_seed(0)
    model = build_model(config).eval()
    assert [layer.attention.backend for layer in model.layers] == ["flash", "global"]
    tokens = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model(tokens)
        for layer in model.layers:
            layer.attention.backend = "reference"
        torch.testing.assert_close(fast, model(tokens), atol=1e-5, rtol=1e-5)
