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


def _train(keys, steps, chunk_tokens=None, dtype=torch.float32):
    """Losses of `steps` AdamW steps, each rank's final state, and what the trained model gives in eval mode
    (the loss of a fixed batch, and cached-decoding logits of 5 tokens), from seed 0 on fixed batches."""
    from neox_fork.checkpoint import store as checkpoint
    from neox_fork.parallel import groups as parallel
    from neox_fork.config.loading import from_dict
    from neox_fork.model.transformer import build_model

    parallel.seed_everything(0)
    model = build_model(from_dict(tiny_keys(num_layers=2, seq_length=S, **keys))).train()
    if chunk_tokens:
        model.shape.loss_chunk_tokens = chunk_tokens
    model.to(dtype)
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
    model.eval()
    with torch.no_grad():
        tokens, labels = (torch.randint(0, 1000, (B, S), generator=data) for _ in range(2))
        evaluation = [model(tokens, labels=labels).item()]
        decoded = model(tokens[:, :5], kv_cache=model.new_kv_cache()).float()
    return losses + evaluation, checkpoint.model_state(model), decoded


def _sp_worker(rank, cases, sp=True):
    import torch.distributed as dist

    from neox_fork.checkpoint import store as checkpoint
    from neox_fork.parallel import groups as parallel
    from neox_fork.model.transformer import NeoXModel

    compile_backend = functools.partial(torch.compile, backend="aot_eager")  # Dynamo + AOT autograd, no codegen
    torch.compile = compile_backend
    out = []
    for keys, chunk, dtype in cases:
        parallel.initialize(1)
        ref_losses, ref_state, ref_decoded = _train(keys, STEPS, chunk, dtype)
        parallel.initialize(2)
        losses, state, decoded = _train(dict(keys, sequence_parallel=sp), STEPS, chunk, dtype)
        shards = [None, None]
        dist.all_gather_object(shards, state)
        merged = checkpoint.merge_tp_shards(shards)
        replicated_differ = [k for k in state if checkpoint.sharding(k) is None
                             and not torch.equal(shards[0][k], shards[1][k])]
        out.append((ref_losses, losses, ref_state, merged, replicated_differ, ref_decoded, decoded))
    assert NeoXModel  # imported for the spawn pickler's sake
    return out


CASES = [
    # dropout on, chunked vocab-parallel loss (12 tokens a chunk, uneven), plain layers
    (dict(hidden_dropout=0.1), 12, torch.float32),
    # dropout on, activation checkpointing, compiled layers
    (dict(hidden_dropout=0.1, checkpoint_activations=True, torch_compile=True), None, torch.float32),
    # bf16 weights and activations, dropout off, tied embeddings
    (dict(hidden_dropout=0.0, no_weight_tying=False), None, torch.bfloat16),
]


def _tolerances(dtype):
    """(loss rtol, weight rtol, weight atol). fp32: see the module docstring. bf16 (8-bit mantissa, each op
    rounds to 2^-9 relative): the loss through two layers agrees to 2^-6; a weight to 2 units in its last
    place plus the update difference, lr * |dg| / eps with |dg| up to 2^-8 of gradients below 1e-2, i.e.
    0.4 lr per step, 1.2 lr in 3 steps. The bf16 case shows SP runs in bf16 and stays within rounding;
    the fp32 cases are the ones sharp enough to catch a wrong gradient or mask."""
    if dtype == torch.bfloat16:
        return 2**-6, 2**-7, 1.2 * LR
    return 1e-5, 0.0, WEIGHT_ATOL


@pytest.fixture(scope="module")
def sp_runs():
    return run_distributed(_sp_worker, 2, CASES)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("case", range(len(CASES)), ids=["dropout-chunked-loss", "dropout-ckpt-compile",
                                                         "bf16-tied"])
def test_tp2_sequence_parallel_trains_like_one_process_and_evaluates_without_it(sp_runs, case):
    """Training losses, every weight, then (eval mode, no SP) the loss of a new batch and cached decoding."""
    loss_rtol, rtol, atol = _tolerances(CASES[case][2])
    for rank_out in sp_runs:
        ref_losses, losses, ref_state, merged, replicated_differ, ref_decoded, decoded = rank_out[case]
        assert losses == pytest.approx(ref_losses, rel=loss_rtol)
        assert not replicated_differ, f"TP ranks hold different copies of {replicated_differ}"
        assert merged.keys() == ref_state.keys()
        for name in ref_state:
            torch.testing.assert_close(merged[name], ref_state[name], rtol=rtol, atol=atol, msg=name)
        if CASES[case][2] == torch.float32:  # a logit sums h=64 unit-scale inputs x weights within 3e-5
            torch.testing.assert_close(decoded, ref_decoded, rtol=0, atol=64 * WEIGHT_ATOL)


def test_activation_memory_estimate_by_hand():
    """Korthikanti et al.: sbh(10 + 24/T) per layer with TP alone, 34 sbh / T with SP; checkpointed:
    2 sbh (or 2 sbh / T) per stored layer input plus one layer. StableLM-3B, seq 4096, micro-batch 4, T=2."""
    from neox_fork.perf.flops import activation_memory_bytes

    sbh = 4096 * 4 * 2560
    sizes = dict(num_layers=32, hidden_size=2560, seq_length=4096, micro_batch=4, tp=2)
    assert activation_memory_bytes(**sizes, sequence_parallel=False, checkpoint_activations=False) == 32 * 22 * sbh
    assert activation_memory_bytes(**sizes, sequence_parallel=True, checkpoint_activations=False) == 32 * 17 * sbh
    assert activation_memory_bytes(**sizes, sequence_parallel=False, checkpoint_activations=True) == 86 * sbh
    assert activation_memory_bytes(**sizes, sequence_parallel=True, checkpoint_activations=True) == 49 * sbh


def test_sequence_length_the_tp_size_does_not_divide_is_a_clear_error():
    from neox_fork.config.loading import from_dict
    from neox_fork.errors import UserError

    with pytest.raises(UserError, match="sequence_parallel splits the sequence over model_parallel_size 2, which "
                                        "does not divide seq_length 33"):
        from_dict(tiny_keys(seq_length=33, model_parallel_size=2, sequence_parallel=True))
