"""FLOPs per token, MFU/HFU, a device peak table, and the memory a training step needs per GPU.

FLOPs per token of training (forward + backward), the count Megatron (72BsLh^2(1 + s/6h + V/12hL)),
torchtitan and nanotron report:

    model FLOPs per token = 6 * N_non_embedding + 12 * L * h * s + 6 * V * h

N_non_embedding: the parameters of the transformer layers and the final norm, counted on the built model
(so biases, GQA or another MLP width count as they are); 6 per parameter for its matrix multiply (2 forward,
4 backward). 12*L*h*s: attention scores and their weighted sum (L layers, h hidden, s sequence). 6*V*h: the
output head over the padded vocabulary, once whether or not it is tied to the input embedding; the input
embedding is a lookup and counts nothing.

Hardware FLOPs add what activation checkpointing recomputes in the backward: `full` one more forward of the
transformer layers (2 * N_layers + 4 * L * h * s), `selective` the attention core only (4 * L * h * s),
`none` nothing. The head is never recomputed (at TP=1 the fused head + loss forms its gradients in the
forward pass). MFU = tokens/s * model FLOPs per token / (devices * peak FLOP/s); HFU likewise with hardware
FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neox_fork.model.moe import moe_layers

# Dense bf16/fp16 tensor-core peaks in FLOP/s (no sparsity), from the vendors' data sheets.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "A100": 312e12,
    "A10G": 125e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,
    "MI300X": 1307e12,
}

RECOMPUTE = ("none", "full", "selective")


def model_flops_per_token(non_embedding_params: int, num_layers: int, hidden_size: int, seq_length: int,
                          vocab_size: int) -> int:
    """6 N_non_embedding + 12 L h s + 6 V h (see the module docstring)."""
    return 6 * non_embedding_params + 12 * num_layers * hidden_size * seq_length + 6 * vocab_size * hidden_size


def recompute_flops_per_token(recompute: str, layer_params: int, num_layers: int, hidden_size: int,
                              seq_length: int) -> int:
    """FLOPs the backward spends re-running forward work: one forward of the checkpointed layers (their
    matrix multiplies and attention) for `full`, the attention core (q k^T and p v) for `selective`."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute {recompute!r}: use one of {', '.join(RECOMPUTE)}")
    attention_forward = 4 * num_layers * hidden_size * seq_length
    return {"none": 0, "full": 2 * layer_params + attention_forward, "selective": attention_forward}[recompute]


def _whole_model_numel(module: torch.nn.Module, tp_size: int) -> int:
    """Parameters of `module` in the unsharded model: megatron-core marks tensor-parallel shards with
    `tensor_model_parallel` (tp_size of them make the whole); the others are replicated on every rank."""
    return sum(p.numel() * (tp_size if getattr(p, "tensor_model_parallel", False) else 1)
               for p in module.parameters())


def _idle_expert_numel(module: torch.nn.Module, tp_size: int) -> int:
    """Parameters a token does not use: in each MoE layer, the experts beyond its top k (all experts are alike)."""
    idle = 0
    for layer in moe_layers(module):
        experts = layer.moe.experts.local_experts
        idle += (len(experts) - layer.moe.router.topk) * _whole_model_numel(experts[0], tp_size)
    return idle


@dataclass(frozen=True)
class FlopsPerToken:
    model: int  # for MFU
    hardware: int  # for HFU: model + what the configured recomputation repeats
    non_embedding_params: int
    recompute: str


