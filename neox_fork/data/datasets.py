"""Training samples from `.bin/.idx` datasets, blended and shuffled by megatron-core, and a resumable
batch iterator with Megatron's pretraining-sampler order.

Settings follow GPT-NeoX: either one `data_path` cut into train/valid/test by `split` ("969,30,1",
ranges of documents), or separate `train/valid/test_data_paths` each with optional weights (equal
when omitted). Samples are `seq_length + 1` tokens packed across document boundaries; a dataset
smaller than the requested samples is repeated for more epochs, each reshuffled, as in GPT-NeoX.

Each dataset item is a dict of torch tensors:
    tokens     int64 [seq_length]   inputs
    labels     int64 [seq_length]   tokens shifted left by one (the next token)
    loss_mask  float32 [seq_length] 1.0 where the label counts (0 at end-of-document ids when
                                    eod_mask_loss is set)
    dataset_id int64 []             which entry of the blend the sample came from (0 without blend)
With `reset_attention_mask` / `reset_position_ids` (Megatron-LM's keys) a packed sample's documents are told
apart at its end-of-document tokens (`documents_of`): items also carry segment_ids / position_ids [seq_length].

Index caches (document/sample/shuffle orders) are written once under `cache_dir` and reused (checked first:
data/index_cache.py). Under
torch.distributed rank 0 builds them while the other ranks wait at a barrier, then load them; a
single process without a process group needs no initialisation (the blend's own index, which is
cheap, is then rebuilt in memory instead of cached, since megatron-core asks for the rank there).
"""

from __future__ import annotations

import copy
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from neox_fork.data import _megatron
from neox_fork.data.index_cache import check_index_cache
from neox_fork.data.validate import (
    check_token_ids,
    check_weights,
    inspect_indexed_dataset,
    parse_split,
    split_document_ranges,
)
from neox_fork.data.labeled import Blend, LabeledSamples, check_label_files
from neox_fork.errors import UserError

SPLIT_NAMES = ("train", "valid", "test")


@dataclass(frozen=True)
class DataSettings:
    """What the data pipeline reads from a run's config: built once (`from_config`) and passed down.

    Either `data_path` cut into train/valid/test by `split`, or per-split path lists with optional
    weights; `*_samples` is how many samples each split must provide (0: none asked).
    """

    seq_length: int
    train_samples: int
    valid_samples: int = 0
    test_samples: int = 0
    data_path: str | None = None
    train_data_paths: Sequence[str] = ()
    train_data_weights: Sequence[float] | None = None
    valid_data_paths: Sequence[str] = ()
    valid_data_weights: Sequence[float] | None = None
    test_data_paths: Sequence[str] = ()
    test_data_weights: Sequence[float] | None = None
    split: str | None = "969,30,1"
    seed: int = 1234  # GPT-NeoX's default
    cache_dir: str | None = None  # None: index_cache/ beside the first dataset
    eod_mask_loss: bool = False
    weight_by_num_documents: bool = False
    weighted_sampler_alpha: float = 1.0
    train_label_data_paths: Sequence[str] = ()
    valid_label_data_paths: Sequence[str] = ()
    test_label_data_paths: Sequence[str] = ()
    pack_impl: str = "packed"
    allow_chopped: bool = True
    reset_attention_mask: bool = False
    reset_position_ids: bool = False

    @property
    def own_samples(self) -> bool:
        """Whether samples come from neox_fork.data.labeled (label data or a pack_impl other than packed)
        rather than megatron-core's GPTDataset."""
        return bool(self.train_label_data_paths or self.valid_label_data_paths or self.test_label_data_paths
                    or self.pack_impl != "packed")

    @classmethod
    def from_config(cls, c, world_size: int) -> "DataSettings":
        """The settings of a run of `c` (a NeoXConfig) on `world_size` ranks: train_iters global batches of
        training samples, eval_iters micro-batches per data-parallel rank of validation samples."""
        return cls(
            seq_length=c.seq_length,
            train_samples=c.train_iters * c.global_batch_size(world_size),
            valid_samples=c.eval_iters * c.train_micro_batch_size_per_gpu * c.data_parallel_size(world_size),
            data_path=c.data_path,
            train_data_paths=c.train_data_paths, train_data_weights=c.train_data_weights,
            valid_data_paths=c.valid_data_paths, valid_data_weights=c.valid_data_weights,
            test_data_paths=c.test_data_paths, test_data_weights=c.test_data_weights,
            split=c.split, seed=c.seed, cache_dir=c.data_cache_path, eod_mask_loss=c.eod_mask_loss,
            weight_by_num_documents=c.weight_by_num_documents, weighted_sampler_alpha=c.weighted_sampler_alpha,
            train_label_data_paths=c.train_label_data_paths, valid_label_data_paths=c.valid_label_data_paths,
            test_label_data_paths=c.test_label_data_paths, pack_impl=c.pack_impl, allow_chopped=c.allow_chopped,
            reset_attention_mask=c.reset_attention_mask, reset_position_ids=c.reset_position_ids,
        )


