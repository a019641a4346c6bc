"""Fused kernels for the hot elementwise parts of a block, each with a plain-torch fallback.

What is fused where (docs/performance.md has the measurements):

- rotary: flash-attn's rotary kernel (`flash_attn.layers.rotary.apply_rotary_emb`, non-interleaved,
  rotary_dim < head_dim) applies the 25% partial rotary and copies the other 75% in one pass on CUDA,
  forward and backward, when flash-attn is installed and the positions are shared by the batch (training).
  Otherwise: torch rotate-half, applied to q and k together so every elementwise op runs once, not twice.
- SwiGLU: eager silu(gate) * up; with `torch_compile: true` Inductor fuses it inside each compiled layer
  (one kernel forward, one backward). `swiglu(compiled=True)` compiles it alone (the GPU tests check it).
  liger-kernel's Triton SwiGLU is the same fusion behind an extra dependency that pins torch versions, so
  we do not take it.
- LayerNorm: `torch.nn.LayerNorm` is already one fused kernel each way on CUDA (and CPU); Apex's
  FusedLayerNorm is not needed and Apex is not a dependency.
- the loss: see `NeoXModel.loss` (chunked, never the fp32 logits of the whole batch at once).
- AdamW: torch's `fused=True` kernel on CUDA (neox_fork.training.optim.build_optimizer).

All functions here are differentiable and take what the model holds: q, k, v as [batch, seq, heads, dim].
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from neox_fork.model.attention import on_cuda

log = logging.getLogger(__name__)

try:  # optional GPU extra
    from flash_attn.layers.rotary import apply_rotary_emb as flash_rotary
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_rotary = None


# ---------------------------------------------------------------------- rotary
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate the first `rotary_dim` dims of each head (rotate-half), in fp32; the rest pass through.

    x: [b, s, heads, head_dim]; cos, sin: [b or 1, s, 1, rotary_dim] (frequencies duplicated)."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    rot = (rot.float() * cos + rotate_half(rot.float()) * sin).to(x.dtype)
    return torch.cat((rot, rest), dim=-1)


def flash_rotary_usable(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """flash-attn's kernel takes one [seq, rotary_dim / 2] table for the whole batch, on CUDA."""
    return flash_rotary is not None and on_cuda(x) and cos.shape[0] == 1 and x.shape[-1] <= 256


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v from the fused projection [b, s, heads, 3, head_dim], rotary applied to q and k.

    Equals `rotary_reference` on q and k (tests/test_fused_rotary.py)."""
    if flash_rotary_usable(qkv, cos) and not torch.compiler.is_compiling():  # Inductor fuses the torch path
        q, k, v = qkv.unbind(dim=3)
        half = rotary_dim // 2  # the tables hold each frequency twice; the kernel wants it once
        c = cos[0, :, 0, :half].to(qkv.dtype)
        s = sin[0, :, 0, :half].to(qkv.dtype)
        return flash_rotary(q, c, s, interleaved=False), flash_rotary(k, c, s, interleaved=False), v
    return _rotary_qkv_torch(qkv, cos, sin, rotary_dim)


def _rotary_qkv_torch(qkv, cos, sin, rotary_dim):
    """q and k rotated in one pass (half the elementwise ops of rotating them apart), no copies of v.

    `split` rather than slicing, so the backward concatenates instead of zero-filling full-size grads."""
    qk, v = qkv.split((2, 1), dim=3)
    rot, rest = qk.split((rotary_dim, qk.shape[-1] - rotary_dim), dim=-1)
    cos, sin = cos.unsqueeze(3), sin.unsqueeze(3)  # broadcast over the q/k axis
    if rot.dtype != torch.float32:  # rotate in fp32, as the reference does
        rot = rot.float()
    rot = (rot * cos + rotate_half(rot) * sin).to(qkv.dtype)
    q, k = torch.cat((rot, rest), dim=-1).unbind(dim=3)
    return q, k, v.squeeze(3)


# ---------------------------------------------------------------------- SwiGLU
def swiglu_reference(up: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


_compiled_swiglu = None
_compile_failed = False


def swiglu(up: torch.Tensor, gate: torch.Tensor, *, compiled: bool = False) -> torch.Tensor:
    """silu(gate) * up, eager unless `compiled` (one Inductor kernel each way). The model calls it eager:
    compilation happens only with `torch_compile: true`, where the whole layer is compiled and this
    expression is traced and fused with its neighbours, so "eager" benchmarks are eager throughout."""
    global _compiled_swiglu, _compile_failed
    if not compiled or _compile_failed or torch.compiler.is_compiling():
        return swiglu_reference(up, gate)
    if _compiled_swiglu is None:
        _compiled_swiglu = torch.compile(swiglu_reference, dynamic=None)
    try:
        return _compiled_swiglu(up, gate)
    except Exception as err:  # noqa: BLE001 - no compiler on this node: run eager, say so once
        _compile_failed = True
        log.warning("torch.compile of SwiGLU failed (%s); using eager silu * mul", err)
        return swiglu_reference(up, gate)


# ---------------------------------------------------------------------- head + loss
class _LinearCrossEntropy(torch.autograd.Function):
    """sum(weights * cross_entropy(hidden @ weight.T, labels)) chunk by chunk, with the gradients for hidden
    and weight computed in the same pass over each chunk: the logits of only one chunk exist at a time, and
    the backward needs no second head matmul (the checkpointed chunks recompute it: 4 matmuls become 3)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, mask, chunk):
        # The gradient is formed in megatron's order (softmax, minus one at the target, times mask) so that
        # TP=1 and the vocab-parallel path at TP>1 round alike; Adam amplifies even last-bit differences.
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            h, y, m = hidden[start:end], labels[start:end], mask[start:end]
            logits = (h @ weight.t()).float()
            target = logits.gather(1, y[:, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place: one fp32 buffer per chunk, few passes over it
            sum_exp = probs.sum(dim=-1, keepdim=True)
            total += ((top + sum_exp.log()).squeeze(1) - target).mul_(m).sum()
            # d(sum m * loss) / d logits = m * (softmax - onehot)
            grad = probs.div_(sum_exp)
            grad[torch.arange(end - start, device=grad.device), y] -= 1.0
            grad = grad.mul_(m[:, None]).to(hidden.dtype)
            if grad_hidden is not None:
                torch.matmul(grad, weight, out=grad_hidden[start:end])
            if grad_weight is not None:
                grad_weight.add_(grad.t() @ h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                         chunk: int, denominator=None) -> torch.Tensor:
    """Masked mean of the fp32 cross-entropy of `hidden [n, h] @ weight [vocab, h].T` against `labels [n]`,
    `chunk` tokens at a time (one tensor-parallel rank holding the whole vocabulary): the masked sum over
    `denominator`, by default the mask's count. The 1/denominator factor goes into the per-token weights, as
    autograd applies it on the other path."""
    mask = mask.float()
    weights = mask * (1.0 / (mask.sum().clamp(min=1.0) if denominator is None else denominator))
    return _LinearCrossEntropy.apply(hidden, weight, labels, weights, max(1, chunk))
