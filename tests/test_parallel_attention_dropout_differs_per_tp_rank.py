"""Attention dropout at TP=2 draws each rank's masks from that rank's own stream, as Megatron does.

Each TP rank holds different heads, so its attention-probability masks must come from the model-parallel
stream (seeded seed + 2718 + TP rank, Megatron's model-parallel seed), not from the default generator every
TP rank shares. One launch of two gloo processes checks, at TP=2:

* masks: the two ranks' attention cores, given the same inputs, differ in training (the same in eval), and
  each rank's output is what torch draws from a generator seeded seed + 2718 + its rank;
* recompute: full and selective activation recompute give the gradients of no recompute, with and without
  sequence parallelism (the backward replays the forked stream). Both run the same operations in the same
  order on the same inputs, so 1e-6 (a few fp32 ulps of values of order 1) bounds any difference;
* resume: a run restored from the RNG file training writes (training_state.save_rng) and the weights and
  optimizer of step 2 takes steps 3-4 bit for bit as the uninterrupted run.

Hidden dropout keeps its own tests (test_sequence_parallel.py: the same masks at any TP size).
"""

import copy

import pytest
import torch

from conftest import tiny_keys
from distributed import run_distributed

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

SEED, B, S, P = 1234, 2, 16, 0.1
KEYS = dict(num_layers=2, seq_length=S, model_parallel_size=2, attention_dropout=P, hidden_dropout=P, seed=SEED)


def _model(**keys):
    from neox_fork.parallel import groups as parallel
    from neox_fork.config.loading import from_dict
    from neox_fork.model.transformer import build_model

    parallel.seed_everything(SEED)
    return build_model(from_dict(tiny_keys(**dict(KEYS, **keys)))).train()


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, 1000, (B, S), generator=g) for _ in range(2))


def _core_outputs(rank):
    """Layer 0's attention core on inputs both ranks share: in training, in eval, and as torch draws it from
    a generator seeded seed + 2718 + rank (the core's random numbers from that stream, by hand)."""
    from neox_fork.parallel import groups as parallel

    model = _model(hidden_dropout=0.0)
    attn = model.layers[0].attention
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(B, S, attn.kv_per_rank, attn.group + 2, attn.shape.head_dim, generator=g)
    cos, sin = model.rotary(torch.arange(S).unsqueeze(0))
    with torch.no_grad():
        train = attn.core(qkv, model.rotary, cos, sin)
        tracker = parallel.RNG_TRACKER.states
        parallel.RNG_TRACKER.states = {}  # no stream to fork: the core draws from the default generator
        with parallel.preserved_rng():
            torch.manual_seed(SEED + 2718 + rank)
            by_hand = attn.core(qkv, model.rotary, cos, sin)
        parallel.RNG_TRACKER.states = tracker
        evaluated = attn.eval().core(qkv, model.rotary, cos, sin)
    return train, evaluated, by_hand


def _grads(**keys):
    model = _model(**keys)
    tokens, labels = _batch(1)
    loss = model(tokens, labels=labels)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _steps(model, opt, first, last):
    losses = []
    for step in range(first, last + 1):
        tokens, labels = _batch(100 + step)
        loss = model(tokens, labels=labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _resume(rank, folder):
    """Losses of steps 3-4 uninterrupted, and after restoring step 2's weights, optimizer and RNG file."""
    from neox_fork.parallel import groups as parallel
    from neox_fork.training import state as training_state

    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _steps(model, opt, 1, 2)
    rng_file = f"{folder}/rng_{rank}.pt"
    training_state.save_rng(rng_file)
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    straight = _steps(model, opt, 3, 4)
    parallel.seed_everything(SEED + 1)  # the streams move on elsewhere before the resume
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    training_state.restore_rng(rng_file, trust=False)
    return straight, _steps(model, opt, 3, 4)


def _worker(rank, folder):
    from neox_fork.parallel import groups as parallel

    parallel.initialize(2)
    cores = _core_outputs(rank)
    grads = {(sp, recompute): _grads(sequence_parallel=sp, **recompute_keys)
             for sp in (False, True)
             for recompute, recompute_keys in (("none", {}), ("full", dict(checkpoint_activations=True)),
                                               ("selective", dict(checkpoint_activations=True,
                                                                  recompute_granularity="selective")))}
    return cores, grads, _resume(rank, folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(_worker, 2, str(tmp_path_factory.mktemp("rngdrop")))


def test_tp_ranks_draw_different_attention_masks_from_their_own_stream(runs):
    (train0, eval0, by_hand0), (train1, eval1, by_hand1) = (r[0] for r in runs)
    torch.testing.assert_close(eval0, eval1, rtol=0, atol=0)  # same inputs, same computation
    assert not torch.equal(train0, eval0)  # dropout is on
    assert (train0 - train1).abs().max() > 0.01, "both TP ranks dropped the same attention probabilities"
    torch.testing.assert_close(train0, by_hand0, rtol=0, atol=0)
    torch.testing.assert_close(train1, by_hand1, rtol=0, atol=0)


@pytest.mark.parametrize("recompute", ["full", "selective"])
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_recompute_replays_the_attention_masks(runs, sp, recompute):
    for rank, (_, grads, _) in enumerate(runs):
        (loss, expected), (loss_rc, got) = grads[sp, "none"], grads[sp, recompute]
        assert loss_rc == pytest.approx(loss, rel=1e-6, abs=1e-6)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-6, msg=f"rank {rank} {name}")


def test_resume_from_the_saved_rng_streams_is_exact(runs):
    for rank, (_, _, (straight, resumed)) in enumerate(runs):
        assert resumed == straight, f"rank {rank}"
