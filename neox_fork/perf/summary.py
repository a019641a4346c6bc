"""What `tools/model_summary.py` prints: the model built on the meta device, FLOPs and memory sizing."""

from __future__ import annotations

import dataclasses

import torch

from neox_fork.perf import flops
from neox_fork.parallel import groups as parallel
from neox_fork.config.loading import load_config
from neox_fork.data.tokenizer import tokenizer_file_vocab_size
from neox_fork.errors import UserError
from neox_fork.model import rope_scaling
from neox_fork.model.shape import ModelShape, count_parameters
from neox_fork.model.adapters import is_adapter
from neox_fork.model.moe import is_expert
from neox_fork.model.transformer import build_model

DISK_BYTES_PER_SEC = 100e6  # a conservative shared filesystem as seen from one node


def checkpoint_bytes(config, elements: int, dense_elements: int = 0) -> int:
    """One checkpoint's bytes, as a save writes them, for `elements` weight elements (checkpoint_elements): each in
    the training dtype, plus its optimizer state (Adam's two fp32 moments: optimizer_state_bytes) and, where the
    optimizer keeps one, an fp32 master copy (ZeRO, and DeepSpeed's bf16/fp16 optimizers; fp32 weights without ZeRO are their own master).
    Under expert parallelism ZeRO shards over the expert-data-parallel ranks only, so every EP rank's optimizer
    files hold the state of the `dense_elements` (the elements that are not experts'): EP times in all.
    Config, tokenizer and RNG files add a few KB a rank."""
    weights = 2 if config.dtype_name in ("bf16", "fp16") else 4
    if config.no_save_optim:
        return elements * weights
    master = 4 if config.zero_stage >= 1 or weights == 2 else 0
    optimized = elements + (config.expert_model_parallel_size - 1) * dense_elements
    return elements * weights + optimized * (master + optimizer_state_bytes(config))


def optimizer_state_bytes(config) -> int:
    """fp32 optimizer state per parameter (docs/optimizers.md): Adam's two moments, Lion's one, SGD's momentum when
    it has one, MADGRAD's three buffers; SM3 keeps per-row and per-column sums only (about nothing per parameter)."""
    kind = config.optimizer_kind
    if kind == "lion":
        return 4
    if kind == "sgd":
        return 4 if float(config.optimizer.get("params", {}).get("momentum", 0) or 0) else 0
    if kind == "madgrad_wd":
        return 12
    if kind == "sm3":
        return 0
    return 8  # adam, adamw, cpu_adam, cpu_torch_adam


def checkpoint_elements(numels: dict[str, int], config) -> int:
    """The weight elements one checkpoint holds, from the whole (TP=1) model's {parameter name: elements}: each
    tensor-parallel rank writes its own copy of the replicated parameters (norms, row-parallel biases), and with
    pipe_parallel_size > 1 a tied embedding is held by the first and the last stage."""
    from neox_fork.checkpoint.store import sharding

    tp = config.model_parallel_size
    total = sum(n if sharding(name) is not None else n * tp for name, n in numels.items())
    if config.pipe_parallel_size > 1 and config.tie_word_embeddings:
        total += numels.get("word_embeddings.weight", 0)
    return total


def meta_model(config, vocab: int | None):
    """The whole model (TP=1) built on the meta device: shapes and parameter counts, no memory. The vocabulary
    stays padded for the configured TP size (GPT-NeoX-20B at TP 2: 50432 rows)."""
    parallel.initialize(1)
    whole = dataclasses.replace(config, model_parallel_size=1, pipe_parallel_size=0,
                                make_vocab_size_divisible_by=config.make_vocab_size_divisible_by
                                * config.model_parallel_size)
    with torch.device("meta"):
        return build_model(whole, vocab, perform_initialization=False, sizing_only=True)


