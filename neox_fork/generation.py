"""Sampling from a checkpoint with a KV cache: each new token costs one position, not a re-run of the prompt.

Sampling follows transformers' order: repetition penalty, temperature, top-k, top-p. Temperature 0 is
greedy. Prompts of different lengths are decoded one batch row at a time through the same cache code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from neox_fork import checkpoint, parallel
from neox_fork.errors import UserError
from neox_fork.model import StableLM, build_model


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop_on_eod: bool = True


def load_for_inference(ckpt_path, step: int | None = None, dtype: str = "fp32"):
    """(model, config, tokenizer or None) from a checkpoint of any TP size, merged into one process."""
    from neox_fork.data.tokenizer import build_tokenizer

    state, config, folder = checkpoint.load_merged(ckpt_path, step)
    parallel.initialize(1)
    config.model_parallel_size = 1
    tokenizer_file = checkpoint.tokenizer_of(folder, config)
    tokenizer = build_tokenizer(config.tokenizer_type, str(tokenizer_file)) if tokenizer_file else None
    vocab = state["word_embeddings.weight"].shape[0]
    config.vocab_size = vocab
    config.make_vocab_size_divisible_by = 1
    model = build_model(config, perform_initialization=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("_extra_state")]
    if missing or unexpected:
        raise UserError(f"checkpoint {folder} does not match its config: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    model = model.to(dtype=checkpoint_dtype(dtype)).eval()
    return model, config, tokenizer


def checkpoint_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def next_token(logits: torch.Tensor, previous: torch.Tensor, p: SamplingParams, generator) -> torch.Tensor:
    """One token per row from the last position's logits [b, vocab]."""
    logits = logits.float()
    if p.repetition_penalty != 1.0:
        seen = logits.gather(1, previous)
        seen = torch.where(seen < 0, seen * p.repetition_penalty, seen / p.repetition_penalty)
        logits = logits.scatter(1, previous, seen)
    if p.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - p.top_p)
        drop_sorted[:, -1] = False
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(model: StableLM, prompts: list[list[int]], params: SamplingParams, eod: int | None = None,
             use_cache: bool = True, max_positions: int | None = None) -> tuple[list[list[int]], dict]:
    """Generated ids (prompt excluded) for each prompt, and timing stats."""
    generator = torch.Generator().manual_seed(params.seed)
    device = next(model.parameters()).device
    outputs, new_tokens, started = [], 0, time.perf_counter()
    for prompt in prompts:
        if not prompt:
            raise UserError("empty prompt: give at least one token")
        if max_positions and len(prompt) + params.max_new_tokens > max_positions:
            raise UserError(f"prompt of {len(prompt)} tokens + {params.max_new_tokens} new tokens exceeds "
                            f"seq-length {max_positions}; shorten the prompt or --max-new-tokens")
        ids = torch.tensor([prompt], device=device)
        cache = model.new_kv_cache() if use_cache else None
        produced: list[int] = []
        step_input = ids
        for _ in range(params.max_new_tokens):
            logits = model(step_input if use_cache else ids, kv_cache=cache)[:, -1]
            token = next_token(logits, ids, params, generator)
            ids = torch.cat((ids, token[:, None]), dim=1)
            produced.append(int(token))
            step_input = token[:, None]
            if params.stop_on_eod and eod is not None and produced[-1] == eod:
                break
        outputs.append(produced)
        new_tokens += len(produced)
    seconds = time.perf_counter() - started
    return outputs, {"new_tokens": new_tokens, "seconds": seconds,
                     "tokens_per_sec": new_tokens / seconds if seconds else 0.0}
