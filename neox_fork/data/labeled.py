"""Samples built from whole documents, with loss labels: masked fine-tuning (and any later loss that reads
a (data prefix, label prefix) pair).

Used instead of megatron-core's GPTDataset when a split has label data (`*_label_data_paths`, the chat
tool's `PREFIX_{key}_label_document`: a token's id where it is a target, -100 where not) or `pack_impl` is not
`packed`. A sample is a window of seq_length + 1 tokens made of pieces of documents; the inputs are its first
seq_length tokens and the targets its last seq_length labels (upstream's tokens[:-1] / labels[1:]).

pack_impl, as upstream gpt-neox (megatron/data/gpt2_dataset.py):
  packed               the documents of each epoch (shuffled) concatenated and cut every seq_length tokens,
                       consecutive samples sharing one token; labels follow their tokens.
  pack_until_overflow  whole documents (shuffled each epoch) one after another while they fit in seq_length + 1
                       tokens; the rest of the sample is padding.
  unpacked             one document per sample (in order, cycling), padded.
A document longer than seq_length + 1 tokens is cut to its first seq_length + 1 (allow_chopped true) or skipped
(false); in the last two modes so is a document with no trained target in that window. Each count is logged
once. Padding is token 0 with label -100 (never trained), as upstream. Sample order is shuffled with `seed`.

Unlike upstream, documents never see each other: every item carries `segment_ids` (which piece of the window
each input position belongs to; padding is a piece of its own) and `position_ids` restarting at 0 for each
piece; the model turns the segments into a block-diagonal causal mask. A position whose target is the first token
of the next piece is not trained (it cannot see that document). Without label data the targets are the tokens.

The sample layout (which piece of which document each sample holds) is built in memory with numpy on every rank;
it depends only on the sizes, the labels and the settings, so every rank and every resumed run gets the same one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy
import torch

from neox_fork.data import _megatron
from neox_fork.errors import UserError

log = logging.getLogger("neox_fork")

IGNORE_INDEX = -100
PACK_IMPLS = ("packed", "pack_until_overflow", "unpacked")


def check_aligned(prefix: str, other: str, lengths, other_lengths, kind: str, fix: str, sizes: bool = True) -> None:
    """One line if file `other` (a `kind`: label data, rewards, reference log-probabilities, the other side of
    a pair) does not go document for document with `prefix`: another document count or, with `sizes`,
    another length of some document. `fix` says what would be valid."""
    if len(lengths) != len(other_lengths):
        raise UserError(f"{kind} {other} holds {len(other_lengths)} documents but {prefix} holds {len(lengths)}; "
                        f"{fix}")
    differ = numpy.flatnonzero(numpy.asarray(lengths) != numpy.asarray(other_lengths)) if sizes else []
    if len(differ):
        i = int(differ[0])
        raise UserError(f"{kind} {other}: document {i} has {int(other_lengths[i])} entries but {prefix} document "
                        f"{i} has {int(lengths[i])} tokens; {fix}")


def check_label_files(data_prefix: str, label_prefix: str, data_lengths, label_lengths) -> None:
    """One line if a label file does not align with its data file (document count or sizes differ)."""
    check_aligned(data_prefix, label_prefix, data_lengths, label_lengths, "label data",
                  "give the _label_document written with that data")


@dataclass
class Layout:
    """Which pieces make each sample: sample k is pieces[starts[k]:starts[k + 1]], each (document, offset,
    length), in order, before the shuffle `order` (item i is sample order[i])."""

    doc: numpy.ndarray
    offset: numpy.ndarray
    length: numpy.ndarray
    starts: numpy.ndarray
    order: numpy.ndarray
    chopped: int = 0
    skipped: int = 0
    untrained: int = 0

    def sample(self, k: int) -> list[tuple[int, int, int]]:
        a, b = self.starts[k], self.starts[k + 1]
        return list(zip(self.doc[a:b].tolist(), self.offset[a:b].tolist(), self.length[a:b].tolist()))


def _has_target(labels, window: int) -> bool:
    return labels is None or bool((numpy.asarray(labels[1:window]) != IGNORE_INDEX).any())


def build_layout(sizes, documents, num_samples: int, seq_length: int, seed: int, pack_impl: str,
                 allow_chopped: bool = True, label_of=None) -> Layout:
    """The sample layout for `documents` (ids into `sizes`). `label_of(doc)` gives a document's labels (None:
    no label data). Deterministic in its arguments."""
    if pack_impl not in PACK_IMPLS:
        raise UserError(f"pack_impl {pack_impl!r} is not supported; valid: {', '.join(PACK_IMPLS)}")
    window = seq_length + 1
    documents = numpy.asarray(documents, dtype=numpy.int64)
    rng = numpy.random.RandomState(seed)
    pieces: list[tuple[int, int, int]] = []
    starts = [0]
    chopped = skipped = untrained = 0
    if pack_impl == "packed":
        tokens_per_epoch = int(numpy.asarray(sizes)[documents].sum())
        if tokens_per_epoch < window:
            raise UserError(f"{tokens_per_epoch} tokens are fewer than one sample of seq_length + 1 = {window}")
        epochs = 1
        while (epochs * tokens_per_epoch - 1) // seq_length < num_samples:
            epochs += 1
        order = numpy.concatenate([documents] * epochs)
        rng.shuffle(order)
        doc_i, offset = 0, 0  # where the next sample starts in the concatenation
        for _ in range(num_samples):
            need, d, o = window, doc_i, offset
            while True:
                take = min(int(sizes[order[d]]) - o, need)
                pieces.append((int(order[d]), o, take))
                need -= take
                if not need:
                    break
                d, o = d + 1, 0
            doc_i, offset = d, o + take - 1  # the next sample starts at this one's last token
            starts.append(len(pieces))
    else:
        usable = []
        for doc in documents.tolist():
            size = int(sizes[doc])
            if size > window and not allow_chopped:
                skipped += 1
                continue
            if size > window:
                chopped += 1
            if not _has_target(label_of(doc) if label_of else None, min(size, window)):
                untrained += 1
                continue
            usable.append(doc)
        if not usable:
            raise UserError(f"no document fits a sample of seq_length + 1 = {window} tokens with a trained target "
                            f"({skipped} longer and not allow_chopped, {untrained} with no trained target)")
        epoch = numpy.array(usable, dtype=numpy.int64)
        samples = 0
        if pack_impl == "unpacked":
            while samples < num_samples:
                for doc in epoch.tolist():
                    pieces.append((doc, 0, min(int(sizes[doc]), window)))
                    starts.append(len(pieces))
                    samples += 1
                    if samples == num_samples:
                        break
        else:  # pack_until_overflow
            running = 0
            while samples < num_samples:
                rng.shuffle(epoch)
                for doc in epoch.tolist():
                    length = min(int(sizes[doc]), window)
                    if running and running + length > window:
                        starts.append(len(pieces))
                        samples += 1
                        running = 0
                        if samples == num_samples:
                            break
                    pieces.append((doc, 0, length))
                    running += length
    arr = numpy.array(pieces, dtype=numpy.int64).reshape(-1, 3)
    shuffle = numpy.arange(num_samples, dtype=numpy.int64)
    rng.shuffle(shuffle)
    return Layout(arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].copy(), numpy.array(starts[: num_samples + 1]),
                  shuffle, chopped, skipped, untrained)


def assemble(pieces, read_tokens, read_labels, seq_length: int, eod: int | None = None,
             eod_mask_loss: bool = False) -> dict[str, torch.Tensor]:
    """One item from its pieces: tokens, labels, loss_mask, position_ids, segment_ids ([seq_length] each).

    `read_tokens(doc, offset, length)` / `read_labels(...)` (None: the tokens are the labels) read the files."""
    window = seq_length + 1
    tokens = numpy.zeros(window, dtype=numpy.int64)
    labels = numpy.full(window, IGNORE_INDEX, dtype=numpy.int64)
    segments = numpy.zeros(window, dtype=numpy.int64)
    positions = numpy.zeros(window, dtype=numpy.int64)
    at = 0
    for i, (doc, offset, length) in enumerate(pieces):
        tokens[at:at + length] = read_tokens(doc, offset, length)
        labels[at:at + length] = tokens[at:at + length] if read_labels is None else read_labels(doc, offset, length)
        segments[at:at + length] = i
        positions[at:at + length] = numpy.arange(length)
        at += length
    if at < window:  # padding: a segment of its own, never trained
        segments[at:] = len(pieces)
        positions[at:] = numpy.arange(window - at)
    targets = labels[1:]
    mask = (targets != IGNORE_INDEX) & (segments[1:] == segments[:-1])
    if eod_mask_loss and eod is not None:
        mask &= tokens[:-1] != eod
    return {
        "tokens": torch.from_numpy(tokens[:-1].copy()),
        "labels": torch.from_numpy(numpy.where(mask, targets, 0)),
        "loss_mask": torch.from_numpy(mask.astype(numpy.float32)),
        "position_ids": torch.from_numpy(positions[:-1].copy()),
        "segment_ids": torch.from_numpy(segments[:-1].copy()),
    }


class LabeledSamples(torch.utils.data.Dataset):
    """Samples of one (data prefix, label prefix or None) pair over `documents`; see the module docstring.

    Items: tokens, labels, loss_mask, position_ids, segment_ids ([seq_length] each) and dataset_id."""

    def __init__(self, data_prefix: str, label_prefix: str | None, documents, num_samples: int, seq_length: int,
                 seed: int, pack_impl: str = "packed", allow_chopped: bool = True, eod: int | None = None,
                 eod_mask_loss: bool = False, dataset_id: int = 0, name: str = "train"):
        IndexedDataset = _megatron.indexed_dataset().IndexedDataset
        self.data_prefix, self.label_prefix = data_prefix, label_prefix
        self.tokens = IndexedDataset(data_prefix)
        self.labels = IndexedDataset(label_prefix) if label_prefix else None
        sizes = self.tokens.sequence_lengths
        if self.labels is not None:
            check_label_files(data_prefix, label_prefix, sizes, self.labels.sequence_lengths)
        self.seq_length, self.eod, self.eod_mask_loss = seq_length, eod, eod_mask_loss
        self.dataset_id = dataset_id
        label_of = (lambda doc: self.labels.get(doc)) if self.labels is not None else None
        try:
            self.layout = build_layout(sizes, documents, num_samples, seq_length, seed, pack_impl, allow_chopped,
                                       label_of)
        except UserError as err:
            raise UserError(f"{name} data {data_prefix}: {err}") from None
        lay = self.layout
        if lay.chopped or lay.skipped or lay.untrained:
            log.info("%s data %s (pack_impl %s): %d documents longer than seq_length + 1 = %d %s, %d with no trained "
                     "target skipped", name, data_prefix, pack_impl, lay.skipped or lay.chopped, seq_length + 1,
                     "skipped (allow_chopped false)" if not allow_chopped else "cut", lay.untrained)

    def __len__(self) -> int:
        return len(self.layout.order)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pieces = self.layout.sample(int(self.layout.order[int(index)]))
        read_labels = None
        if self.labels is not None:
            read_labels = lambda d, o, n: self.labels.get(d, offset=o, length=n)  # noqa: E731
        item = assemble(pieces, lambda d, o, n: self.tokens.get(d, offset=o, length=n), read_labels,
                        self.seq_length, self.eod, self.eod_mask_loss)
        item["dataset_id"] = torch.tensor(self.dataset_id, dtype=torch.int64)
        return item


class Blend(torch.utils.data.Dataset):
    """`size` samples drawn from several datasets in megatron-core's blending order (its C++ helper): sample i
    comes from the dataset furthest behind its weight's share so far."""

    def __init__(self, make_dataset, weights, size: int):
        helpers = _megatron_helpers()
        w = numpy.array(weights, dtype=numpy.float64)
        w = w / w.sum()
        self.dataset_index = numpy.zeros(size, dtype=numpy.int16)
        self.sample_index = numpy.zeros(size, dtype=numpy.int64)
        helpers.build_blending_indices(self.dataset_index, self.sample_index, w, len(w), size, False)
        counts = numpy.bincount(self.dataset_index, minlength=len(w))
        self.datasets = [make_dataset(i, max(int(n), 1)) for i, n in enumerate(counts)]

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.datasets[int(self.dataset_index[index])][int(self.sample_index[index])]


def _megatron_helpers():
    _megatron.indexed_dataset()
    from megatron.core.datasets import helpers

    return helpers