def print_summary(paths, world_size=None, gpu="A100", gpu_memory_gb=None, assumed_mfu=0.40) -> dict:
    config = load_config(*paths)
    world, how = sizing_world(config, world_size)
    config.check_world_size(world)
    vocab = tokenizer_file_vocab_size(config.vocab_file, config.tokenizer_type, config.merge_file)
    shape = ModelShape.from_config(config, vocab)
    model = meta_model(config, vocab)
    numels = {k: p.numel() for k, p in model.named_parameters() if not is_adapter(k)}  # the model (LoRA: its base)
    adapters = {k: p.numel() for k, p in model.named_parameters() if is_adapter(k)}
    n, n_adapters = sum(numels.values()), sum(adapters.values())
    trainable = n_adapters if config.adapter else n
    if n != count_parameters(shape):
        raise AssertionError(f"meta build has {n} parameters, formula says {count_parameters(shape)}")
    tp, dp, cp = config.model_parallel_size, config.data_parallel_size(world), config.context_parallel_size
    # expert parallelism: a rank holds 1/EP of the experts, and ZeRO shards over the expert-data-parallel ranks
    ep = config.expert_model_parallel_size
    experts = sum(v for k, v in numels.items() if is_expert(k))
    seq = config.seq_length
    fpt = flops.training_flops_per_token(model, seq, config.activation_recompute)
    model_fpt = fpt.model

    def memory_at(micro_batch: int, checkpoint_activations: bool, params: int = n, layers: int = config.num_layers,
                  in_flight: int = 1, seq_length: int = seq, context: int = cp) -> dict[str, float]:
        return flops.training_memory_bytes(
            params - experts + experts // ep + n_adapters, num_layers=layers * in_flight,
            hidden_size=config.hidden_size, seq_length=seq_length,
            micro_batch=micro_batch, tp=tp, dp=dp // ep, zero_stage=config.zero_stage, dtype=config.dtype_name,
            checkpoint_activations=checkpoint_activations, vocab_size=shape.vocab_size,
            sequence_parallel=shape.sequence_parallel and tp > 1,
            trainable_params=n_adapters if config.adapter else None, cp=context)

    mem = memory_at(config.train_micro_batch_size_per_gpu, config.activation_recompute == "full")
    act = {sp: flops.activation_memory_bytes(
        num_layers=config.num_layers, hidden_size=config.hidden_size, seq_length=seq, tp=tp, sequence_parallel=sp,
        micro_batch=config.train_micro_batch_size_per_gpu, checkpoint_activations=config.activation_recompute == "full",
        cp=cp) for sp in (False, True)}
    gbs = config.global_batch_size(world)
    pipe = f"pipe {config.pipe_parallel_size} x " if config.pipe_parallel_size > 1 else ""
    context = f" x context {cp}" if cp > 1 else ""
    peak = flops.PEAK_FLOPS.get(gpu)
    if peak is None:
        raise UserError(f"--gpu {gpu!r} is not in the peak table; valid: {', '.join(flops.PEAK_FLOPS)}")
    tokens_per_gpu = assumed_mfu * peak / model_fpt
    rope = f" (rope_scaling {rope_scaling.describe(config.rope_scaling)})" if config.rope_scaling else ""
    gib = 2**30
    lines = [
        f"config: {' + '.join(map(str, paths))}",
        f"parameters: {n}",
        f"active_parameters: {count_parameters(shape, active=True)}  (used per token: MoE layers' top-k experts)",
        f"trainable_parameters: {trainable}" + (
            f" ({trainable / n:.3%} of the model: LoRA r={config.lora_r} on {', '.join(config.lora_targets)}; "
            "the base is frozen: no gradients or optimizer states)" if config.adapter else ""),
        f"non_embedding_parameters: {fpt.non_embedding_params}" + ("  (active)" if shape.moe else ""),
        f"layers: {config.num_layers}  hidden: {config.hidden_size}  heads: {config.num_attention_heads}  "
        f"head_dim: {config.head_dim}  ffn: {config.ffn_hidden_size}  rotary_dims: {config.rotary_dim}{rope}  "
        f"vocab(padded): {shape.vocab_size}  seq: {seq}",
        f"flops_per_token: {model_fpt}  ({model_fpt / 1e9:.2f} GFLOP = 6*N_non_embedding + 12*L*h*s + 6*V*h)",
        f"hardware_flops_per_token: {fpt.hardware}  (recompute: {fpt.recompute})",
        f"parallelism: world {world} = {pipe}tensor {tp}{context} x data {dp} ({how}); ZeRO stage {config.zero_stage}; "
        f"{config.dtype_name}" + (f"; experts over {ep} data-parallel ranks ({experts // ep} expert parameters a "
                                  f"rank of {experts}; ZeRO over {dp // ep} expert-data-parallel ranks)"
                                  if ep > 1 else ""),
        f"global_batch: {gbs} sequences = {gbs * seq} tokens per step",
        "memory_per_gpu_gib: " + "  ".join(f"{k} {v / gib:.2f}" for k, v in mem.items()),
        f"activations_per_rank_gib (layers, 16-bit): tensor-parallel only {act[False] / gib:.2f}  "
        f"with sequence_parallel {act[True] / gib:.2f}  (sequence_parallel: {shape.sequence_parallel})",
        f"estimate on {gpu} at {assumed_mfu:.0%} MFU: {tokens_per_gpu:,.0f} tokens/s per GPU, "
        f"{tokens_per_gpu * world:,.0f} tokens/s total, {gbs * seq / (tokens_per_gpu * world):.2f} s per step",
    ]
    if config.pipe_parallel_size > 1:
        lines += pipeline_lines(config, model, memory_at, config.activation_recompute == "full")
    all_to_all = 0.0
    if cp > 1:
        all_to_all = config.gradient_accumulation_steps * flops.context_parallel_all_to_all_bytes(
            num_layers=config.num_layers, num_heads=config.num_attention_heads, kv_heads=config.kv_heads,
            head_dim=config.head_dim, seq_length=seq, micro_batch=config.train_micro_batch_size_per_gpu, tp=tp, cp=cp,
            dtype=config.dtype_name, recompute=config.activation_recompute == "full")
        lines.append(f"context_parallel: {cp} ranks hold {seq // cp} positions each of every sequence; Ulysses "
                     f"all-to-all per step per rank {all_to_all / gib:.3f} GiB sent ({config.gradient_accumulation_steps}"
                     f" micro-batches x {config.num_layers} layers x 4 all-to-alls x "
                     f"{3 if config.activation_recompute == 'full' else 2} passes)")
    saved_numels = adapters if config.adapter else numels
    ckpt_bytes = checkpoint_bytes(config, checkpoint_elements(saved_numels, config), checkpoint_elements(
        {k: v for k, v in saved_numels.items() if not is_expert(k)}, config))
    saved = "adapter parameter; the base is named, not copied" if config.adapter else "parameter"
    lines.append(f"checkpoint: {ckpt_bytes / 1e9:.1f} GB per save ({ckpt_bytes // trainable} bytes per {saved}); "
                 f"{ckpt_bytes / DISK_BYTES_PER_SEC:.0f} s to write at {DISK_BYTES_PER_SEC / 1e6:.0f} MB/s "
                 "(compare signal_grace_seconds)")
    if config.train_iters:
        tokens = config.train_iters * gbs * seq
        days = tokens / (tokens_per_gpu * world) / 86400
        amount = f"{tokens / 1e12:.2f}T" if tokens >= 1e11 else f"{tokens / 1e9:.2f}B"
        lines.append(f"train_iters {config.train_iters}: {amount} tokens, "
                     + (f"about {days:.1f} days" if days >= 1 else f"about {days * 24:.1f} hours"))
    if gpu_memory_gb:
        budget = gpu_memory_gb * gib * 0.9
        lines.append(f"fits in {gpu_memory_gb:g} GiB (90% usable): {'yes' if mem['total'] <= budget else 'NO'}")
        lines.append(no_recompute_line(lambda b: memory_at(b, False), budget, gpu_memory_gb))
        lines.append(longest_sequence_line(memory_at, config, budget, gpu_memory_gb, cp))
    print("\n".join(lines))
    return {"parameters": n, "trainable_parameters": trainable, "all_to_all_bytes_per_step": all_to_all,
            "active_parameters": count_parameters(shape, active=True), "flops_per_token": model_fpt, "memory": mem,
            "checkpoint_bytes": ckpt_bytes,
            "activations_by_sequence_parallel": act}


