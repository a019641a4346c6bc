"""FLOPs per token, MFU/HFU, a device peak table, and the memory a training step needs per GPU.

FLOPs per token of training (forward + backward), as in the PaLM paper and GPT-NeoX:

    model_flops_per_token = 6 * N + 12 * L * h * T

N parameters (embeddings included), L layers, h hidden size, T sequence length: 6N for the matrix
multiplies (2 forward + 4 backward), 12*L*h*T for attention scores and their weighted sum. With full
activation checkpointing the forward runs twice, so the hardware does 8N + 16*L*h*T (HFU).
MFU = tokens/s * model_flops_per_token / (devices * peak FLOP/s).
"""

from __future__ import annotations

import torch

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


def model_flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_length: int) -> int:
    return 6 * num_params + 12 * num_layers * hidden_size * seq_length


def hardware_flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_length: int,
                             recompute: bool) -> int:
    """What the device executes: one extra forward (2N + 4*L*h*T) under full activation checkpointing."""
    extra = 2 * num_params + 4 * num_layers * hidden_size * seq_length if recompute else 0
    return model_flops_per_token(num_params, num_layers, hidden_size, seq_length) + extra


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
                          checkpoint_activations: bool, vocab_size: int) -> dict[str, float]:
    """Bytes per GPU for one training step, by part (Rajbhandari et al. for ZeRO, Korthikanti et al.
    for activations with a fused attention kernel that keeps no s x s scores).

    - weights and gradients: 2 bytes each per parameter in bf16/fp16 (4 in fp32), split over TP;
    - optimizer: fp32 master copy + Adam m and v = 12 bytes per parameter (8 in pure fp32), split over
      TP and, from ZeRO stage 1, over DP;
    - activations per layer: 34*s*b*h/tp bytes without checkpointing; with it, the layer inputs
      (2*s*b*h each) plus one layer being recomputed; plus the logits chunk of the loss.
    """
    half = dtype in ("bf16", "fp16")
    p = num_params / tp
    weights = p * (2 if half else 4)
    grads = p * (2 if half else 4)
    optim = p * (12 if half else 8) / (dp if zero_stage >= 1 else 1)
    sbh = seq_length * micro_batch * hidden_size
    per_layer = 34 * sbh / tp
    if checkpoint_activations:
        activations = num_layers * 2 * sbh + per_layer
    else:
        activations = num_layers * per_layer
    logits = min(seq_length * micro_batch, 4096) * vocab_size / tp * 4 * 2
    return {"weights": weights, "gradients": grads, "optimizer": optim, "activations": activations + logits,
            "total": weights + grads + optim + activations + logits}
