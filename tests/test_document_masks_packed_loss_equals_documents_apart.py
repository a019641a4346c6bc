"""Document masks for pretraining (Megatron-LM's reset_attention_mask + reset_position_ids), at TP=1 on the CPU.

A packed sample is cut after each end-of-document token (EOD) exactly as Megatron-LM's
get_ltor_masks_and_position_ids cuts it (megatron-core's copy is the independent reference). With both keys on,
the loss of a packed batch equals what its documents give when each is run through the model alone:

    packed loss = (sum over documents d of sum over d's trained positions of -log p(label)) / (trained positions)

i.e. the mean over all trained tokens is the sum of the per-document token losses over the total token count.
Each document's losses come from a separate forward of that document only (no segments, positions 0..n-1,
plain causal attention), in float64 from the model's fp32 logits. Tolerance: the packed forward and the lone
forwards go through the same fp32 ops on a different mask, and the loss sums at most 2 x 96 terms: rtol 1e-5
(about 80 fp32 unit roundoffs). With the keys off the packed loss differs by far more (cross-document attention
and positions that run on across documents), so the comparison can fail.

The GPU path (flash-attn's varlen kernel, cu_seqlens) is checked on the CPU against the kernel's contract written
out, and on a GPU (marked gpu) against the dense mask.
"""

import pytest
import torch

from conftest import tiny_keys
from neox_fork.config.loading import from_dict
from neox_fork.data.datasets import documents_of
from neox_fork.errors import UserError
from neox_fork.model.attention import DocumentMask, attention, flash_attn_varlen_func, reference
from neox_fork.model.transformer import build_model

S, VOCAB, EOD = 96, 1000, 0
RTOL = 1e-5
# documents per row, as lengths including their closing EOD; the last of each row is cut by the window (no EOD)
ROWS = [[30, 41, 26], [60, 37]]


