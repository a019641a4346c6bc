"""What `tools/model_summary.py` prints: the model built on the meta device, FLOPs and memory sizing."""

from __future__ import annotations

from pathlib import Path

import torch

from neox_fork import flops, parallel
from neox_fork.config import load_config
from neox_fork.errors import UserError
from neox_fork.model import ModelShape, build_model, count_parameters


def tokenizer_vocab_size(config) -> int | None:
    if config.vocab_file and Path(config.vocab_file).is_file():
        from neox_fork.data.tokenizer import build_tokenizer

        return build_tokenizer(config.tokenizer_type, config.vocab_file).vocab_size
    return None


def meta_parameter_count(config, vocab: int | None) -> int:
    """Parameters of the whole model, counted on a TP=1 meta-device build (no memory is allocated)."""
    parallel.initialize(1)
    tp = config.model_parallel_size
    config.model_parallel_size = 1
    try:
        with torch.device("meta"):
            model = build_model(config, vocab, perform_initialization=False)
    finally:
        config.model_parallel_size = tp
    return sum(p.numel() for p in model.parameters())


def print_summary(paths, world_size=None, gpu="A100", gpu_memory_gb=None, assumed_mfu=0.40) -> dict:
    config = load_config(*paths)
    world = world_size or (config.num_gpus or 1) * max(config.num_nodes, 1)
    config.check_world_size(world)
    vocab = tokenizer_vocab_size(config)
    shape = ModelShape.from_config(config, vocab)
    n = meta_parameter_count(config, vocab)
    if n != count_parameters(shape):
        raise AssertionError(f"meta build has {n} parameters, formula says {count_parameters(shape)}")
    tp, dp = config.model_parallel_size, config.data_parallel_size(world)
    seq = config.seq_length
    model_fpt = flops.model_flops_per_token(n, config.num_layers, config.hidden_size, seq)
    hw_fpt = flops.hardware_flops_per_token(n, config.num_layers, config.hidden_size, seq,
                                            config.checkpoint_activations)
    mem = flops.training_memory_bytes(
        n, num_layers=config.num_layers, hidden_size=config.hidden_size, seq_length=seq,
        micro_batch=config.train_micro_batch_size_per_gpu, tp=tp, dp=dp, zero_stage=config.zero_stage,
        dtype=config.dtype_name, checkpoint_activations=config.checkpoint_activations, vocab_size=shape.vocab_size)
    gbs = config.global_batch_size(world)
    peak = flops.PEAK_FLOPS.get(gpu)
    if peak is None:
        raise UserError(f"--gpu {gpu!r} is not in the peak table; valid: {', '.join(flops.PEAK_FLOPS)}")
    tokens_per_gpu = assumed_mfu * peak / model_fpt
    embed = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    gib = 2**30
    lines = [
        f"config: {' + '.join(map(str, paths))}",
        f"parameters: {n}",
        f"non_embedding_parameters: {n - embed}",
        f"layers: {config.num_layers}  hidden: {config.hidden_size}  heads: {config.num_attention_heads}  "
        f"head_dim: {config.head_dim}  ffn: {config.ffn_hidden_size}  rotary_dims: {config.rotary_dim}  "
        f"vocab(padded): {shape.vocab_size}  seq: {seq}",
        f"flops_per_token: {model_fpt}  ({model_fpt / 1e9:.2f} GFLOP = 6N + 12*L*h*T)",
        f"hardware_flops_per_token: {hw_fpt}  (activation checkpointing: {config.checkpoint_activations})",
        f"parallelism: world {world} = tensor {tp} x data {dp}; ZeRO stage {config.zero_stage}; {config.dtype_name}",
        f"global_batch: {gbs} sequences = {gbs * seq} tokens per step",
        "memory_per_gpu_gib: " + "  ".join(f"{k} {v / gib:.2f}" for k, v in mem.items()),
        f"estimate on {gpu} at {assumed_mfu:.0%} MFU: {tokens_per_gpu:,.0f} tokens/s per GPU, "
        f"{tokens_per_gpu * world:,.0f} tokens/s total, {gbs * seq / (tokens_per_gpu * world):.2f} s per step",
    ]
    if config.train_iters:
        days = config.train_iters * gbs * seq / (tokens_per_gpu * world) / 86400
        lines.append(f"train_iters {config.train_iters}: {config.train_iters * gbs * seq / 1e12:.2f}T tokens, "
                     f"about {days:.1f} days")
    if gpu_memory_gb:
        fits = mem["total"] / gib <= gpu_memory_gb * 0.9
        lines.append(f"fits in {gpu_memory_gb:g} GiB (90% usable): {'yes' if fits else 'NO'}")
    print("\n".join(lines))
    return {"parameters": n, "flops_per_token": model_fpt, "memory": mem}
