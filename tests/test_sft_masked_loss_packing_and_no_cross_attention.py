"""Masked fine-tuning, in one process: the loss is the mean over trained positions (a hand computation in
float64 from the model's own logits), masked positions get no gradient, packed documents do not attend to each
other (a document's logits equal those of the document run alone), and the pack_impl / allow_chopped sample
layouts are the hand-worked ones. Tolerances: fp32 sums of at most B*S = 128 terms (rtol 1e-5); logits of a
document run inside a pack or alone go through the same ops on a different mask (atol 1e-5)."""

import numpy
import pytest
import torch

from conftest import tiny_keys
from neox_fork.config.loading import from_dict
from neox_fork.data.labeled import LabeledSamples, build_layout
from neox_fork.errors import UserError
from neox_fork.model.transformer import build_model

B, S, VOCAB = 2, 64, 1000


def _model(**keys):
    torch.manual_seed(0)
    return build_model(from_dict(tiny_keys(seq_length=S, **keys))).train()


def _packed_batch():
    """Two documents per row (lengths 20 + 44 and 37 + 27), positions restarting at each, a third of the
    targets trained."""
    g = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, VOCAB, (B, S), generator=g), torch.randint(0, VOCAB, (B, S), generator=g)
    segments = torch.zeros(B, S, dtype=torch.int64)
    segments[0, 20:], segments[1, 37:] = 1, 1
    positions = torch.cat([torch.arange(20), torch.arange(44), torch.arange(37), torch.arange(27)]).view(B, S)
    mask = (torch.rand(B, S, generator=g) < 0.33).float()
    return tokens, labels, mask, positions, segments


@pytest.mark.parametrize("fused_path", [True, False], ids=["fused_head_loss", "chunked"])
def test_masked_loss_is_the_mean_over_trained_positions(one_process, fused_path):
    model = _model(fused_cross_entropy=True)
    model.shape.loss_chunk_tokens = 48  # several chunks, one straddling the rows
    tokens, labels, mask, positions, segments = _packed_batch()
    with torch.no_grad():
        logits = model(tokens, position_ids=positions, segment_ids=segments).double()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    by_hand = -(logp * mask.double()).sum() / mask.sum()
    assert 20 < mask.sum() < 60
    with torch.enable_grad():
        if fused_path:  # TP=1 training: the fused head + loss
            loss = model(tokens, position_ids=positions, labels=labels, loss_mask=mask, segment_ids=segments)
        else:
            loss = model.chunked_loss(tokens, labels, mask, positions, segments)
    torch.testing.assert_close(loss.double(), by_hand, rtol=1e-5, atol=0)
    # a denominator (the global batch's count, from training/loop.py) replaces the batch's own
    loss_sum = model.chunked_loss(tokens, labels, mask, positions, segments, denominator=1.0)
    torch.testing.assert_close(loss_sum.double(), by_hand * mask.sum(), rtol=1e-5, atol=0)


def _grads(model, tokens, labels, mask, positions, segments):
    model.zero_grad(set_to_none=True)
    model(tokens, position_ids=positions, labels=labels, loss_mask=mask, segment_ids=segments).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_a_masked_target_moves_no_gradient(one_process):
    model = _model(fused_cross_entropy=True)
    tokens, labels, mask, positions, segments = _packed_batch()
    before = _grads(model, tokens, labels, mask, positions, segments)
    masked = int((mask[0] == 0).nonzero()[3])
    trained = int((mask[0] == 1).nonzero()[3])
    other = labels.clone()
    other[0, masked] = (labels[0, masked] + 1) % VOCAB
    after = _grads(model, tokens, other, mask, positions, segments)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    other = labels.clone()
    other[0, trained] = (labels[0, trained] + 1) % VOCAB  # a trained target does move them
    moved = _grads(model, tokens, other, mask, positions, segments)
    assert any(not torch.equal(before[n], moved[n]) for n in before)


