"""Sequence parallelism (megatron-core's) computes what one process computes.

The model-level test runs two gloo processes: each first trains the TP=1 model alone (the reference),
then the two train it together at TP=2 with sequence parallelism, from the same seed, on the same
batches, with torch's AdamW and the same gradient hooks training uses. The training-level tests run
train.py (DeepSpeed ZeRO-1) and resume across the switch.

Tolerances. In fp32 the SP run differs from TP=1 only in summation order (the TP=2 partial matmul sums,
the norm gradients added over two sequence halves): gradients agree to about 1e-6 of their largest
summands, below 1e-8 absolute here. AdamW with its usual eps=1e-8 turns such a difference into up to 2 lr
for an element whose gradient is itself near zero (plain TP=2 moves weights by 4% of lr that way), so
the model-level test uses eps=1e-4: the update lr * m / (sqrt(v) + eps) then moves by at most
lr * |dg| / eps = 1e-4 lr per step, and every weight must agree within 1% of one step's lr (3e-5).
A missing TP sum of the norm gradients or a wrong dropout mask changes gradients by their own size and
moves weights by a large part of lr. Losses agree to 1e-5 relative.
"""

import functools

import pytest
import torch

from conftest import tiny_keys
from distributed import run_distributed

LR = 3e-3
WEIGHT_ATOL = 0.01 * LR
ADAM_EPS = 1e-4
STEPS = 3
B, S = 2, 32


def _train(keys, steps, chunk_tokens=None):
    """Losses of `steps` AdamW steps and each rank's final state, from seed 0 on fixed batches."""
    from neox_fork import checkpoint, parallel
    from neox_fork.config import from_dict
    from neox_fork.model import build_model

    parallel.seed_everything(0)
    model = build_model(from_dict(tiny_keys(num_layers=2, seq_length=S, **keys))).train()
    if chunk_tokens:
        model.shape.loss_chunk_tokens = chunk_tokens
    parallel.sum_sequence_parallel_grads(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.01, eps=ADAM_EPS,
                            foreach=True)
    torch.manual_seed(1)  # the dropout stream, whatever the initialisation drew
    data = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        tokens, labels = (torch.randint(0, 1000, (B, S), generator=data) for _ in range(2))
        loss = model(tokens, labels=labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, checkpoint.model_state(model)


def _sp_worker(rank, cases, sp=True):
    import torch.distributed as dist

    from neox_fork import checkpoint, parallel
    from neox_fork.model import StableLM

    compile_backend = functools.partial(torch.compile, backend="aot_eager")  # Dynamo + AOT autograd, no codegen
    torch.compile = compile_backend
    out = []
    for keys, chunk in cases:
        parallel.initialize(1)
        ref_losses, ref_state = _train(keys, STEPS, chunk)
        parallel.initialize(2)
        losses, state = _train(dict(keys, sequence_parallel=sp), STEPS, chunk)
        shards = [None, None]
        dist.all_gather_object(shards, state)
        merged = checkpoint.merge_tp_shards(shards)
        replicated_differ = [k for k in state if checkpoint.sharding(k) is None
                             and not torch.equal(shards[0][k], shards[1][k])]
        out.append((ref_losses, losses, ref_state, merged, replicated_differ))
    assert StableLM  # imported for the spawn pickler's sake
    return out


CASES = [
    # dropout on, chunked vocab-parallel loss (12 tokens a chunk, uneven), plain layers
    (dict(hidden_dropout=0.1), 12),
    # dropout on, activation checkpointing, compiled layers
    (dict(hidden_dropout=0.1, checkpoint_activations=True, torch_compile=True), None),
    # dropout off, untied vocabulary head replaced by the tied one
    (dict(hidden_dropout=0.0, no_weight_tying=False), None),
]


@pytest.fixture(scope="module")
def sp_runs():
    return run_distributed(_sp_worker, 2, CASES)


@pytest.mark.parametrize("case", range(len(CASES)), ids=["dropout-chunked-loss", "dropout-ckpt-compile",
                                                         "no-dropout-tied"])
def test_tp2_sequence_parallel_trains_like_one_process(sp_runs, case):
    for rank_out in sp_runs:
        ref_losses, losses, ref_state, merged, replicated_differ = rank_out[case]
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert not replicated_differ, f"TP ranks hold different copies of {replicated_differ}"
        assert merged.keys() == ref_state.keys()
        for name in ref_state:
            torch.testing.assert_close(merged[name], ref_state[name], rtol=0, atol=WEIGHT_ATOL, msg=name)