def training_flops_per_token(model: torch.nn.Module, seq_length: int, recompute: str,
                             tp_size: int = 1) -> FlopsPerToken:
    """The FLOPs per token of one training step of `model` (this rank's shard of a TP=`tp_size` model, or a
    meta-device build): the one function model_summary, the training log, metrics.jsonl and the benchmark
    use. N_non_embedding is counted on the model: `model.layers` plus `model.final_norm`; with MoE layers, the
    active ones (the router and top-k experts of each), so MFU counts the FLOPs a token really costs."""
    layer_params = _whole_model_numel(model.layers, tp_size) - _idle_expert_numel(model.layers, tp_size)
    non_embedding = layer_params + _whole_model_numel(model.final_norm, tp_size)
    s = model.shape
    flops = model_flops_per_token(non_embedding, s.num_layers, s.hidden_size, seq_length, s.vocab_size)
    extra = recompute_flops_per_token(recompute, layer_params, s.num_layers, s.hidden_size, seq_length)
    return FlopsPerToken(flops, flops + extra, non_embedding, recompute)


def device_peak_flops(device: torch.device | str | None = None) -> float | None:
    """Peak of the current CUDA device by name; None on the CPU or an unknown card."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if all(part in name for part in key.split()):
            if key == "H100 SXM" and ("PCIe" in name or "NVL" in name):
                continue
            return PEAK_FLOPS[key]
    if "H100" in name:
        return PEAK_FLOPS["H100 SXM"]
    return None


def mfu(tokens_per_sec: float, flops_per_token: float, num_devices: int, peak: float | None) -> float | None:
    if not peak:
        return None
    return tokens_per_sec * flops_per_token / (num_devices * peak)


def training_memory_bytes(num_params: int, *, num_layers: int, hidden_size: int, seq_length: int,
                          micro_batch: int, tp: int, dp: int, zero_stage: int, dtype: str,
                          checkpoint_activations: bool, vocab_size: int,
                          sequence_parallel: bool = False, trainable_params: int | None = None,
                          cp: int = 1) -> dict[str, float]:
    """Bytes per GPU for one training step, by part (Rajbhandari et al. for ZeRO, Korthikanti et al.
    for activations with a fused attention kernel that keeps no s x s scores).

    - weights and gradients: 2 bytes each per parameter in bf16/fp16 (4 in fp32), split over TP;
    - optimizer: fp32 master copy + Adam m and v = 12 bytes per parameter (8 in pure fp32), split over
      TP and, from ZeRO stage 1, over DP;
    - fp32 gradient buffer (`fp32_gradient_buffer_bytes`): DeepSpeed's bf16 optimizer accumulates gradients
      in an fp32 copy of the whole model on every rank;
    - activations: see `activation_memory_bytes`; plus the logits chunk of the loss.
    `trainable_params` (LoRA: the adapters; default all): only they have gradients and optimizer states.
    Context parallelism (`cp`): ZeRO partitions over data x context ranks (DeepSpeed's sequence x data group);
    every activation, the logits chunk included, covers seq_length / cp positions.
    """
    half = dtype in ("bf16", "fp16")
    p = num_params / tp
    t = (num_params if trainable_params is None else trainable_params) / tp
    weights = p * (2 if half else 4)
    grads = t * (2 if half else 4)
    optim = t * (12 if half else 8) / (dp * cp if zero_stage >= 1 else 1)
    grad_buffer = fp32_gradient_buffer_bytes(t, dp=dp * cp, zero_stage=zero_stage, dtype=dtype)
    activations = activation_memory_bytes(num_layers=num_layers, hidden_size=hidden_size, seq_length=seq_length,
                                          micro_batch=micro_batch, tp=tp, sequence_parallel=sequence_parallel,
                                          checkpoint_activations=checkpoint_activations, cp=cp)
    logits = min(seq_length // cp * micro_batch, 4096) * vocab_size / tp * 4 * 2
    return {"weights": weights, "gradients": grads, "grad_buffer_fp32": grad_buffer, "optimizer": optim,
            "activations": activations + logits,
            "total": weights + grads + grad_buffer + optim + activations + logits}


def fp32_gradient_buffer_bytes(params_per_rank: float, *, dp: int, zero_stage: int, dtype: str) -> float:
    """DeepSpeed's fp32 gradients beside the model's half-precision ones. bf16 at ZeRO stage <= 1 (our
    `grad_accum_dtype: fp32`) runs its BF16_Optimizer, which holds an fp32 gradient buffer the size of the
    whole (TP-sharded) model on every rank; fp16, and bf16 at stage 2, keep fp32 gradients of this rank's
    ZeRO partition only; fp32 training accumulates in the parameters' own gradients."""
    if dtype == "bf16" and zero_stage <= 1:
        return params_per_rank * 4
    if dtype in ("bf16", "fp16"):
        return params_per_rank * 4 / (dp if zero_stage >= 1 else 1)
    return 0.0


def largest_micro_batch(memory_at, budget_bytes: float, limit: int = 64) -> int:
    """The largest micro-batch b <= limit with memory_at(b)["total"] <= budget_bytes (0 if none fits);
    `memory_at(b)` is `training_memory_bytes` with every other argument fixed."""
    best = 0
    for b in range(1, limit + 1):
        if memory_at(b)["total"] > budget_bytes:
            break
        best = b
    return best


def activation_memory_bytes(*, num_layers: int, hidden_size: int, seq_length: int, micro_batch: int, tp: int,
                            sequence_parallel: bool, checkpoint_activations: bool, cp: int = 1) -> float:
    """Bytes of 16-bit activations one rank holds for the backward pass (Korthikanti et al. 2022, with a
    fused attention kernel that keeps no s x s scores), for s*b*h = seq x micro-batch x hidden:

    - per layer, tensor parallelism alone: s*b*h*(10 + 24/tp): the LayerNorm, dropout and residual
      inputs (10 sbh) are whole on every rank, the attention and MLP insides (24 sbh) are split;
    - per layer, with sequence parallelism: 34*s*b*h/tp: those 10 sbh are split over the sequence too;
    - with full activation checkpointing: each layer's input (2 sbh, /tp with sequence parallelism)
      plus one layer being recomputed;
    - context parallelism (`cp`, DeepSpeed-Ulysses): a rank holds s/cp positions of every tensor outside
      attention, and inside it the whole sequence of heads/cp heads: the same s*h/cp, so s becomes s/cp.
    """
    sbh = seq_length / cp * micro_batch * hidden_size
    per_layer = 34 * sbh / tp if sequence_parallel else sbh * (10 + 24 / tp)
    if checkpoint_activations:
        return num_layers * 2 * sbh / (tp if sequence_parallel else 1) + per_layer
    return num_layers * per_layer


def context_parallel_all_to_all_bytes(*, num_layers: int, num_heads: int, kv_heads: int, head_dim: int,
                                      seq_length: int, micro_batch: int, tp: int, cp: int, dtype: str,
                                      recompute: bool) -> float:
    """Bytes one rank sends in DeepSpeed-Ulysses' all-to-alls for one micro-batch's forward and backward.

    Per layer and pass, four all-to-alls (q, k, v before attention; its output after): each rank holds
    b x s/cp positions x heads/tp x head_dim of each and sends the (cp - 1)/cp of it that other ranks need, so
    (2 num_heads + 2 kv_heads) / tp x head_dim x b x s/cp x (cp - 1)/cp elements. The backward sends the
    gradients of the same tensors; full recompute runs the forward's again: 2 passes, or 3 with recompute."""
    if cp == 1:
        return 0.0
    elements = (2 * num_heads + 2 * kv_heads) / tp * head_dim * micro_batch * seq_length / cp * (cp - 1) / cp
    per_layer = elements * (2 if dtype in ("bf16", "fp16") else 4)
    return num_layers * per_layer * (3 if recompute else 2)


def longest_sequence(memory_at, budget_bytes: float, multiple: int, limit: int = 2**22) -> int:
    """The longest seq_length, a power of two times 1024 (and a multiple of `multiple`) up to `limit`, with
    memory_at(s)["total"] <= budget_bytes (0 if none fits); `memory_at(s)` is `training_memory_bytes` at s."""
    best, s = 0, 1024
    while s <= limit:
        if s % multiple == 0:
            if memory_at(s)["total"] > budget_bytes:
                break
            best = s
        s *= 2
    return best