@dataclass
class DataPlan:
    """Checked data settings: either one prefix cut by `split`, or per-split blends."""

    data_path: str | None
    split: str | None
    blends: list[tuple[list[str], list[float]] | None] = field(default_factory=lambda: [None, None, None])
    labels: list[list[str] | None] = field(default_factory=lambda: [None, None, None])  # per split, per path
    samples: list[int] = field(default_factory=lambda: [0, 0, 0])

    def prefixes(self) -> list[str]:
        if self.data_path is not None:
            return [self.data_path]
        return [prefix for blend in self.blends if blend is not None for prefix in blend[0]]


def validate_data_paths(settings: DataSettings, tokenizer) -> DataPlan:
    """Check every dataset a run will read, before building anything; returns the checked plan.

    Fails with a one-line `UserError` on: neither or both of data_path/train_data_paths, weights
    not matching paths, missing or truncated .bin/.idx, token ids >= the tokenizer's vocab_size, and
    any split that is asked for samples but holds fewer than seq_length + 1 tokens.
    """
    s = settings
    data_path, split, seq_length = s.data_path, s.split, s.seq_length
    samples = [int(s.train_samples), int(s.valid_samples), int(s.test_samples)]
    if seq_length < 1 or any(n < 0 for n in samples):
        raise UserError(f"seq_length {seq_length} must be >= 1 and sample counts {samples} >= 0")
    need = seq_length + 1
    per_split_paths = [list(s.train_data_paths or []), list(s.valid_data_paths or []), list(s.test_data_paths or [])]
    if data_path and per_split_paths[0]:
        raise UserError("set either data-path (cut by split) or train-data-paths, not both")
    if not data_path and not per_split_paths[0]:
        raise UserError("no training data: set data-path or train-data-paths")

    vocab_file = getattr(tokenizer, "vocab_file", "")
    infos = {}

    def inspect(prefix: str):
        if prefix not in infos:
            info = inspect_indexed_dataset(prefix)
            check_token_ids(info, tokenizer.vocab_size, vocab_file)
            infos[prefix] = info
        return infos[prefix]

    if data_path:
        fractions = parse_split(split if split is not None else "969,30,1")
        info = inspect(data_path)
        ranges = split_document_ranges(len(info.sequence_lengths), fractions)
        for name, (begin, end), wanted in zip(SPLIT_NAMES, ranges, samples):
            tokens = int(info.sequence_lengths[begin:end].sum(dtype="int64"))
            if wanted > 0 and tokens < need:
                raise UserError(
                    f"data-path {data_path}: split {split!r} gives the {name} split {end - begin} documents "
                    f"with {tokens} tokens, fewer than one sample of seq_length + 1 = {need}; "
                    f"use more data or give {name} no share"
                )
        return DataPlan(data_path=data_path, split=split or "969,30,1", samples=samples)

    weights_in = [s.train_data_weights, s.valid_data_weights, s.test_data_weights]
    labels_in = [list(s.train_label_data_paths or []), list(s.valid_label_data_paths or []),
                 list(s.test_label_data_paths or [])]
    plan = DataPlan(data_path=None, split=None, samples=samples)
    for i, name in enumerate(SPLIT_NAMES):
        paths = per_split_paths[i]
        weights = check_weights(paths, weights_in[i], f"{name}-data-weights")
        if s.weight_by_num_documents and paths:
            weights = weights_by_num_docs([len(inspect(p).sequence_lengths) for p in paths], s.weighted_sampler_alpha)
        for prefix in paths:
            info = inspect(prefix)
            if samples[i] > 0 and info.num_tokens < need and s.pack_impl == "packed":  # others pad
                raise UserError(
                    f"{name}-data-paths {prefix}: holds {info.num_tokens} tokens, fewer than one sample "
                    f"of seq_length + 1 = {need}"
                )
        labels = labels_in[i]
        if labels and len(labels) != len(paths):
            raise UserError(f"{name}-label-data-paths: {len(labels)} label prefixes for {len(paths)} "
                            f"{name}-data-paths; give one per data prefix, in the same order")
        for prefix, label in zip(paths, labels):
            check_label_files(prefix, label, inspect(prefix).sequence_lengths,
                              inspect_indexed_dataset(label).sequence_lengths)
        if paths and samples[i] > 0:
            plan.blends[i] = (paths, weights)
            plan.labels[i] = labels or None
    return plan


