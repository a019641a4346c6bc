"""GPU tier (`pytest -m gpu`, run by scripts/gpu_check.sh): every CUDA kernel path against its reference,
bf16 and fp32, forward and backward: SDPA's flash, cuDNN and memory-efficient backends (and the order the
model uses), flash-attn's attention and rotary when installed, the compiled SwiGLU, the fused head + loss,
fused AdamW, and a 4-layer model's loss and gradients eager vs compiled vs checkpointed.

Tolerances come from rounding. eps = torch.finfo(dtype).eps (bf16 2^-7, fp32 2^-24 ... 2^-23): an output
that a kernel rounds once to its dtype is within eps/2 of the exact value, so two kernels that both
accumulate in fp32 agree to about eps relative, plus the fp32 accumulation-order term K * eps_fp32 for a
sum of K products. Each extra rounding on the path (attention rounds P to bf16 before P V, the backward
rounds dP and dS) adds one eps; the bounds below count them. Comparisons are relative to the reference's
largest magnitude (elementwise for outputs, whole-tensor norms for gradients summed over many rows).
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_keys

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="GPU tier: needs a CUDA device (run scripts/gpu_check.sh on a GPU machine)"),
]

DTYPES = [torch.bfloat16, torch.float32]
EPS32 = torch.finfo(torch.float32).eps


def bound(dtype: torch.dtype, roundings: int, terms: int = 1) -> float:
    """Relative bound: `roundings` roundings to `dtype` plus fp32 accumulation over `terms` products."""
    return roundings * torch.finfo(dtype).eps + terms * EPS32


def assert_close_rel(actual, expected, tol, what=""):
    """max |actual - expected| <= tol * max |expected| (both upcast to fp32)."""
    a, e = actual.float(), expected.float()
    err, scale = (a - e).abs().max().item(), max(e.abs().max().item(), 1e-30)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.3g} x {scale:.3g}"


def assert_norm_close(actual, expected, tol, what=""):
    """||actual - expected|| <= tol * ||expected||: gradients summed over many rows."""
    a, e = actual.float(), expected.float()
    err, scale = (a - e).norm().item(), max(e.norm().item(), 1e-30)
    assert err <= tol * scale, f"{what}: relative error {err / scale:.3g} > {tol:.3g}"


def _leaf(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda").to(dtype).requires_grad_()


def _fwd_bwd(fn, inputs, upstream_seed=1):
    """Output and input gradients of fn on fresh copies of `inputs` for a fixed random upstream gradient."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    g = torch.Generator(device="cuda").manual_seed(upstream_seed)
    out.backward(torch.randn(out.shape, generator=g, device="cuda").to(out.dtype))
    return out.detach(), [x.grad for x in xs]


# ---------------------------------------------------------------------- attention
B, S, HEADS, HEAD_DIM = 2, 512, 4, 80  # StableLM-3B's head size


def _qkv(dtype):
    return [_leaf((B, S, HEADS, HEAD_DIM), dtype, seed) for seed in (10, 11, 12)]