@pytest.mark.parametrize("pos_emb", ["rotary", "learned"])
def test_packed_documents_do_not_attend_across(one_process, pos_emb):
    model = _model(pos_emb=pos_emb).eval()
    tokens, _, _, positions, segments = _packed_batch()
    with torch.no_grad():
        packed = model(tokens, position_ids=positions, segment_ids=segments)
        changed = tokens.clone()
        changed[0, 5] = (tokens[0, 5] + 1) % VOCAB  # a token of the first document of row 0
        after = model(changed, position_ids=positions, segment_ids=segments)
        alone = model(tokens[:1, 20:])  # row 0's second document on its own, positions 0..43
        unsegmented = model(changed)
    torch.testing.assert_close(after[0, 20:], packed[0, 20:], rtol=0, atol=1e-6)
    assert not torch.allclose(after[0, 5:20], packed[0, 5:20])  # its own document sees the change
    torch.testing.assert_close(packed[0, 20:], alone[0], rtol=0, atol=1e-5)
    # without segments the change does reach the second document (the check above can fail)
    assert (unsegmented[0, 20:] - model(tokens)[0, 20:]).abs().max() > 1e-4


# ---------------------------------------------------------------------- sample layouts
# Four documents: d0 = 1 2 3, d1 = 11..15, d2 = 21 22, d3 = 31..37, labels -100 where marked.
DOCS = [[1, 2, 3], [11, 12, 13, 14, 15], [21, 22], [31, 32, 33, 34, 35, 36, 37]]
# d0 and d2 have their first token trained (as --no-mask writes): only the sample's layout keeps it untrained
LABELS = [[1, 2, 3], [-100, -100, 13, 14, 15], [21, 22], [-100, 32, 33, 34, 35, 36, 37]]
SEQ = 4  # windows of 5 tokens


@pytest.fixture
def files(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefixes = []
    for name, docs, dtype in (("sftmask_text", DOCS, numpy.uint16), ("sftmask_label", LABELS, numpy.int32)):
        builder = IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), dtype=dtype)
        for doc in docs:
            builder.add_document(torch.tensor(doc), [len(doc)])
        builder.finalize(str(tmp_path / f"{name}.idx"))
        prefixes.append(str(tmp_path / name))
    return prefixes


# Hand-worked items (tokens, labels, loss_mask, position_ids, segment_ids) of one document per sample: inputs are
# the window's first 4 tokens, targets its last 4 labels; padding is token 0, label -100, a segment of its own.
D0 = ([1, 2, 3, 0], [2, 3, 0, 0], [1, 1, 0, 0], [0, 1, 2, 0], [0, 0, 0, 1])
D1 = ([11, 12, 13, 14], [0, 13, 14, 15], [0, 1, 1, 1], [0, 1, 2, 3], [0, 0, 0, 0])
D2 = ([21, 22, 0, 0], [22, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 1])
D3_CUT = ([31, 32, 33, 34], [32, 33, 34, 35], [1, 1, 1, 1], [0, 1, 2, 3], [0, 0, 0, 0])
# d0 and d2 in one window, in either order; the last target of the first document is the other's first token:
# not trained (it cannot see that document)
D0_D2 = ([1, 2, 3, 21], [2, 3, 0, 22], [1, 1, 0, 1], [0, 1, 2, 0], [0, 0, 0, 1])
D2_D0 = ([21, 22, 1, 2], [22, 0, 2, 3], [1, 0, 1, 1], [0, 1, 0, 1], [0, 0, 1, 1])


def _items(dataset):
    keys = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids")
    return sorted(tuple(tuple(int(x) for x in dataset[i][k].tolist()) for k in keys) for i in range(len(dataset)))


def _hand(*items):
    return sorted(tuple(tuple(part) for part in item) for item in items)


