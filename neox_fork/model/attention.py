"""Attention backends: FlashAttention-2, torch SDPA, and a plain reference used by tests.

All take q, k, v as [batch, seq, heads, head_dim] (flash-attn's layout) and return the same layout.
`flash` uses flash-attn on CUDA in fp16/bf16 when it is installed and falls back to SDPA otherwise;
`global` is SDPA. A sliding window (`window` W, upstream's `sliding_window_width`) lets each query see
itself and the W keys before it, as upstream's mask `triu(tril(1), -W)` and flash-attn's
`window_size=(W, 0)`: flash-attn takes it natively, the other paths get a banded mask (`band`).
On Hopper and later (compute capability 9.0+) SDPA tries cuDNN's attention first
(its Hopper kernels are FlashAttention-3-style, faster than SDPA's FlashAttention-2 there), then flash,
memory-efficient and math: a backend that cannot take the inputs hands them to the next. Elsewhere SDPA
keeps torch's own order. `pytest -m gpu` checks every backend against `reference`.

Packed documents (`DocumentMask`, from segment ids): flash-attn's varlen kernel where flash runs (the batch
flattened into one sequence cut at `cu_seqlens`), a dense block-diagonal causal mask elsewhere (CPU, SDPA,
reference, a sliding window).

Context parallelism (`ulysses`): each rank of the context-parallel group holds 1/CP of the sequence with all
of its (TP rank's) heads; DeepSpeed-Ulysses' all-to-all trades that for the whole sequence with 1/CP of the
heads, any backend above attends, and a second all-to-all trades back.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # optional GPU extra
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_func = flash_attn_varlen_func = None


def on_cuda(t: torch.Tensor) -> bool:
    """Whether `t` is where the CUDA kernels run: the one device check of the kernel dispatch (here and in
    model/fused.py), a function so that the CPU tests can stand in a GPU and exercise the other conditions."""
    return t.is_cuda


def flash_available(q: torch.Tensor) -> bool:
    return flash_attn_func is not None and on_cuda(q) and q.dtype in (torch.float16, torch.bfloat16)


HOPPER_SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.MATH]


def sdpa_priority(q: torch.Tensor):
    """The SDPA backend order for q's device: cuDNN first on compute capability 9.0+, else torch's default.
    Inside a compiled graph torch's own choice stands (the context manager is not traced)."""
    if q.is_cuda and not torch.compiler.is_compiling() and torch.cuda.get_device_capability(q.device) >= (9, 0):
        return sdpa_kernel(HOPPER_SDPA_ORDER, set_priority=True)
    return contextlib.nullcontext()


