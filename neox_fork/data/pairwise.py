"""Pairwise samples for DPO and reward models (`dataset_impl: pairwise`), as upstream's PairwiseDataset.

Pair i is document i of `pos_*_data_paths` (the chosen answer) with document i of `neg_*_data_paths` (the
rejected one), both made by `preprocess_data_with_chat_template.py` (`--jsonl-keys chosen` and `... rejected`),
with their `*_label_data_paths` when given. Several prefixes are read one after the other. Each sample is one
pair, one conversation per row, padded (upstream refuses `pack_impl: packed` for pairs; `unpacked` and
`pack_until_overflow` both give one pair per sample here, as upstream's pairwise index does for pairs that fill a
sequence). A conversation longer than `seq_length + 1` tokens is cut there, or its pair skipped when
`allow_chopped` is false (how many, logged once). Epochs are reshuffled from `seed`, so sample k is the same
pair in every run: resume and data-parallel ranks follow training.PretrainingBatchSampler as for pretraining.

Each item: tokens int64 [2, seq_length] (row 0 chosen, row 1 rejected; padding 0), labels int64 [2, seq_length]
(the next token where it is trained, -100 elsewhere), loss_mask float32 [2, seq_length] (1 where trained);
with precomputed reference log-probabilities (`precompute_model_name`) also ref float32 [2, seq_length]: the
reference's log-probability of labels[j], at j. Without label files every real (non-padding) next token is
trained. A pair in which either side trains nothing is refused in one line naming the file and document.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy
import torch

from neox_fork.data import _megatron
from neox_fork.data.labeled import check_aligned
from neox_fork.data.validate import inspect_indexed_dataset
from neox_fork.errors import UserError

log = logging.getLogger("neox_fork")
IGNORE_INDEX = -100


def ref_prefix(prefix: str, model_name: str) -> str:
    """Where the reference log-probabilities of `prefix` are (upstream's name: PREFIX_MODELNAME), as
    tools/datasets/precompute_reference.py writes them: per document, at position j the reference's
    log-probability of token j + 1 (0 at the last position)."""
    return f"{prefix}_{model_name}"


@dataclass(frozen=True)
class PairFiles:
    """One chosen prefix with its rejected twin, and their label (and reference) prefixes if any."""

    pos: str
    neg: str
    pos_label: str | None = None
    neg_label: str | None = None
    pos_ref: str | None = None
    neg_ref: str | None = None


def pair_files(c, split: str) -> list[PairFiles]:
    """The pairs of `split` ("train", "valid", "test") as the config names them."""
    pos, neg = getattr(c, f"pos_{split}_data_paths"), getattr(c, f"neg_{split}_data_paths")
    pos_l = getattr(c, f"pos_{split}_label_data_paths") or [None] * len(pos)
    neg_l = getattr(c, f"neg_{split}_label_data_paths") or [None] * len(neg)
    name = c.precompute_model_name
    return [PairFiles(p, n, pl, nl, ref_prefix(p, name) if name else None, ref_prefix(n, name) if name else None)
            for p, n, pl, nl in zip(pos, neg, pos_l, neg_l)]


def _open(prefix: str):
    return _megatron.indexed_dataset().IndexedDataset(prefix)


def _lengths(prefix: str) -> numpy.ndarray:
    return inspect_indexed_dataset(prefix).sequence_lengths


def _value_lengths(prefix: str) -> numpy.ndarray:
    """Document lengths of a float file (rewards, reference log-probabilities), which validate.py's token
    reader does not take."""
    import os

    for path in (prefix + ".idx", prefix + ".bin"):
        if not os.path.isfile(path):
            raise UserError(f"data path {prefix}: {path} does not exist (paths are prefixes without .bin/.idx)")
    dataset = _open(prefix)
    return numpy.array(dataset.sequence_lengths)  # a copy: the view dies with the dataset's mmap


class PairwiseSamples(torch.utils.data.Dataset):
    """`num_samples` pairs from `files`, in a reshuffled order per epoch (see the module docstring)."""

    def __init__(self, files: Sequence[PairFiles], seq_length: int, num_samples: int, seed: int,
                 allow_chopped: bool = True):
        self.files, self.seq_length = list(files), seq_length
        self._readers: dict[str, object] = {}
        limit = seq_length + 1
        pairs, chopped, skipped = [], 0, 0
        for f_index, f in enumerate(self.files):
            lp, ln = _lengths(f.pos), _lengths(f.neg)
            check_aligned(f.pos, f.neg, lp, ln, "data path", "pair i of pos_*_data_paths goes with pair i of "
                          "neg_*_data_paths: both must hold the same conversations", sizes=False)
            for tokens, other in ((f.pos, f.pos_label), (f.neg, f.neg_label), (f.pos, f.pos_ref),
                                  (f.neg, f.neg_ref)):
                if other is not None:
                    kind = "reference log-probabilities" if other in (f.pos_ref, f.neg_ref) else "labels"
                    lengths = _value_lengths(other) if kind.startswith("reference") else _lengths(other)
                    check_aligned(tokens, other, _lengths(tokens), lengths, "data path",
                                  f"{kind} must be aligned with their tokens")
            too_long = (lp > limit) | (ln > limit)
            chopped += int(too_long.sum())
            for doc in range(len(lp)):
                if too_long[doc] and not allow_chopped:
                    skipped += 1
                    continue
                pairs.append((f_index, doc))
        if chopped:
            log.info("pairwise data: %d pairs longer than seq_length + 1 = %d tokens were %s", chopped, limit,
                     "cut" if allow_chopped else "skipped (allow_chopped: false)")
        if not pairs:
            raise UserError(f"data path {self.files[0].pos}: no pair fits in seq_length {seq_length} "
                            "(allow_chopped is false); raise seq_length or set allow_chopped: true")
        self.pairs = numpy.array(pairs, dtype=numpy.int64)
        self._check_masks()
        epochs = -(-num_samples // len(self.pairs))
        self.order = numpy.concatenate([numpy.random.RandomState(seed + e).permutation(len(self.pairs))
                                        for e in range(max(epochs, 1))])[:max(num_samples, len(self.pairs))]

    def _reader(self, prefix: str):
        if prefix not in self._readers:
            self._readers[prefix] = _open(prefix)
        return self._readers[prefix]

    def _check_masks(self) -> None:
        """Every pair trains at least one position on each side (upstream would divide by nothing)."""
        for f_index, doc in self.pairs:
            f = self.files[f_index]
            for tokens, labels in ((f.pos, f.pos_label), (f.neg, f.neg_label)):
                row = self._row(tokens, labels, None, int(doc))
                if not row[2].any():
                    raise UserError(f"data path {labels or tokens}: document {doc} trains no position within "
                                    f"seq_length {self.seq_length} (its labels are all -100); drop it or "
                                    "preprocess with the generation role's turns in it")

    def __len__(self) -> int:
        return len(self.order)

    def _row(self, tokens_prefix: str, label_prefix: str | None, ref: str | None, doc: int):
        n = self.seq_length
        tokens = self._reader(tokens_prefix).get(doc)[: n + 1].astype(numpy.int64)
        if label_prefix is not None:
            targets = self._reader(label_prefix).get(doc)[: n + 1].astype(numpy.int64)[1:]
        else:
            targets = tokens[1:]
        inputs = numpy.zeros(n, numpy.int64)
        labels = numpy.full(n, IGNORE_INDEX, numpy.int64)
        inputs[: len(tokens) - 1] = tokens[:-1]
        labels[: len(targets)] = targets
        mask = (labels >= 0).astype(numpy.float32)
        ref_row = None
        if ref is not None:
            ref_row = numpy.zeros(n, numpy.float32)
            values = self._reader(ref).get(doc)[:n].astype(numpy.float32)  # [j]: log p(token j + 1)
            ref_row[: len(values)] = values
        return inputs, labels, mask, ref_row

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        f_index, doc = self.pairs[self.order[index]]
        f = self.files[f_index]
        pos = self._row(f.pos, f.pos_label, f.pos_ref, int(doc))
        neg = self._row(f.neg, f.neg_label, f.neg_ref, int(doc))
        item = {"tokens": torch.from_numpy(numpy.stack([pos[0], neg[0]])),
                "labels": torch.from_numpy(numpy.stack([pos[1], neg[1]])),
                "loss_mask": torch.from_numpy(numpy.stack([pos[2], neg[2]]))}
        if f.pos_ref is not None:
            item["ref"] = torch.from_numpy(numpy.stack([pos[3], neg[3]]))
        return item

    def __getstate__(self):  # data-loader workers open their own readers
        return {**self.__dict__, "_readers": {}}


def build_pairwise(c, world_size: int) -> tuple[PairwiseSamples | None, PairwiseSamples | None]:
    """Train and valid pairwise samples for the run (valid None without pos_valid_data_paths)."""
    global_batch = c.global_batch_size(world_size)
    allow_chopped = c.allow_chopped
    train = PairwiseSamples(pair_files(c, "train"), c.seq_length, c.train_iters * global_batch, c.seed,
                            allow_chopped)
    valid = None
    if c.pos_valid_data_paths and c.eval_iters:
        evals = (c.train_iters // c.eval_interval + 1) * c.eval_iters
        valid = PairwiseSamples(pair_files(c, "valid"), c.seq_length, evals * global_batch, c.seed, allow_chopped)
    return train, valid


class RewardedSamples(torch.utils.data.Dataset):
    """KTO's unpaired examples: `samples` (data/labeled.py with pack_impl unpacked: one document per sample)
    with each document's reward from `reward_prefix` (the chat tool's `--reward-key` file: one value per
    document) as item["reward"], a float32 scalar (upstream repeats it over the sample's positions and takes
    their mean, the same number)."""

    def __init__(self, samples, reward_prefix: str):
        self.samples, self.reward_prefix = samples, reward_prefix
        lengths, docs = _value_lengths(reward_prefix), len(samples.tokens)
        if len(lengths) != docs:
            raise UserError(f"reward data {reward_prefix}: holds {len(lengths)} documents but its data "
                            f"{samples.data_prefix} holds {docs}; give the _reward_document written with that data")
        if (lengths != 1).any():
            raise UserError(f"reward data {reward_prefix}: document {int(numpy.flatnonzero(lengths != 1)[0])} holds "
                            f"{int(lengths[lengths != 1][0])} values, not one reward")
        self._rewards = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self._rewards is None:
            self._rewards = _open(self.reward_prefix)
        item = self.samples[index]
        (doc, _, _), = self.samples.layout.sample(int(self.samples.layout.order[int(index)]))
        item["reward"] = torch.tensor(float(self._rewards.get(int(doc))[0]), dtype=torch.float32)
        return item

    def __getstate__(self):
        return {**self.__dict__, "_rewards": None}


def build_kto(c, tokenizer, world_size: int):
    """Train and valid samples for train_impl kto: the labeled data (one document per sample) with rewards."""
    from neox_fork.data.datasets import DataSettings, build_datasets

    if c.pack_impl != "unpacked":
        raise UserError(f"{c.where('pack_impl')}: train_impl kto reads one conversation per sample with its "
                        f"reward: set pack_impl: unpacked (upstream allows rewards only there), not {c.pack_impl}")
    for split in ("train", "valid"):
        paths, rewards = getattr(c, f"{split}_data_paths"), getattr(c, f"{split}_reward_data_paths")
        if paths and len(paths) != 1 or (paths and len(rewards) != len(paths)):
            raise UserError(f"{c.where(f'{split}_reward_data_paths')}: train_impl kto takes one {split} data path "
                            f"with one {split}_reward_data_paths entry; got {len(paths)} and {len(rewards)}")
    train, valid, _ = build_datasets(DataSettings.from_config(c, world_size), tokenizer)
    return (RewardedSamples(train, c.train_reward_data_paths[0]) if train is not None else None,
            RewardedSamples(valid, c.valid_reward_data_paths[0]) if valid is not None else None)