def weights_by_num_docs(num_docs: Sequence[int], alpha: float) -> list[float]:
    """Upstream's blend weights from document counts n_i (weight_by_num_documents): with q_i = n_i / sum(n),
    p_i = q_i^alpha / sum(q^alpha), then w_i = p_i (1 - q_i) / sum(p (1 - q)). One path gets weight 1."""
    if len(num_docs) == 1:
        return [1.0]
    total = sum(num_docs)
    q = [n / total for n in num_docs]
    p = [x ** alpha for x in q]
    p = [x / sum(p) for x in p]
    w = [a * (1 - b) for a, b in zip(p, q)]
    return [x / sum(w) for x in w]


def train_iters_for_epochs(c, tokenizer, world_size: int):
    """`c` with train_iters set from train_epochs, as upstream: epochs x the samples of one pass over the
    training data (seq_length + 1 tokens each, packed) // the global batch. The config returned names
    train_iters only, so the config saved with checkpoints says what ran."""
    import dataclasses

    settings = DataSettings.from_config(dataclasses.replace(c, train_iters=1), world_size)
    plan = validate_data_paths(settings, tokenizer)
    if plan.data_path is not None:
        info = inspect_indexed_dataset(plan.data_path)
        begin, end = split_document_ranges(len(info.sequence_lengths), parse_split(plan.split))[0]
        tokens = [int(info.sequence_lengths[begin:end].sum(dtype="int64"))]
    else:
        tokens = [inspect_indexed_dataset(p).num_tokens for p in plan.blends[0][0]]
    per_epoch = sum((t - 1) // c.seq_length for t in tokens)  # megatron-core's samples in one epoch
    iters = c.train_epochs * per_epoch // c.global_batch_size(world_size)
    if iters < 1:
        raise UserError(f"{c.where('train_epochs')}: train_epochs {c.train_epochs} x {per_epoch} samples per epoch "
                        f"is less than one global batch of {c.global_batch_size(world_size)}; use more data or "
                        "epochs")
    logging.getLogger("neox_fork").info("train_epochs %d: %d samples per epoch, global batch %d -> train_iters %d",
                                        c.train_epochs, per_epoch, c.global_batch_size(world_size), iters)
    return dataclasses.replace(c, train_iters=iters, train_epochs=None)


class _TokenizerForMegatron:
    """The attributes megatron-core's GPTDataset reads from a tokenizer. Deliberately no `pad`:
    without one megatron-core pads (never, for training) with -1 rather than a real id."""

    def __init__(self, tokenizer):
        self.eod = int(tokenizer.eod)
        self.vocab_size = int(tokenizer.vocab_size)
        # Part of the index-cache key: what changes samples, not where the tokenizer file lives.
        self.unique_identifiers = {"class": type(tokenizer).__name__, "eod": self.eod, "vocab_size": self.vocab_size}


def documents_of(tokens: torch.Tensor, eod: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment_ids, position_ids) of packed `tokens` [..., s] cut after each end-of-document token, as
    Megatron-LM's get_ltor_masks_and_position_ids cuts them: the eod token ends its document (it belongs to
    the one before it) and the next position starts a new segment at position 0."""
    is_eod = (tokens == eod).to(torch.int64)
    segments = is_eod.cumsum(-1) - is_eod  # eods strictly before each position
    index = torch.arange(tokens.shape[-1], dtype=torch.int64).expand_as(tokens)
    after_eod = torch.where(is_eod.bool(), index + 1, torch.zeros_like(index)).cummax(-1).values
    start = torch.cat([torch.zeros_like(index[..., :1]), after_eod[..., :-1]], -1)  # of each position's document
    return segments, index - start


class GPTSamples(torch.utils.data.Dataset):
    """A megatron-core GPTDataset or BlendedDataset reduced to tokens/labels/loss_mask/dataset_id, and
    segment_ids / position_ids (`documents_of`) when `reset_attention_mask` / `reset_position_ids`."""

    def __init__(self, megatron_dataset, eod: int | None = None, reset_attention_mask: bool = False,
                 reset_position_ids: bool = False):
        self.megatron_dataset = megatron_dataset
        self.eod, self.reset_attention_mask, self.reset_position_ids = eod, reset_attention_mask, reset_position_ids

    def __len__(self) -> int:
        return len(self.megatron_dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.megatron_dataset[int(index)]
        out = {
            "tokens": item["tokens"].to(torch.int64),
            "labels": item["labels"].to(torch.int64),
            "loss_mask": item["loss_mask"].to(torch.float32),
            "dataset_id": torch.tensor(int(item.get("dataset_id", 0)), dtype=torch.int64),
        }
        if self.reset_attention_mask or self.reset_position_ids:
            segments, positions = documents_of(out["tokens"], self.eod)
            if self.reset_attention_mask:
                out["segment_ids"] = segments
            if self.reset_position_ids:
                out["position_ids"] = positions
        return out


def _default_cache_dir(plan: DataPlan) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(plan.prefixes()[0])), "index_cache")


def _megatron_modules():
    _megatron.indexed_dataset()  # imports megatron.core quietly
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    return BlendedDataset, BlendedMegatronDatasetBuilder, GPTDataset, GPTDatasetConfig


def _builder_class():
    BlendedDataset, BlendedMegatronDatasetBuilder, _, _ = _megatron_modules()

    class Builder(BlendedMegatronDatasetBuilder):
        """megatron-core's builder, except that without a process group the blend index is not
        cached (BlendedDataset calls torch.distributed.get_rank() on a cache miss)."""

        @staticmethod
        def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
            if cls is BlendedDataset and not torch.distributed.is_initialized():
                *rest, config = args
                config = copy.copy(config)
                config.path_to_cache = None
                # It would warn that it cannot save the index: expected here, so not shown.
                blend_logger = logging.getLogger(BlendedDataset.__module__)
                level = blend_logger.level
                blend_logger.setLevel(logging.ERROR)
                try:
                    return BlendedMegatronDatasetBuilder.build_generic_dataset(
                        cls, is_built_on_rank, synchronize_ranks, *rest, config
                    )
                finally:
                    blend_logger.setLevel(level)
            return BlendedMegatronDatasetBuilder.build_generic_dataset(
                cls, is_built_on_rank, synchronize_ranks, *args
            )

    return Builder


def build_datasets(
    settings: DataSettings, tokenizer
) -> tuple[GPTSamples | None, GPTSamples | None, GPTSamples | None]:
    """Train/valid/test `GPTSamples` (None for a split with no data or no samples asked).

    Each has at least the requested number of samples. Call on every rank: rank 0 writes the caches first.
    """
    plan = validate_data_paths(settings, tokenizer)
    if plan.data_path is None and all(blend is None for blend in plan.blends):
        return None, None, None
    if settings.own_samples:
        return _build_own(settings, plan, tokenizer)
    _, _, GPTDataset, GPTDatasetConfig = _megatron_modules()
    cache = settings.cache_dir or _default_cache_dir(plan)
    check_index_cache(cache)  # every rank, before rank 0 may write there: one line for a damaged file
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    common = dict(
        random_seed=int(settings.seed),
        sequence_length=int(settings.seq_length),
        path_to_cache=cache,
        tokenizer=_TokenizerForMegatron(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=bool(settings.eod_mask_loss),
        create_attention_mask=False,
    )
    if plan.data_path is not None:
        config = GPTDatasetConfig(blend=([plan.data_path], None), split=plan.split, **common)
        # A split asked for no samples gets size None (one epoch) rather than 0: megatron-core
        # would loop forever looking for the one extra token of a zero-sample request on an empty range.
        sizes = [n if n > 0 else None for n in plan.samples]
    else:
        config = GPTDatasetConfig(blend_per_split=list(plan.blends), **common)
        sizes = list(plan.samples)
    built = _builder_class()(GPTDataset, sizes, lambda: True, config).build()
    return tuple(
        GPTSamples(dataset, int(tokenizer.eod), settings.reset_attention_mask, settings.reset_position_ids)
        if dataset is not None and wanted > 0 else None
        for dataset, wanted in zip(built, plan.samples)
    )


def _build_own(settings: DataSettings, plan: DataPlan, tokenizer):
    """Train/valid/test `LabeledSamples` (blended where a split has several paths); see data/labeled.py."""
    common = dict(seq_length=int(settings.seq_length), pack_impl=settings.pack_impl,
                  allow_chopped=bool(settings.allow_chopped), eod=int(tokenizer.eod),
                  eod_mask_loss=bool(settings.eod_mask_loss))
    out = []
    for i, name in enumerate(SPLIT_NAMES):
        wanted = plan.samples[i]
        if wanted <= 0:
            out.append(None)
            continue
        seed = int(settings.seed) + i  # each split its own order
        if plan.data_path is not None:
            sizes = inspect_indexed_dataset(plan.data_path).sequence_lengths
            begin, end = split_document_ranges(len(sizes), parse_split(plan.split))[i]
            out.append(LabeledSamples(plan.data_path, None, range(begin, end), wanted, seed=seed, name=name,
                                      **common))
            continue
        if plan.blends[i] is None:
            out.append(None)
            continue
        paths, weights = plan.blends[i]
        labels = plan.labels[i] or [None] * len(paths)

        def make(j, n, paths=paths, labels=labels, seed=seed, name=name):
            sizes = inspect_indexed_dataset(paths[j]).sequence_lengths
            return LabeledSamples(paths[j], labels[j], range(len(sizes)), n, seed=seed + 1000 * j, dataset_id=j,
                                  name=name, **common)

        out.append(make(0, wanted) if len(paths) == 1 else Blend(make, weights, wanted))
    return tuple(out)


class PretrainingBatchSampler:
    """Megatron's pretraining order: global step s covers samples [s*G, (s+1)*G) with
    G = micro_batch_size * data_parallel_size, and rank r takes the r-th micro_batch_size slice.

    Starting at `consumed_samples` (a multiple of G when resuming a run) yields exactly what an
    uninterrupted run would yield from there; a last incomplete global batch is dropped. Samples in
    `skip_sample_ranges` (half-open [start, end) ranges of the global order, multiples of G: see
    `skipped_sample_ranges`) are never yielded, so never read: later steps keep their samples.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        skip_sample_ranges: Sequence[tuple[int, int]] = (),
    ):
        if micro_batch_size < 1 or data_parallel_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"need micro_batch_size >= 1 and 0 <= data_parallel_rank ({data_parallel_rank}) < "
                f"data_parallel_size ({data_parallel_size})"
            )
        if not 0 <= consumed_samples <= total_samples:
            raise UserError(
                f"consumed samples {consumed_samples} lies outside the dataset's {total_samples} samples; "
                "was the checkpoint made with more train-iters or another batch size?"
            )
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_rank = int(data_parallel_rank)
        self.global_batch_size = self.micro_batch_size * int(data_parallel_size)
        self.skip_sample_ranges = sorted((int(a), int(b)) for a, b in skip_sample_ranges)

    def _step_starts(self) -> Iterator[int]:
        """The first global sample of each step this sampler yields."""
        start, skips = self.consumed_samples, iter(self.skip_sample_ranges)
        skip = next(skips, None)
        while start + self.global_batch_size <= self.total_samples:
            while skip is not None and skip[1] <= start:
                skip = next(skips, None)
            if skip is not None and skip[0] <= start:
                start = skip[1]
                continue
            yield start
            start += self.global_batch_size

    def __len__(self) -> int:
        if not self.skip_sample_ranges:
            return (self.total_samples - self.consumed_samples) // self.global_batch_size
        return sum(1 for _ in self._step_starts())

    def __iter__(self) -> Iterator[list[int]]:
        for start in self._step_starts():
            first = start + self.data_parallel_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))