@dataclass
class DocumentMask:
    """Packed documents: `segment_ids` [b, s] (int), a position attends to the earlier positions of its own
    segment only. The two forms the kernels take are made on first use and kept for every layer:
    `dense()` [b, 1, s, s] bool (True = attend) and `varlen()` (cu_seqlens, max_seqlen) over the flattened
    batch. Segment ids must be contiguous runs in each row (a document is one run), as packing makes them."""

    segment_ids: torch.Tensor
    _dense: torch.Tensor | None = field(default=None, repr=False)
    _varlen: tuple | None = field(default=None, repr=False)

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            ids, s = self.segment_ids, self.segment_ids.shape[1]
            causal = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()
            self._dense = (ids[:, None, :, None] == ids[:, None, None, :]) & causal
        return self._dense

    def varlen(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens int32 [documents + 1], longest document): a document starts at each row's first
        position and wherever the segment id changes; one host sync for the maximum."""
        if self._varlen is None:
            ids = self.segment_ids
            starts = torch.ones_like(ids, dtype=torch.bool)
            starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
            begin = starts.flatten().nonzero().flatten()
            cu = torch.cat([begin, begin.new_tensor([ids.numel()])]).to(torch.int32)
            self._varlen = (cu, int((cu[1:] - cu[:-1]).max()))
        return self._varlen


def band(sq: int, sk: int, window: int, device, causal: bool = True) -> torch.Tensor:
    """[sq, sk] bool, True = attend: the sq queries are the last sq of the sk positions (bottom-right, as
    after a cached prefix); query i (position p = sk - sq + i) sees keys p - window .. p."""
    pos = torch.arange(sk - sq, sk, device=device)[:, None]
    keys = torch.arange(sk, device=device)[None, :]
    allowed = keys >= pos - window
    return allowed & (keys <= pos) if causal else allowed


def sdpa(q, k, v, *, causal: bool, dropout_p: float = 0.0, mask: torch.Tensor | None = None):
    if mask is not None and mask.dtype == torch.bool:  # SDPA on CPU is several times slower with bool masks
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_priority(q):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                             is_causal=causal and mask is None)
    return out.transpose(1, 2)


def reference(q, k, v, *, causal: bool, dropout_p: float = 0.0, mask: torch.Tensor | None = None):
    """softmax(q k^T / sqrt(d)) v in fp32, written out; the yardstick for the fast paths."""
    dtype = q.dtype
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is None and causal:
        sq, sk = scores.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return (probs @ v).transpose(1, 2).to(dtype)


def varlen(q, k, v, documents: DocumentMask, dropout_p: float = 0.0, window: int | None = None):
    """flash-attn's varlen kernel over packed documents: [b, s, heads, d] flattened to [b*s, heads, d] and
    cut at `cu_seqlens`, causal inside each document (and within `window` when given); no position attends
    across a cut."""
    b, s = q.shape[:2]
    cu, longest = documents.varlen()
    out = flash_attn_varlen_func(*(t.reshape(b * s, *t.shape[2:]) for t in (q, k, v)), cu, cu, longest, longest,
                                 dropout_p=dropout_p, causal=True,
                                 window_size=(-1, -1) if window is None else (window, 0))
    return out.view(b, s, *out.shape[1:])


def ulysses(attend, q, k, v, group):
    """`attend(q, k, v)` over the whole sequence when this rank holds a slice of it: q, k, v are [b, s/CP,
    heads, d] (k and v may have fewer heads, GQA: each must be divisible by CP; config/rules.py checks). The
    all-to-all (deepspeed.sequence.layer.DistributedAttention, scatter heads / gather sequence) gives
    [b, s, heads/CP, d]: query head i serves key/value head i // group on either side, since both are cut in
    CP equal runs. Returns [b, s/CP, heads, d], this rank's positions again."""
    from deepspeed.sequence.layer import DistributedAttention

    return DistributedAttention(attend, group, scatter_idx=2, gather_idx=1)(q, k, v, 0)


def attention(q, k, v, *, backend: str = "flash", causal: bool = True, dropout_p: float = 0.0,
              mask: torch.Tensor | DocumentMask | None = None, window: int | None = None):
    """Dispatch to a backend. `mask` (bool, True = attend, broadcastable to [b, heads, q, k]) replaces the
    causal mask: cached decoding with several queries, left-padded batches. A `DocumentMask` (packed
    documents, a full sequence) goes to flash-attn's varlen kernel where flash runs, else to its dense mask.
    `window` (sliding window) is applied on top of either, aligned bottom-right as the causal mask."""
    sq, sk = q.shape[1], k.shape[1]
    if isinstance(mask, DocumentMask):
        if backend == "flash" and flash_attn_varlen_func is not None and flash_available(q):
            return varlen(q, k, v, mask, dropout_p, window)
        mask = mask.dense()
    if window is not None and sk > window + 1:  # shorter: the band hides nothing the causal mask does not
        if backend == "flash" and mask is None and flash_available(q):
            return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=causal,
                                   window_size=(window, 0 if causal else -1))
        banded = band(sq, sk, window, q.device, causal=causal)
        mask = banded if mask is None else mask & banded
    if backend == "reference":
        return reference(q, k, v, causal=causal, dropout_p=dropout_p, mask=mask)
    if backend == "flash" and mask is None and flash_available(q):
        # flash-attn aligns the causal mask to the bottom-right, as cached decoding needs.
        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=causal)
    return sdpa(q, k, v, causal=causal, dropout_p=dropout_p, mask=mask)