def _check_attention(fn, dtype):
    from neox_fork.model.attention import reference

    q, k, v = _qkv(dtype)
    out, grads = _fwd_bwd(fn, [q, k, v])
    ref_out, ref_grads = _fwd_bwd(lambda q, k, v: reference(q.float(), k.float(), v.float(), causal=True),
                                  [q, k, v])
    # forward: P rounded before P V, the output rounded: 2 roundings; fp32 sums over S keys and HEAD_DIM
    assert_close_rel(out, ref_out, bound(dtype, 2, S + HEAD_DIM), "output")
    for name, g, r in zip("qkv", grads, ref_grads):  # backward: dP, dS and the result rounded, over S terms
        assert_norm_close(g, r, bound(dtype, 4, S), f"d{name}")


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", sorted(SDPA_BACKENDS))
def test_sdpa_backend_matches_reference(backend, dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend in ("flash", "cudnn") and dtype == torch.float32:
        pytest.skip(f"SDPA's {backend} backend takes only fp16/bf16")
    if backend == "cudnn" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("cuDNN attention needs compute capability 8.0+")

    def run(q, k, v):
        with sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[backend])):  # this backend or an error, no fallback
            return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                  is_causal=True).transpose(1, 2)

    _check_attention(run, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_attention_dispatch_matches_reference(dtype):
    """What the model calls: `flash` (flash-attn if installed, else SDPA with cuDNN first on Hopper)."""
    from neox_fork.model.attention import attention

    _check_attention(functools.partial(attention, backend="flash", causal=True), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_attention_with_a_sliding_window_matches_reference(dtype):
    """sliding_window_width on CUDA: flash-attn's window_size=(W, 0) when installed (bf16), else SDPA with the
    banded mask, against the fp32 reference with the same band (a query sees itself and W keys before it)."""
    from neox_fork.model.attention import attention, band, reference

    window = 100  # < S, so the band hides keys
    q, k, v = _qkv(dtype)
    out, grads = _fwd_bwd(functools.partial(attention, backend="flash", causal=True, window=window), [q, k, v])
    mask = band(S, S, window, "cuda")
    ref_out, ref_grads = _fwd_bwd(lambda q, k, v: reference(q.float(), k.float(), v.float(), causal=True,
                                                            mask=mask), [q, k, v])
    assert_close_rel(out, ref_out, bound(dtype, 2, window + HEAD_DIM), "output")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_norm_close(g, r, bound(dtype, 4, window), f"d{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_flash_attn_package_matches_reference(dtype):
    flash_attn = pytest.importorskip("flash_attn", reason="flash-attn is not installed (optional GPU extra)")
    _check_attention(functools.partial(flash_attn.flash_attn_func, causal=True), dtype)


# YaRN past its original length: the tables carry its attention factor (1.14 here), so cos/sin exceed 1
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": S // 4}


@pytest.mark.parametrize("scaling", [None, YARN], ids=["plain", "yarn"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_rotary_kernel_matches_reference(dtype, scaling):
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (optional GPU extra)")
    from neox_fork.model import fused
    from neox_fork.model.transformer import Rotary

    assert fused.flash_rotary is not None
    qkv = _leaf((B, S, HEADS, 3, HEAD_DIM), dtype, 3)
    cos, sin = Rotary(20, 10000.0, scaling, S)(torch.arange(S, device="cuda").unsqueeze(0))
    assert fused.flash_rotary_usable(qkv, cos)

    def stacked(fn):
        return lambda x: torch.stack(fn(x), dim=3)

    out, (grad,) = _fwd_bwd(stacked(lambda x: fused.rotary_qkv(x, cos, sin, 20)), [qkv])
    ref, (ref_grad,) = _fwd_bwd(stacked(lambda x: fused._rotary_qkv_torch(x, cos, sin, 20)), [qkv])
    # the kernel takes tables in the input's dtype (one more rounding in bf16) and rounds its result
    assert_close_rel(out, ref, bound(dtype, 3), "rotary")
    assert_close_rel(grad, ref_grad, bound(dtype, 3), "rotary grad")


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_length_dependent_rope_tables_on_cuda_equal_the_cpu_ones(kind):
    """dynamic recomputes its frequencies on the positions' device, longrope switches tables there: the CUDA
    tables equal the CPU ones to fp32 rounding of the angle (position x frequency, below S): a frequency a few
    ulps apart (pow on another device) and the product's rounding, each up to S x eps32, and cos/sin's own."""
    from neox_fork.model.transformer import Rotary

    fields = {"dynamic": {"factor": 4.0}, "longrope": {"short_factor": [1.0] * 10, "long_factor": [4.0] * 10}}[kind]
    scaling = {"rope_type": kind, "original_max_position_embeddings": S // 4, **fields}
    positions = torch.arange(S).unsqueeze(0)
    rotary = Rotary(20, 10000.0, scaling, S)
    for length in (S // 8, S):  # before and past the original length
        cpu = rotary(positions[:, :length])
        cuda = rotary(positions[:, :length].cuda())
        for ours, ref in zip(cuda, cpu):
            torch.testing.assert_close(ours.cpu(), ref, rtol=0, atol=8 * S * EPS32)


# ---------------------------------------------------------------------- SwiGLU, head + loss, AdamW
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_swiglu_matches_reference(dtype):
    from neox_fork.model import fused

    up, gate = _leaf((4, 256, 6912), dtype, 0), _leaf((4, 256, 6912), dtype, 1)
    out, grads = _fwd_bwd(lambda u, g: fused.swiglu(u, g, compiled=True), [up, gate])
    assert not fused._compile_failed, "Inductor could not compile SwiGLU on this GPU"
    ref, ref_grads = _fwd_bwd(lambda u, g: (u.float() * g.float() * torch.sigmoid(g.float())), [up, gate])
    # eager rounds silu(gate) before the product, Inductor keeps it in fp32: up to 2 roundings each way
    assert_close_rel(out, ref, bound(dtype, 2), "swiglu")
    for g, r in zip(grads, ref_grads):
        assert_close_rel(g, r, bound(dtype, 3), "swiglu grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_head_and_loss_matches_full_logits(dtype):
    """fused.linear_cross_entropy (TP=1 training's loss) against F.cross_entropy on all fp32 logits."""
    from neox_fork.model import fused

    n, h, vocab = 8192, 256, 50304
    hidden, weight = _leaf((n, h), dtype, 0), _leaf((vocab, h), dtype, 1)
    with torch.no_grad():
        weight.mul_(0.05)
    g = torch.Generator(device="cuda").manual_seed(2)
    labels = torch.randint(0, vocab, (n,), generator=g, device="cuda")
    mask = (torch.rand(n, generator=g, device="cuda") > 0.2).float()

    def ours(x, w):
        return fused.linear_cross_entropy(x, w, labels, mask, chunk=4096)

    def full(x, w):
        losses = F.cross_entropy((x @ w.t()).float(), labels, reduction="none")
        return (losses * mask).sum() / mask.sum()

    loss, grads = _fwd_bwd(ours, [hidden, weight])
    ref, ref_grads = _fwd_bwd(full, [hidden, weight])
    # both round the bf16 logits once and reduce in fp32 over the vocabulary; the loss is a mean of n
    assert_close_rel(loss, ref, bound(dtype, 1, vocab), "loss")
    for name, gr, r in zip(("hidden", "weight"), grads, ref_grads):  # the gradient is rounded once more
        assert_norm_close(gr, r, bound(dtype, 2, n), f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_adamw_matches_per_tensor_loop(dtype):
    """build_optimizer (what training steps) on CUDA: torch's fused AdamW with the config's lr, betas, eps and
    decay on matrices only, against the per-tensor loop with those settings written out here."""
    from neox_fork.config.loading import from_dict
    from neox_fork.training.optim import build_optimizer

    config = from_dict(tiny_keys(optimizer={"type": "Adam", "params": {"lr": 1e-2, "betas": [0.9, 0.95],
                                                                       "eps": 1e-6}}, weight_decay=0.1))

    def model():
        module = torch.nn.Module()
        module.weight = torch.nn.Parameter(_leaf((257, 129), dtype, 0).detach())
        module.bias = torch.nn.Parameter(_leaf((129,), dtype, 1).detach())
        return module

    def run(module, opt):
        g = torch.Generator(device="cuda").manual_seed(5)
        for _ in range(3):
            for p in module.parameters():
                p.grad = torch.randn(p.shape, generator=g, device="cuda").to(dtype)
            opt.step()
        return list(module.parameters())

    ours = model()
    opt = build_optimizer(config, ours)
    assert opt.defaults["fused"] is True  # the CUDA kernel training gets
    ref = model()
    groups = [{"params": [ref.weight], "weight_decay": 0.1}, {"params": [ref.bias], "weight_decay": 0.0}]
    loop = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-6, foreach=False)
    # each step's update (<= lr) computed in fp32 in both; the parameter rounds to its dtype once a step
    for a, b in zip(run(ours, opt), run(ref, loop)):
        assert_close_rel(a.detach(), b.detach(), bound(dtype, 3, 8), "AdamW")


# ---------------------------------------------------------------------- a 4-layer model
def _model_loss_and_grads(dtype, **keys):
    from neox_fork.config.loading import from_dict
    from neox_fork.model.transformer import build_model

    torch.manual_seed(0)
    model = build_model(from_dict(tiny_keys(num_layers=4, hidden_size=256, num_attention_heads=4,
                                            seq_length=256, **keys))).cuda().to(dtype).train()
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens, labels = (torch.randint(0, 1000, (4, 256), generator=g, device="cuda") for _ in range(2))
    loss = model(tokens, labels=labels)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["compiled", "checkpointed", "selective", "compiled+checkpointed"])
def test_four_layer_model_variants_match_eager(one_process, dtype, variant):
    keys = {"compiled": dict(torch_compile=True),
            "checkpointed": dict(checkpoint_activations=True),
            "selective": dict(checkpoint_activations=True, recompute_granularity="selective"),
            "compiled+checkpointed": dict(torch_compile=True, checkpoint_activations=True)}[variant]
    loss, grads = _model_loss_and_grads(dtype, **keys)
    ref_loss, ref_grads = _model_loss_and_grads(dtype)
    # recompute repeats the same kernels (attention's backward may sum in another order); Inductor keeps
    # fp32 intermediates that eager rounds: a few roundings per layer, 4 layers, sums over hidden 256
    assert_close_rel(loss, ref_loss, bound(dtype, 2, 256), "loss")
    for name in ref_grads:
        assert_norm_close(grads[name], ref_grads[name], bound(dtype, 4 * 2, 256), name)


# ---------------------------------------------------------------------- MoE experts: grouped GEMMs
def test_moe_grouped_gemm_experts_match_sequential_ones(one_process, monkeypatch):
    """A 4-layer MoE model (8 experts, top 2) in bf16: experts through torch's grouped GEMM kernel, which
    moe_grouped_gemm: null picks on CUDA in bf16, against one GEMM pair per expert (moe_grouped_gemm: false).
    Both round each product once to bf16 from fp32 accumulation over hidden 256 (fc1) or ffn 512 (fc2); the
    routing is the same computation, so the loss and gradients sit a few roundings apart, as for the dense
    variants above. In fp32 null keeps the experts sequential: torch has no fp32 grouped kernel on CUDA."""
    from neox_fork.model import moe

    calls, real = [], moe.grouped_forward
    monkeypatch.setattr(moe, "grouped_forward", lambda *a: calls.append(1) or real(*a))
    keys = dict(moe_num_experts=8, moe_top_k=2, moe_router_type="topk", moe_aux_loss_coeff=0.01)
    loss, grads = _model_loss_and_grads(torch.bfloat16, **keys)
    assert calls, "moe_grouped_gemm: null did not pick the grouped kernel on CUDA in bf16"
    calls.clear()
    ref_loss, ref_grads = _model_loss_and_grads(torch.bfloat16, moe_grouped_gemm=False, **keys)
    assert not calls
    assert_close_rel(loss, ref_loss, bound(torch.bfloat16, 2, 512), "loss")
    for name in ref_grads:
        assert_norm_close(grads[name], ref_grads[name], bound(torch.bfloat16, 4 * 2, 512), name)
    _model_loss_and_grads(torch.float32, **keys)
    assert not calls, "fp32 experts should run one after another"
