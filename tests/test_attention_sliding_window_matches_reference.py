"""sliding_window_width W (Mistral's banded attention) in every attention path: a query sees itself and the W
keys before it, as upstream gpt-neox's mask `triu(tril(ones), diagonal=-W)` and flash-attn's
`window_size=(W, 0)` define it (transformers' Mistral counts the query in its `sliding_window`, so HF's
window is W + 1; checked here against transformers' own mask function). Each path is compared with an
attention written out per query over only the keys of its window (no mask at all)."""

import math

import pytest
import torch
from transformers.masking_utils import sliding_window_causal_mask_function

from conftest import tiny_keys
from neox_fork.model.attention import attention, band
from neox_fork.config.loading import from_dict
from neox_fork.errors import UserError
from neox_fork.model.transformer import build_model

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
W = 5


def upstream_mask(s, window):
    """upstream gpt-neox's get_attn_mask, as a bool 'attend' mask: tril, then drop diagonals below -window."""
    return torch.triu(torch.tril(torch.ones(s, s)), diagonal=-window).bool()


def test_band_is_upstreams_mask_and_transformers_window_plus_one():
    s = 12
    assert torch.equal(band(s, s, W, "cpu"), upstream_mask(s, W))
    hf = sliding_window_causal_mask_function(W + 1)
    idx = torch.arange(s)
    expected = hf(torch.tensor(0), torch.tensor(0), idx[:, None], idx[None, :])
    assert torch.equal(band(s, s, W, "cpu"), expected)
    assert band(s, s, W, "cpu")[-1].sum() == W + 1  # itself and W before it
    # after a cached prefix the queries are the last rows of the full band
    assert torch.equal(band(3, s, W, "cpu"), upstream_mask(s, W)[-3:])


def windowed_by_hand(q, k, v, window):
    """Each query i (position p = sk - sq + i) attends exactly keys max(0, p - window) .. p, in fp32."""
    q, k, v = (t.float() for t in (q, k, v))
    sq, sk = q.shape[1], k.shape[1]
    out = torch.empty_like(q)
    for i in range(sq):
        p = sk - sq + i
        lo = max(0, p - window)
        scores = torch.einsum("bhd,bkhd->bhk", q[:, i], k[:, lo : p + 1]) / math.sqrt(q.shape[-1])
        out[:, i] = torch.einsum("bhk,bkhd->bhd", scores.softmax(-1), v[:, lo : p + 1])
    return out


def _inputs(dtype, sq, sk, b=2, heads=4, head_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, heads, head_dim, generator=g)
    k, v = (torch.randn(b, sk, heads, head_dim, generator=g) for _ in range(2))
    return [t.to(dtype) for t in (q, k, v)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["flash", "global", "reference"])
@pytest.mark.parametrize("case", ["full", "cached_prefix_mask", "one_query_long_cache"])
def test_every_backend_attends_only_within_the_window(dtype, backend, case):
    sq, sk = {"full": (20, 20), "cached_prefix_mask": (7, 30), "one_query_long_cache": (1, 30)}[case]
    kwargs = {"causal": case == "full"}  # what Attention passes: the decode step has no mask and no causal
    if case == "cached_prefix_mask":
        kwargs = {"causal": False, "mask": torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)}
    q, k, v = _inputs(dtype, sq, sk)
    out = attention(q, k, v, backend=backend, window=W, **kwargs)
    torch.testing.assert_close(out.float(), windowed_by_hand(q, k, v, W), **TOL[dtype])
    unwindowed = attention(q, k, v, backend=backend, **kwargs)
    assert (unwindowed.float() - out.float()).abs().max() > 0.05  # the window matters in each case


def test_window_wider_than_the_sequence_changes_nothing():
    q, k, v = _inputs(torch.float32, 10, 10)
    torch.testing.assert_close(attention(q, k, v, backend="global", window=9),
                               attention(q, k, v, backend="global"), atol=0, rtol=0)


def test_model_reads_the_key_and_refuses_a_negative_width(one_process):
    model = build_model(from_dict(tiny_keys(sliding_window_width=W)))
    assert all(layer.attention.window == W for layer in model.layers)
    with pytest.raises(UserError, match="sliding_window_width must be 0 or more"):
        from_dict(tiny_keys(sliding_window_width=-1))