def pipeline_lines(config, model, memory_at, recompute: bool) -> list[str]:
    """Per-stage parameters and memory of a pipelined config, and the 1F1B bubble.

    Stages as pipeline_stages splits the layer list (whole-model counts for `parameters`; DeepSpeed balances one
    TP rank's, in which replicated norms weigh a little more). Under 1F1B stage s keeps min(P - s, m)
    micro-batches of activations (m = gradient_accumulation_steps); the idle fraction is (P - 1) / (m + P - 1).
    """
    from neox_fork.training.pipeline import entry_names, entry_parameters, partition

    stages, m = config.pipe_parallel_size, config.gradient_accumulation_steps
    names = entry_names(config.num_layers, model.shape.tie_word_embeddings)
    counts = entry_parameters(model)
    parts = partition(config.pipe_partition_method, names, counts, stages)
    gib = 2**30
    lines = [f"pipeline: {stages} stages ({config.pipe_partition_method}), {m} micro-batches a step; bubble "
             f"(P - 1) / (m + P - 1) = {(stages - 1) / (m + stages - 1):.1%} of each step idle"]
    for s in range(stages):
        first, stop = parts[s], parts[s + 1]
        params = sum(counts[first:stop])
        layers = sum(1 for name in names[first:stop] if name == "ParallelTransformerLayerPipe")
        inflight = min(stages - s, m)
        mem = memory_at(config.train_micro_batch_size_per_gpu, recompute, params, layers, inflight)
        lines.append(f"  stage {s}: entries {first}-{stop - 1} ({layers} transformer layers), {params} parameters, "
                     f"{inflight} micro-batches of activations; memory_per_gpu_gib total {mem['total'] / gib:.2f} "
                     f"(weights {mem['weights'] / gib:.2f}, optimizer {mem['optimizer'] / gib:.2f}, "
                     f"activations {mem['activations'] / gib:.2f})")
    return lines


