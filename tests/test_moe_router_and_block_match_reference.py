"""The MoE block (megatron-core's MoELayer as model/moe.py builds it) equals a written-out reference in the forward
and the backward: softmax top-k with and without renormalisation, the Switch load-balancing loss added with its
coefficient, and Sinkhorn as upstream gpt-neox trains it (three iterations pick the experts; sigmoid / softmax of
the logits weight them) and evaluates it (plain top-k).

The reference runs in float64 from the block's own fp32 weights, token by token. The block runs in fp32 and
megatron-core takes the softmax in fp32: every value is a few fp32 roundings (2^-24 relative each) from the
reference, so 1e-5 absolute on outputs and gradients of size about 1 is a bound, not a fit.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_keys
from neox_fork.config.loading import from_dict
from neox_fork.model import moe
from neox_fork.model.transformer import build_model

TOL = dict(rtol=1e-5, atol=1e-5)
E = 4


def reference_sinkhorn(logits: torch.Tensor, iterations: int = 3, tol: float = 1e-4) -> torch.Tensor:
    """Upstream's balancing as matrix scaling: P = exp(L); columns scaled to 1 / E of the mass, rows to 1 / T,
    alternately, from c = 1 / (E colsum P), at most `iterations` times or until c moves by less than tol."""
    p = logits.exp()
    t, e = p.shape
    rows, cols = torch.ones(t, dtype=p.dtype), 1 / (e * p.sum(0))
    for _ in range(iterations):
        rows = 1 / (t * ((p @ cols) + 1e-8))
        new_cols = 1 / (e * ((p.T @ rows) + 1e-8))
        moved, cols = (new_cols - cols).abs().mean(), new_cols
        if moved < tol:
            break
    return p * rows[:, None] * cols[None, :]


def reference_block(x, router_w, experts, k, router, normalize, training, gated, act):
    """[T, h] -> [T, h]: each token's k experts by the router, their outputs weighted and summed."""
    logits = x @ router_w.T
    if router == "topk":
        weights, chosen = logits.softmax(-1).topk(k, dim=-1)
        if normalize:
            weights = weights / weights.sum(-1, keepdim=True)
    else:
        scores = logits.sigmoid() if k == 1 else logits.softmax(-1)
        if training:
            chosen = reference_sinkhorn(logits.detach()).topk(k, dim=-1).indices
            weights = scores.gather(1, chosen)
        else:
            weights, chosen = scores.topk(k, dim=-1)
    out = []
    for t in range(x.shape[0]):
        y = 0
        for j in range(k):
            fc1, fc2 = experts[chosen[t, j]]
            h = fc1 @ x[t]
            if gated:  # megatron-core's GLU: act(first half) x second half
                gate, up = h.chunk(2)
                h = act(gate) * up
            else:
                h = act(h)
            y = y + weights[t, j] * (fc2 @ h)
        out.append(y)
    counts = torch.zeros(logits.shape[1], dtype=x.dtype).scatter_add_(
        0, logits.softmax(-1).topk(k, dim=-1).indices.flatten(), torch.ones(x.shape[0] * k, dtype=x.dtype))
    # Switch: E x sum_i (share of the k x T choices going to i) x (mean softmax weight of i)
    lbl = logits.shape[1] * (counts / (k * x.shape[0]) * logits.softmax(-1).mean(0)).sum()
    return torch.stack(out), lbl


def block_and_weights(k, router, normalize=False, coeff=0.0, activation="silu", mlp_type="gated", jitter=None,
                      grouped=None):
    c = from_dict(tiny_keys(moe_num_experts=E, moe_top_k=k, moe_router_type=router, moe_jitter_eps=jitter,
                            moe_normalize_expert_weights=normalize, moe_aux_loss_coeff=coeff,
                            activation=activation, mlp_type=mlp_type, num_layers=1, moe_grouped_gemm=grouped))
    torch.manual_seed(3)
    block = build_model(c).layers[0].mlp
    assert isinstance(block, moe.MoEMLP)
    return block, c.mlp_gated