def _packed(eod_mask_loss: bool):
    """tokens/labels [2, S] of one window of S + 1 tokens per row, and megatron-core's loss mask."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    g = torch.Generator().manual_seed(3)
    windows = []
    for lengths in ROWS:
        row = torch.randint(1, VOCAB, (S + 1,), generator=g)
        row[torch.tensor(lengths[:-1]).cumsum(0) - 1] = EOD
        windows.append(row)
    windows = torch.stack(windows)
    tokens, labels = windows[:, :-1], windows[:, 1:]
    mask = torch.stack([_get_ltor_masks_and_position_ids(t, EOD, False, False, eod_mask_loss, False)[1]
                        for t in tokens])
    return tokens, labels, mask


def _model(**keys):
    torch.manual_seed(0)
    # weights of std 0.1 (not 0.02): logits that depend on the context well beyond rounding
    keys = dict(seq_length=S, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.1, **keys)
    return build_model(from_dict(tiny_keys(**keys))).train()


def test_documents_are_cut_as_megatron_cuts_them():
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    tokens, _, _ = _packed(False)
    segments, positions = documents_of(tokens, EOD)
    for row in range(len(ROWS)):
        blocked, _, want_positions = _get_ltor_masks_and_position_ids(tokens[row], EOD, True, True, False, True)
        assert torch.equal(positions[row], want_positions)
        dense = DocumentMask(segments[row:row + 1]).dense()[0, 0]
        assert torch.equal(dense, ~blocked[0])  # megatron-core: True = masked out
    # the varlen kernel's cuts: each document's start over the flattened batch, then the end
    cu, longest = DocumentMask(segments).varlen()
    assert cu.tolist() == [0, 30, 71, 96, 156, 192] and longest == 60


def _documents_apart(model, tokens, labels, mask):
    """(sum over trained positions of each document's token losses, each document run alone, trained count)."""
    total = torch.zeros((), dtype=torch.float64)
    for row, lengths in enumerate(ROWS):  # the documents as _packed wrote them, not as the code under test cuts
        ends = torch.tensor(lengths).cumsum(0).clamp(max=S).tolist()
        for a, b in zip([0] + ends[:-1], ends):
            with torch.no_grad():
                logits = model(tokens[row:row + 1, a:b]).double()[0]
            nll = -torch.log_softmax(logits, -1).gather(-1, labels[row, a:b, None]).squeeze(-1)
            total += (nll * mask[row, a:b].double()).sum()
    return total, mask.double().sum()


@pytest.mark.parametrize("pos_emb", ["rotary", "learned"])
@pytest.mark.parametrize("eod_mask_loss", [True, False], ids=["eod_mask_loss", "eod_trained"])
def test_packed_loss_is_the_token_weighted_sum_of_the_documents_alone(one_process, pos_emb, eod_mask_loss):
    model = _model(pos_emb=pos_emb)
    tokens, labels, mask = _packed(eod_mask_loss)
    segments, positions = documents_of(tokens, EOD)
    total, count = _documents_apart(model, tokens, labels, mask)
    assert count == 2 * S - (3 if eod_mask_loss else 0)
    want = total / count
    with torch.enable_grad():  # the training path: the fused head + loss at TP=1
        packed = model(tokens, labels=labels, loss_mask=mask, position_ids=positions, segment_ids=segments)
    torch.testing.assert_close(packed.double(), want, rtol=RTOL, atol=0)
    with torch.no_grad():  # and the chunked head + loss (TP > 1's and evaluation's)
        chunked = model.chunked_loss(tokens, labels, mask, positions, segments)
    torch.testing.assert_close(chunked.double(), want, rtol=RTOL, atol=0)

    # keys off: the same window attends across documents and its positions run on; the loss moves more than a
    # hundred times the tolerance (the checks above can fail)
    with torch.no_grad():
        unmasked = model(tokens, labels=labels, loss_mask=mask)
        positions_only = model(tokens, labels=labels, loss_mask=mask, position_ids=positions)
    assert abs(unmasked.double() - want) > 100 * RTOL * want
    assert abs(positions_only.double() - want) > 100 * RTOL * want


def test_a_pipeline_refuses_document_masks_in_one_line():
    for key in ("reset_attention_mask", "reset_position_ids"):
        with pytest.raises(UserError, match=f"{key} with pipe_parallel_size 2 is not built"):
            from_dict(tiny_keys(pipe_parallel_size=2, **{key: True}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or flash_attn_varlen_func is None,
                    reason="needs CUDA and flash-attn")
@pytest.mark.parametrize("window", [None, 16])
def test_flash_varlen_equals_the_dense_document_mask(window):
    """flash-attn's varlen kernel (cu_seqlens) against the fp32 reference on the dense block-diagonal mask.
    bf16 inputs, fp32 softmax in both: atol 2e-2 is a few bf16 ulps of outputs of magnitude <= 1."""
    torch.manual_seed(0)
    tokens, _, _ = _packed(False)
    segments = documents_of(tokens, EOD)[0].cuda()
    q, k, v = (torch.randn(2, S, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    documents = DocumentMask(segments)
    fast = attention(q, k, v, backend="flash", mask=documents, window=window)
    assert documents._dense is None  # the varlen kernel ran, not the dense fallback
    slow = attention(q, k, v, backend="reference", mask=DocumentMask(segments), window=window)
    torch.testing.assert_close(fast.float(), slow.float(), rtol=0, atol=2e-2)
    sdpa = attention(q, k, v, backend="global", mask=DocumentMask(segments), window=window)
    torch.testing.assert_close(sdpa.float(), slow.float(), rtol=0, atol=2e-2)


def _varlen_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, causal=False, window_size=(-1, -1)):
    """flash_attn_varlen_func's contract written out: [total, heads, d] inputs, each document cut at cu_seqlens
    attends causally (within window_size[0] keys back) to itself only; fp32 softmax."""
    assert causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and dropout_p == 0.0
    assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qa, ka, va = (t[a:b].transpose(0, 1).float() for t in (q, k, v))
        scores = qa @ ka.transpose(-1, -2) / qa.shape[-1] ** 0.5
        i, j = torch.arange(b - a)[:, None], torch.arange(b - a)[None, :]
        allowed = (j <= i) & ((j >= i - window_size[0]) if window_size[0] >= 0 else True)
        out[a:b] = (torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ va).transpose(0, 1).to(q.dtype)
    return out


def _never(*args, **kwargs):
    raise AssertionError("packed documents must not reach flash_attn_func")


@pytest.mark.parametrize("window", [None, 16])
def test_the_varlen_path_hands_the_kernel_each_document(monkeypatch, window):
    """The GPU dispatch on the CPU: the device check stood in for and flash-attn's varlen kernel replaced by its
    contract written out (_varlen_stand_in), so the batch's flattening, cu_seqlens and the window reach it as the
    kernel expects; its output equals the reference on the dense mask. bf16 inputs, both fp32 inside: atol 1e-2
    is about a bf16 ulp of outputs of magnitude < 2 (the two sum in another order)."""
    from neox_fork.model import attention as attention_module

    monkeypatch.setattr(attention_module, "on_cuda", lambda t: True)
    monkeypatch.setattr(attention_module, "flash_attn_varlen_func", _varlen_stand_in)
    monkeypatch.setattr(attention_module, "flash_attn_func", _never)  # flash-attn "installed"; never called
    torch.manual_seed(0)
    tokens, _, _ = _packed(False)
    segments = documents_of(tokens, EOD)[0]
    q, k, v = (torch.randn(2, S, 4, 16, dtype=torch.bfloat16) for _ in range(3))
    documents = DocumentMask(segments)
    fast = attention(q, k, v, backend="flash", mask=documents, window=window)
    assert documents._dense is None  # the varlen path ran, not the dense fallback
    slow = attention(q, k, v, backend="reference", mask=DocumentMask(segments), window=window)
    torch.testing.assert_close(fast.float(), slow.float(), rtol=0, atol=1e-2)
    # the stand-in can tell a wrong cut: documents one position off differ
    shifted = DocumentMask(torch.cat([segments[:, :1], segments[:, :-1]], 1))
    assert (attention(q, k, v, backend="flash", mask=shifted, window=window).float() - slow.float()).abs().max() > 0.1
