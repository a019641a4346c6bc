"""Reference log-probabilities computed ahead (tools/datasets/precompute_reference.py, upstream's precompute)
give the DPO loss and metrics that the live frozen reference gives on the same pairs; the tool's files are
named and laid out as upstream's (PREFIX_NAME, position j = log p of token j + 1)."""

import numpy
import pytest
import torch

from conftest import tiny_keys
from neox_fork.checkpoint import store as checkpoint
from neox_fork.config.loading import from_dict
from neox_fork.data.datasets import collate_samples
from neox_fork.data.pairwise import PairFiles, PairwiseSamples
from neox_fork.model.transformer import build_model
from neox_fork.training.preference import Objective, make_reference, precompute_reference
from test_preference_dpo_trains_exports_and_resumes import _write

SEQ = 12


def test_precomputed_reference_gives_the_live_losses(one_process, tmp_path):
    keys = tiny_keys(seq_length=SEQ, train_impl="dpo", dataset_impl="pairwise", pos_train_data_paths=["p"],
                     neg_train_data_paths=["n"], hidden_dropout=0.0, attention_dropout=0.0, dpo_beta=0.5)
    live_c, pre_c = from_dict(keys), from_dict({**keys, "precompute_model_name": "sft"})
    torch.manual_seed(0)
    reference = build_model(live_c).eval()
    ckpt = checkpoint.save_model_checkpoint(tmp_path / "ref", 1, [checkpoint.model_state(reference)], live_c)
    g = numpy.random.default_rng(0)
    docs = {side: [g.integers(0, 1000, n).tolist() for n in (9, 13, 20, 6)] for side in ("pos", "neg")}
    prefixes = {side: _write(tmp_path / side, docs[side]) for side in docs}
    labels = {side: _write(tmp_path / f"{side}_label", [[-100] * (len(d) // 2) + d[len(d) // 2:] for d in docs[side]])
              for side in docs}
    written = precompute_reference(str(ckpt.parent), [prefixes["pos"], prefixes["neg"]], "sft", SEQ)
    assert written == [prefixes["pos"] + "_sft", prefixes["neg"] + "_sft"]  # upstream's naming
    # by hand for document 0 of pos: position j holds log p(token j + 1 | tokens 0..j), 0 at the end
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    doc = torch.tensor(docs["pos"][0])
    want = torch.log_softmax(reference(doc[None, :-1]).double(), -1)[0, torch.arange(8), doc[1:]]
    written_pos = IndexedDataset(written[0])  # kept alive: its items are views of its mmap
    got = torch.tensor(numpy.array(written_pos[0]))
    torch.testing.assert_close(got[:-1].double(), want, rtol=0, atol=1e-5)
    assert got[-1] == 0

    files = PairFiles(prefixes["pos"], prefixes["neg"], labels["pos"], labels["neg"])
    pre_files = PairFiles(files.pos, files.neg, files.pos_label, files.neg_label, written[0], written[1])
    live = PairwiseSamples([files], SEQ, 4, seed=3)
    pre = PairwiseSamples([pre_files], SEQ, 4, seed=3)
    batch, pre_batch = (collate_samples([s[k] for k in range(4)]) for s in (live, pre))
    assert "ref" in pre_batch and pre_batch["ref"].shape == (4, 2, SEQ)
    policy = build_model(live_c)  # another seed's weights: rewards are not 0
    loss_live, m_live = Objective(live_c, make_reference(reference))(policy, batch)
    loss_pre, m_pre = Objective(pre_c)(policy, pre_batch)
    assert Objective(pre_c).needs_reference is False
    assert loss_pre.item() == pytest.approx(loss_live.item(), abs=1e-5)
    for key in ("ref_pos", "ref_neg", "chosen_rewards", "margins"):
        assert m_pre[key].item() == pytest.approx(m_live[key].item(), abs=1e-4), key
    assert abs(m_live["margins"].item()) > 1e-3