def sizing_world(config, world_size: int | None = None) -> tuple[int, str]:
    """The world to size: the one given, else num_gpus x num_nodes of the config, else the smallest its
    parallelism needs (tensor x pipe x the data-parallel size train_batch_size fixes, else 1)."""
    if world_size:
        return world_size, "--world-size"
    if config.num_gpus:
        return config.num_gpus * max(config.num_nodes, 1), "num_gpus x num_nodes of the config"
    per_step = config.train_micro_batch_size_per_gpu * config.gradient_accumulation_steps
    dp = config.train_batch_size // per_step if config.train_batch_size and not config.train_batch_size % per_step \
        else 1
    world = config.model_parallel_size * max(config.pipe_parallel_size, 1) * dp
    return world, (f"the smallest world this config needs: model_parallel_size {config.model_parallel_size} x "
                   f"pipe_parallel_size {max(config.pipe_parallel_size, 1)} x data {dp}; --world-size sizes another")


def longest_sequence_line(memory_at, config, budget: float, gpu_memory_gb: float, cp: int) -> str:
    """The longest seq_length (a power of two x 1024) whose step fits a GPU, at context_parallel_size 1 and at the
    config's (and twice it, when the heads allow), at the config's micro-batch and recompute."""
    b, recompute = config.train_micro_batch_size_per_gpu, config.activation_recompute == "full"
    heads = min(config.num_attention_heads, config.kv_heads) // config.model_parallel_size
    sizes = sorted({1, cp, *([2 * cp] if heads % (2 * cp) == 0 else [])})
    fits = [f"CP {c}: {flops.longest_sequence(lambda s: memory_at(b, recompute, seq_length=s, context=c), budget, c) or 'none'}"
            for c in sizes]
    return (f"longest seq_length per {gpu_memory_gb:g} GiB GPU (micro-batch {b}, recompute {config.activation_recompute}): "
            + ", ".join(fits))


def no_recompute_line(memory_at, budget: float, gpu_memory_gb: float) -> str:
    """Which micro-batch trains without activation checkpointing (no recompute FLOPs at all)."""
    b = flops.largest_micro_batch(memory_at, budget)
    if not b:
        return f"without recompute: no micro-batch fits in {gpu_memory_gb:g} GiB; keep checkpoint_activations"
    return (f"without recompute: micro-batch up to {b} fits in {gpu_memory_gb:g} GiB "
            f"(checkpoint_activations: false, train_micro_batch_size_per_gpu: {b})")
