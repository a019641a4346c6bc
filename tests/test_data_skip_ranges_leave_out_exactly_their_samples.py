"""The batch order with skip_train_iteration_ranges: every data-parallel rank gets Megatron's order (step s takes
samples [s x B, (s + 1) x B) of the global order, rank r its r-th slice) with exactly the skipped steps' samples
left out and nothing else moved, from the start or from any resume point (inside a range too); bad ranges in a
config are one line. The expected order is written out by hand from that rule, not from the sampler."""

import pytest
import torch

from neox_fork.config.loading import from_dict
from neox_fork.data.datasets import build_batch_iterator, skipped_sample_ranges
from neox_fork.errors import UserError


class Indices(torch.utils.data.Dataset):
    """Sample i is {"tokens": [i]}: a batch shows which samples it holds."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return {"tokens": torch.tensor([i]), "labels": torch.tensor([i]), "loss_mask": torch.tensor([1.0])}


def read(consumed, skip, micro, rank, dp, workers=0):
    it = build_batch_iterator(Indices(), consumed_samples=consumed, micro_batch_size=micro, data_parallel_rank=rank,
                              data_parallel_size=dp, num_workers=workers, skip_sample_ranges=skip)
    return [batch["tokens"].flatten().tolist() for batch in it]


# global batch 8 = micro-batch 2 x 2 data-parallel ranks x 2 accumulation steps; 8 steps of 64 samples
SKIP = skipped_sample_ranges([[2, 3], [6, 6]], 8)  # steps 2-3 (samples 8-23) and step 6 (samples 40-47)


def test_skip_ranges_are_sample_ranges_of_the_global_order():
    assert SKIP == [(8, 24), (40, 48)]


@pytest.mark.parametrize("workers", [0, 2])
def test_each_rank_reads_megatron_order_without_the_skipped_steps(workers):
    trained_steps = [1, 4, 5, 7, 8]
    for rank in (0, 1):
        expected = []
        for step in trained_steps:
            first = (step - 1) * 8
            for micro_step in range(2):  # accumulation: each micro-step covers micro x dp = 4 samples
                start = first + micro_step * 4 + rank * 2
                expected.append([start, start + 1])
        assert read(0, SKIP, 2, rank, 2, workers) == expected
    both = {i for rank in (0, 1) for batch in read(0, SKIP, 2, rank, 2) for i in batch}
    assert both == set(range(64)) - set(range(8, 24)) - set(range(40, 48))


@pytest.mark.parametrize("consumed", [8, 16, 24, 32])  # after step 1, inside the range (2, 3), at its end, later
def test_a_resume_reads_the_rest_of_the_uninterrupted_order(consumed):
    for rank in (0, 1):
        whole = read(0, SKIP, 2, rank, 2)
        rest = read(consumed, SKIP, 2, rank, 2)
        assert rest == [b for b in whole if b[0] >= consumed]


def test_without_ranges_the_order_is_unchanged():
    assert read(0, (), 2, 0, 2) == [[i, i + 1] for i in range(0, 64, 4)]
    assert len(read(0, SKIP, 4, 0, 1)) == (64 - 24) // 4


@pytest.mark.parametrize("ranges", [[[4, 3]], [3, 4], [[0, 2]], [[1, 2, 3]], [[1.5, 2]], [[True, 2]]])
def test_a_bad_range_is_one_line_naming_the_key(ranges):
    with pytest.raises(UserError) as err:
        from_dict({"skip_train_iteration_ranges": ranges})
    assert str(err.value).startswith("config: skip_train_iteration_ranges entry ") and "\n" not in str(err.value)


@pytest.mark.parametrize("keys, key", [({"loss_spike_factor": 1.0}, "loss_spike_factor"),
                                       ({"loss_spike_window": 0}, "loss_spike_window"),
                                       ({"max_nan_steps": 0}, "max_nan_steps")])
def test_bad_fault_keys_are_one_line(keys, key):
    with pytest.raises(UserError) as err:
        from_dict(keys)
    assert str(err.value).startswith(f"config: {key} must be")