@pytest.mark.parametrize("pack_impl, allow_chopped, documents, samples, expected, cut_or_skipped", [
    ("unpacked", True, range(4), 4, [D0, D1, D2, D3_CUT], 1),
    ("unpacked", False, range(4), 4, [D0, D1, D2, D0], 1),  # d3 skipped, the order cycles
    ("pack_until_overflow", False, [0, 2], 2, "d0+d2", 0),
    ("packed", True, [0, 2], 1, "d0+d2", 0),
])
def test_sample_layouts_are_the_hand_worked_ones(files, caplog, pack_impl, allow_chopped, documents, samples,
                                                 expected, cut_or_skipped):
    text, label = files
    with caplog.at_level("INFO", logger="neox_fork"):
        dataset = LabeledSamples(text, label, documents, samples, SEQ, seed=3, pack_impl=pack_impl,
                                 allow_chopped=allow_chopped)
    got = _items(dataset)
    if expected == "d0+d2":
        assert all(item in _hand(D0_D2, D2_D0) for item in got) and len(got) == samples
    else:
        assert got == _hand(*expected)
    if cut_or_skipped:
        assert len([r for r in caplog.records if "longer than seq_length + 1 = 5" in r.getMessage()]) == 1
        assert (f"1 documents longer than seq_length + 1 = 5 {'cut' if allow_chopped else 'skipped'}"
                in caplog.text)


def test_packed_windows_share_one_token_and_follow_their_labels(files):
    text, label = files
    # d3 alone, windows of 4 tokens: 31..34 and 34..37 (consecutive samples share a token, as megatron)
    dataset = LabeledSamples(text, label, [3], 2, 3, seed=0, pack_impl="packed")
    assert _items(dataset) == _hand(([31, 32, 33], [32, 33, 34], [1, 1, 1], [0, 1, 2], [0, 0, 0]),
                                    ([34, 35, 36], [35, 36, 37], [1, 1, 1], [0, 1, 2], [0, 0, 0]))


def test_layout_is_deterministic_and_unknown_pack_impl_is_one_line():
    sizes = numpy.array([3, 5, 2, 7])
    a = build_layout(sizes, range(4), 6, 4, 9, "pack_until_overflow")
    b = build_layout(sizes, range(4), 6, 4, 9, "pack_until_overflow")
    assert [a.sample(k) for k in range(6)] == [b.sample(k) for k in range(6)] and (a.order == b.order).all()
    with pytest.raises(UserError, match="pack_impl 'tight' is not supported; valid: packed, pack_until_overflow"):
        build_layout(sizes, range(4), 6, 4, 9, "tight")


def test_a_label_file_that_does_not_fit_its_data_names_both(files, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    text, _ = files
    builder = IndexedDatasetBuilder(str(tmp_path / "sftmask_short.bin"), dtype=numpy.int32)
    for doc in LABELS[:3] + [LABELS[3][:-1]]:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(str(tmp_path / "sftmask_short.idx"))
    short = str(tmp_path / "sftmask_short")
    with pytest.raises(UserError, match=f"label data {short}: document 3 has 6 entries but {text} document 3 "
                                        "has 7 tokens"):
        LabeledSamples(text, short, range(4), 2, SEQ, seed=0)


@pytest.mark.parametrize("keys, message", [
    (dict(train_data_paths=["a", "b"], train_label_data_paths=["a_label"]),
     "train_label_data_paths has 1 entries for 2 train_data_paths"),
    (dict(pack_impl="tight"), "pack_impl 'tight' is not supported; valid: packed, pack_until_overflow, unpacked"),
    (dict(data_path="a", train_label_data_paths=["a_label"]), "not data_path"),
])
def test_config_refuses_bad_label_settings_in_one_line(keys, message):
    with pytest.raises(UserError, match=message):
        from_dict(tiny_keys(**keys))


def test_a_blend_keeps_each_path_with_its_own_labels(files):
    from neox_fork.data.labeled import Blend

    text, label = files
    parts = {0: [1], 1: [3]}  # two "paths": d1 alone and d3 alone, unpacked

    def make(j, n):
        return LabeledSamples(text, label, parts[j], n, SEQ, seed=0, pack_impl="unpacked", dataset_id=j)

    blend = Blend(make, [1.0, 3.0], 8)
    ids = [int(blend[i]["dataset_id"]) for i in range(8)]
    assert ids.count(0) == 2 and ids.count(1) == 6  # megatron-core's order: shares 1/4 and 3/4
    for i in range(8):
        want = [D1, D3_CUT][ids[i]]
        assert tuple(tuple(blend[i][k].tolist()) for k in ("tokens", "labels", "loss_mask")) == tuple(
            tuple(part) for part in want[:3])