def run_both(block, gated, k, router, normalize, training, coeff=0.0, act=F.silu, router_scale=1.0):
    """`router_scale` multiplies the router weight: skewed logits, where too few Sinkhorn iterations matter."""
    block.train(training)
    with torch.no_grad():
        block.moe.router.weight.mul_(router_scale)
    moe.set_aux_loss_scale(1.0)
    torch.manual_seed(5)
    x = torch.randn(2, 8, 64, requires_grad=True)
    g = torch.randn(2, 8, 64)
    out = block(x)
    (out * g).sum().backward()
    params = {n: p for n, p in block.named_parameters()}
    router_w = params["moe.router.weight"].detach().double().requires_grad_()
    experts = [(params[f"moe.experts.local_experts.{e}.linear_fc1.weight"].detach().double().requires_grad_(),
                params[f"moe.experts.local_experts.{e}.linear_fc2.weight"].detach().double().requires_grad_())
               for e in range(E)]
    xr = x.detach().double().reshape(-1, 64).requires_grad_()
    ref, lbl = reference_block(xr, router_w, experts, k, router, normalize, training, gated, act)
    ((ref * g.double().reshape(-1, 64)).sum() + coeff * lbl).backward()
    torch.testing.assert_close(out.double().reshape(-1, 64), ref.detach(), **TOL)
    torch.testing.assert_close(x.grad.double().reshape(-1, 64), xr.grad, **TOL)
    torch.testing.assert_close(params["moe.router.weight"].grad.double(), router_w.grad, **TOL)
    for e, (fc1, fc2) in enumerate(experts):
        torch.testing.assert_close(params[f"moe.experts.local_experts.{e}.linear_fc1.weight"].grad.double(),
                                   fc1.grad, **TOL)
        torch.testing.assert_close(params[f"moe.experts.local_experts.{e}.linear_fc2.weight"].grad.double(),
                                   fc2.grad, **TOL)
    return block, lbl


@pytest.mark.parametrize("k, normalize", [(1, False), (2, False), (2, True)])
def test_topk_router_and_block_match_reference(one_process, k, normalize):
    block, gated = block_and_weights(k, "topk", normalize)
    run_both(block, gated, k, "topk", normalize, training=True)


def test_load_balancing_loss_adds_its_coefficient_times_the_switch_loss(one_process):
    block, gated = block_and_weights(2, "topk", coeff=0.5)
    block, lbl = run_both(block, gated, 2, "topk", False, training=True, coeff=0.5)
    torch.testing.assert_close(block.load_balancing_loss.double(), lbl.detach(), **TOL)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_sinkhorn_router_and_block_match_upstream(one_process, k, training):
    block, gated = block_and_weights(k, "sinkhorn")
    run_both(block, gated, k, "sinkhorn", False, training, router_scale=30.0)


def test_ungated_gelu_experts_as_upstream_125m_dmoe(one_process):
    block, gated = block_and_weights(1, "sinkhorn", activation="gelu", mlp_type="regular")
    assert not gated
    run_both(block, gated, 1, "sinkhorn", False, True, act=F.gelu)


@pytest.mark.parametrize("activation, mlp_type, k", [("silu", "gated", 2), ("gelu", "regular", 1)])
def test_grouped_gemm_experts_match_reference(one_process, monkeypatch, activation, mlp_type, k):
    """moe_grouped_gemm: true runs the experts as two torch grouped GEMMs (moe.grouped_forward; on the CPU torch's
    loop of GEMMs) with the same block, router and reference as above. Broken on purpose: padded rows read back
    one row off, or the routing weight applied before the activation, each fails the output comparison."""
    calls, real = [], moe.grouped_forward
    monkeypatch.setattr(moe, "grouped_forward", lambda *a: calls.append(1) or real(*a))
    block, gated = block_and_weights(k, "topk", k > 1, activation=activation, mlp_type=mlp_type, grouped=True)
    run_both(block, gated, k, "topk", k > 1, training=True, act=getattr(F, activation))
    assert calls, "the grouped path did not run"


