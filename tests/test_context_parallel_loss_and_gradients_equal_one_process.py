"""One forward and backward at context_parallel_size 2 (two gloo ranks, DeepSpeed-Ulysses) against one process:
the loss summed over the two ranks and their gradients summed (what DeepSpeed's reduction over the sequence x data
group does: it sums over sequence ranks and divides by DP alone, docs/parallelism.md) equal the one-process loss
and gradients, with document masks (segment ids gathered over the group, positions restarting per document) and
without (global positions from each rank's offset). With masks, the loss is also the documents' losses computed
apart (tests/test_document_masks_packed_loss_equals_documents_apart.py's reference, run in this process).

Tolerances: the same fp32 operations on the same numbers, cut over heads and positions, so sums change order:
loss rtol 1e-5 (as the parallel tests); each gradient tensor within 1e-5 of its largest element (about 170 unit
roundoffs of it). Each rank holding the whole sequence, wrong positions on rank 1, a missing gather of the
segment ids or a per-rank token count moves the loss by well over 1e-3.
"""

import pytest
import torch

from distributed import run_distributed
from neox_fork.data.datasets import documents_of
from test_document_masks_packed_loss_equals_documents_apart import EOD, _documents_apart, _model, _packed

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

RTOL = 1e-5


def _batch(masks: bool):
    tokens, labels, mask = _packed(eod_mask_loss=True)
    batch = {"tokens": tokens, "labels": labels, "loss_mask": mask}
    if masks:
        segments, positions = documents_of(tokens, EOD)
        batch.update(segment_ids=segments, position_ids=positions)
    return batch


def _loss_and_grads(model, batch):
    extra = {k: batch[k] for k in ("position_ids", "segment_ids") if k in batch}
    loss = model(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"], **extra)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _context_parallel_rank(rank, masks: bool, keys: dict):
    import torch.distributed as dist

    from neox_fork.parallel import groups as parallel

    parallel.initialize(1, "gloo", context_parallel_size=2)
    model = _model(**keys)  # seeded as in this process: the same weights
    loss, grads = _loss_and_grads(model, parallel.context_slice(_batch(masks)))
    for t in [loss, *grads.values()]:
        dist.all_reduce(t, group=parallel.cp_group())
    return loss, grads


@pytest.mark.parametrize("masks, keys", [(True, {}), (False, {}), (True, {"num_kv_heads": 2})],
                         ids=["document_masks", "causal", "document_masks_gqa"])
def test_cp2_loss_and_gradients_equal_one_process(one_process, masks, keys):
    """GQA: 4 query heads on 2 key/value heads; each CP rank attends with 2 query heads and their 1 key/value head."""
    model = _model(**keys)
    want_loss, want_grads = _loss_and_grads(model, _batch(masks))
    if masks:
        tokens, labels, mask = _packed(eod_mask_loss=True)
        total, count = _documents_apart(model, tokens, labels, mask)
        torch.testing.assert_close(want_loss.double(), total / count, rtol=RTOL, atol=0)
    ranks = run_distributed(_context_parallel_rank, 2, masks, keys)
    for loss, grads in ranks:
        torch.testing.assert_close(loss, want_loss, rtol=RTOL, atol=0)
        assert grads.keys() == want_grads.keys()
        for name, want in want_grads.items():
            torch.testing.assert_close(grads[name], want, rtol=0, atol=1e-5 * want.abs().max().item(), msg=name)
