"""The chunked loss equals the loss computed from the full logits of the batch, forward and backward, at
TP=1, on both of its paths: the fused head + cross-entropy with gradients in the same pass (TP=1 training)
and the checkpointed chunks (what TP>1 runs); the fused one equals megatron's head + vocab-parallel loss."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel as tp

from conftest import tiny_keys
from neox_fork.model import fused
from neox_fork.config.loading import from_dict
from neox_fork.model.transformer import build_model

B, S, VOCAB = 2, 64, 1000


def _model(dtype=torch.float32, **keys):
    torch.manual_seed(0)
    return build_model(from_dict(tiny_keys(seq_length=S, **keys))).to(dtype).train()


def _batch(with_mask):
    g = torch.Generator().manual_seed(0)
    tokens, labels = (torch.randint(0, VOCAB, (B, S), generator=g) for _ in range(2))
    mask = (torch.rand(B, S, generator=g) > 0.3).float() if with_mask else None
    return tokens, labels, mask


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def _full_logits_loss(tokens, labels, mask):
    """The yardstick: the whole batch's logits in fp32, one cross-entropy."""
    def fn(model):
        logits = model(tokens).float()
        losses = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), reduction="none")
        m = torch.ones_like(losses) if mask is None else mask.view(-1)
        return (losses * m).sum() / m.sum()
    return fn


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [0, 48, 4096])  # unchunked, 3 uneven chunks (checkpointed), one chunk
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("fused_linear_loss", [True, False])
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_full_logits_loss(one_process, dtype, tol, chunk, with_mask, fused_linear_loss, tied):
    tokens, labels, mask = _batch(with_mask)
    model = _model(dtype, full_precision_lm_cross_entropy=True, no_weight_tying=not tied)
    model.shape.loss_chunk_tokens = chunk
    loss, grads = _loss_and_grads(model, (lambda m: m(tokens, labels=labels, loss_mask=mask)) if fused_linear_loss
                                  else (lambda m: m.chunked_loss(tokens, labels, mask)))
    ref_loss, ref_grads = _loss_and_grads(model, _full_logits_loss(tokens, labels, mask))
    torch.testing.assert_close(loss, ref_loss, atol=tol, rtol=tol)
    for name, g in grads.items():
        scale = max(1.0, ref_grads[name].abs().max().item())
        torch.testing.assert_close(g, ref_grads[name], atol=tol * scale, rtol=tol, msg=name)


def test_default_config_chunks_at_4096_tokens(one_process):
    assert _model().shape.loss_chunk_tokens == 4096
    assert _model(fused_cross_entropy=False).shape.loss_chunk_tokens == 0


def test_fused_head_and_loss_equals_megatron_head_and_vocab_parallel_cross_entropy(one_process):
    """The TP=1 training path against the pieces TP>1 runs, to the last bits (Adam amplifies differences)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(96, 32, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(256, 32, generator=g)).requires_grad_()
    labels = torch.randint(0, 256, (96,), generator=g)
    mask = (torch.rand(96, generator=g) > 0.2).float()
    ours = fused.linear_cross_entropy(hidden, weight, labels, mask, chunk=40)
    losses = tp.vocab_parallel_cross_entropy((hidden @ weight.t())[None].contiguous(), labels[None])[0]
    theirs = (losses * mask).sum() / mask.sum()
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    grads_ours = torch.autograd.grad(ours, (hidden, weight))
    grads_theirs = torch.autograd.grad(theirs, (hidden, weight))
    for a, b in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