def test_grouped_gemm_equals_sequential_experts_with_empty_and_ragged_groups(one_process):
    """The experts module alone, on sorted tokens 5, 0, 11 and 3 per expert (an empty group; none a multiple of
    the 8-row padding): grouped GEMMs against megatron-core's SequentialMLP (one GEMM pair per expert), outputs
    and every gradient within fp32 rounding (1e-5 on values about 1); expert 1, which no token reaches, gets
    zero gradients both ways."""
    block, _ = block_and_weights(2, "topk", True, grouped=True)
    experts = block.moe.experts
    torch.manual_seed(7)
    counts = torch.tensor([5, 0, 11, 3])
    x, probs, g = torch.randn(19, 64), torch.rand(19), torch.randn(19, 64)
    results = []
    for grouped in (True, False):
        experts.grouped = grouped
        experts.zero_grad()
        xi, pi = x.clone().requires_grad_(), probs.clone().requires_grad_()
        out, bias = experts(xi, counts, pi)
        assert bias is None
        (out * g).sum().backward()
        results.append([out, xi.grad, pi.grad, *(p.grad.clone() for p in experts.parameters())])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **TOL)
    assert experts.local_experts[1].linear_fc1.weight.grad.abs().max() == 0


def test_grouped_gemm_in_bf16_equals_sequential_experts_to_bf16_rounding(one_process):
    """The same bf16 block with and without grouped GEMMs: both round each product to bf16 (8 bits), so outputs
    of size about 1 agree within a few bf16 ulps (2^-7 relative each): 3e-2 absolute allows four of them."""
    block, _ = block_and_weights(2, "topk", True, grouped=True)
    block = block.to(torch.bfloat16)
    torch.manual_seed(5)
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    grouped = block(x)
    block.moe.experts.grouped = False
    torch.testing.assert_close(grouped, block(x), rtol=0, atol=3e-2)
    expert = block.moe.experts.local_experts[0]
    assert not moe.grouped_kernel(expert.linear_fc1.weight, expert.linear_fc2.weight)  # CPU: no kernel


def test_upstream_sinkhorn_is_three_iterations_not_megatron_cores_converged_one():
    """What makes the router subclass necessary: on skewed logits the two normalisations differ."""
    from megatron.core.transformer.moe.moe_utils import sinkhorn as converged

    torch.manual_seed(0)
    logits = torch.randn(64, E, dtype=torch.float64) * 4
    torch.testing.assert_close(moe.upstream_sinkhorn(logits), reference_sinkhorn(logits), rtol=1e-12, atol=1e-15)
    assert not torch.allclose(moe.upstream_sinkhorn(logits), converged(logits), rtol=1e-3)


def test_jitter_only_in_training_as_upstream(one_process):
    """Evaluation equals the reference without noise; training draws the noise (so differs from it)."""
    block, gated = block_and_weights(2, "topk", jitter=0.5)
    run_both(block, gated, 2, "topk", False, training=False)
    with pytest.raises(AssertionError):
        run_both(block, gated, 2, "topk", False, training=True)


@pytest.mark.parametrize("fp32", [False, True])
def test_moe_lbl_in_fp32_computes_the_router_logits_in_fp32(one_process, fp32):
    c = from_dict(tiny_keys(moe_num_experts=E, moe_top_k=2, moe_router_type="topk", moe_lbl_in_fp32=fp32))
    block = build_model(c).layers[0].mlp.to(torch.bfloat16)
    logits = block.moe.router.gating(torch.randn(2, 8, 64, dtype=torch.bfloat16))
    assert logits.dtype == (torch.float32 if fp32 else torch.bfloat16)
