"""train.py with document masks (reset_attention_mask + reset_position_ids, eod_mask_loss) on short documents
(5 to 40 tokens and an end-of-document token, so every 64-token sample packs several; the demo tokenizer's ids):
TP=2 takes, loss for loss and weight for weight, the steps one process takes, and the keys change what is
trained (from the same weights and data, the losses with them off part). Validation at the last step agrees too.

Tolerances as tests/test_parallel_equivalence.py (TP sums the same numbers in another order): losses within
1e-5 relative, weights within 1e-3 of one step's lr per step with Adam's eps at 1e-5.
"""

import numpy
import pytest
import torch

from conftest import read_metrics
from test_parallel_equivalence import LOSS_RTOL, STEPS, assert_same_losses, assert_same_weights, train

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

EOD = 0  # the demo tokenizer's <|endoftext|>


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path_factory.mktemp("short_documents") / "short_text_document"
    g = torch.Generator().manual_seed(5)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint16)
    for _ in range(300):
        n = int(torch.randint(5, 41, (1,), generator=g))
        builder.add_document(torch.cat([torch.randint(1, 600, (n,), generator=g), torch.tensor([EOD])]), [n + 1])
    builder.finalize(f"{prefix}.idx")
    return dict(train_data_paths=[str(prefix)], valid_data_paths=[str(prefix)], train_micro_batch_size_per_gpu=4)


DOCUMENT_MASKS = dict(reset_attention_mask=True, reset_position_ids=True, eod_mask_loss=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory, small_corpus, short_documents):
    return train(tmp_path_factory.mktemp("docmask"), small_corpus, "tp1", 1, eval_interval=STEPS, **short_documents,
                 **DOCUMENT_MASKS)


def test_tp2_with_document_masks_equals_one_process(tmp_path, small_corpus, short_documents, single):
    tp2 = train(tmp_path, small_corpus, "tp2", 2, model_parallel_size=2, eval_interval=STEPS, **short_documents,
                **DOCUMENT_MASKS)
    assert_same_losses(tp2, single)
    assert_same_weights(tp2, single)
    # validation (the same samples, masked the same way)
    evals, want = read_metrics(tp2, "eval_lm_loss"), read_metrics(single, "eval_lm_loss")
    assert list(evals) == list(want) == [STEPS] and evals[STEPS] == pytest.approx(want[STEPS], rel=LOSS_RTOL)


def test_the_keys_change_what_is_trained(tmp_path, small_corpus, short_documents, single):
    """Same weights, data and steps with the keys off: the losses part, by the last step by more than twenty
    times the tolerance the TP comparison allows (observed: 57 times; at step 1 the near-uniform initial model
    hardly depends on its context, 3 times)."""
    off = train(tmp_path, small_corpus, "off", 1, eod_mask_loss=True, **short_documents)
    on, without = read_metrics(single), read_metrics(off)
    assert on[1] != without[1]
    assert abs(on[STEPS] - without[STEPS]) > 20 * LOSS_RTOL * without[STEPS], (on, without)