def skipped_sample_ranges(iteration_ranges, global_batch_size: int) -> list[tuple[int, int]]:
    """skip_train_iteration_ranges ([first, last] steps, 1-based, inclusive) as half-open ranges of the global
    sample order: step i trains samples [(i - 1) * global_batch_size, i * global_batch_size)."""
    return [((first - 1) * global_batch_size, last * global_batch_size) for first, last in iteration_ranges or ()]


BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids", "ref", "reward")


def collate_samples(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items into a batch: tokens, labels (int64 [b, seq]) and loss_mask (float32 [b, seq]), and
    position_ids / segment_ids (int64 [b, seq]) where the items have them (data/labeled.py), ref where they
    have it (data/pairwise.py: precomputed reference log-probabilities; pairs are [b, 2, seq]), and KTO's
    reward [b]."""
    return {key: torch.stack([item[key] for item in items]) for key in BATCH_KEYS if key in items[0]}


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """Loader workers ignore SIGTERM/SIGUSR1/SIGINT: Slurm's scancel signals every process of the job,
    and the training process must outlive them long enough to save at the next step boundary. So they never
    outlive it, the kernel kills them when it dies, however it dies; a rank that fails kills them itself
    (errors.end_now), as its normal exit would wait for them forever."""
    from neox_fork.launch.supervisor import die_with_parent

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)


def build_batch_iterator(
    dataset: torch.utils.data.Dataset,
    *,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int = 0,
    skip_sample_ranges: Sequence[tuple[int, int]] = (),
) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches for this data-parallel rank, from `consumed_samples` on, never those in
    `skip_sample_ranges` (see PretrainingBatchSampler).

    Each batch: {"tokens": int64 [b, seq], "labels": int64 [b, seq], "loss_mask": float32 [b, seq]}.
    """
    sampler = PretrainingBatchSampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size, skip_sample_ranges
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_samples,
        persistent_workers=num_workers > 0,
        # its own generator: creating an iterator must not draw from the global RNG, whose state a
        # resumed run restores (dropout would otherwise differ from an uninterrupted run)
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=_leave_signals_to_the_trainer,
    )
    return iter(loader)
