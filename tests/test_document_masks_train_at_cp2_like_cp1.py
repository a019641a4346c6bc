"""train.py with document masks (reset_attention_mask + reset_position_ids, eod_mask_loss) on short documents at
context_parallel_size 2 takes, loss for loss and weight for weight, the steps one process takes, and its validation
loss at the last step agrees: the loop's masked path (the global batch's trained-token count, each rank's slice of
the positions and segment ids, the segment ids gathered for the mask, the validation sums over data x context)
under context parallelism. The model-level check with gradients and the documents computed apart is
tests/test_context_parallel_loss_and_gradients_equal_one_process.py.

Tolerances as tests/test_parallel_equivalence.py: losses within 1e-5 relative, weights within 1e-3 of one step's
lr per step with Adam's eps at 1e-5.
"""

import pytest

from conftest import read_metrics, write_train_config, run_training
from test_document_masks_train_at_tp2_like_tp1 import DOCUMENT_MASKS, short_documents  # noqa: F401 (fixture)
from test_parallel_equivalence import LOSS_RTOL, LR, OPTIMIZER, assert_same_metrics, assert_same_weights

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

STEPS = 4


def _train(folder, corpus, nproc, documents, **keys):
    folder.mkdir()
    config = write_train_config(folder, corpus, train_iters=STEPS, optimizer=OPTIMIZER, make_vocab_size_divisible_by=256,
                                hidden_dropout=0.0, eval_interval=STEPS, **documents, **DOCUMENT_MASKS, **keys)
    run_training(config, nproc=nproc)
    return folder / "ckpt"


def test_cp2_with_document_masks_equals_one_process(tmp_path, small_corpus, short_documents):  # noqa: F811
    single = _train(tmp_path / "cp1", small_corpus, 1, short_documents)
    cp2 = _train(tmp_path / "cp2", small_corpus, 2, short_documents, context_parallel_size=2)
    assert_same_metrics(cp2, single, ("lm_loss",), steps=STEPS)
    assert_same_weights(cp2, single, tol=1e-3 * LR * STEPS)
    evals, want = read_metrics(cp2, "eval_lm_loss"), read_metrics(single, "eval_lm_loss")
    assert list(evals) == list(want) == [STEPS] and evals[STEPS] == pytest.approx(want[STEPS], rel=LOSS_RTOL)
