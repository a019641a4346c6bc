"""Sampling from a checkpoint: batched prompts, a KV cache, and tensor-parallel ranks that cooperate.

Prompts of different lengths share one batch through left padding: each row's real tokens keep
positions 0..n-1 and a key mask hides the padding, so a row decodes exactly as it would alone. The
KV cache is preallocated, so each new token costs one position (one query against the cached keys).

Sampling follows transformers' order: repetition penalty (over the prompt and the generated tokens),
temperature, top-k, top-p; temperature 0 is greedy. Prompt i of a call draws from its own generator
seeded with `seed + i`, so a prompt's sample does not depend on the batch it shares.

At tensor-parallel size N every rank holds its heads and vocabulary slice, computes the same gathered
logits, and rank 0 of the tensor-parallel group samples and broadcasts the tokens.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from neox_fork import checkpoint, parallel
from neox_fork.dtypes import torch_dtype
from neox_fork.errors import UserError
from neox_fork.model import NeoXModel, build_model


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop_on_eod: bool = True

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise UserError(f"--temperature {self.temperature}: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k}: must be >= 0 (0 disables it)")
        if self.repetition_penalty <= 0:
            raise UserError(f"--repetition-penalty {self.repetition_penalty}: must be > 0 (1 disables it)")


# ---------------------------------------------------------------------- loading
def load_for_inference(ckpt_path, step: int | None = None, dtype: str = "fp32", tp_cooperate: bool | None = None,
                       trust: bool = False):
    """(model, config, tokenizer or None) for this process.

    One process (the default): the checkpoint's TP shards are merged into a TP=1 model. With
    `tp_cooperate` (default: when launched with WORLD_SIZE > 1) the world is one tensor-parallel group:
    each rank loads its own `mp_rank_XX` shard, re-split from the merged state only when the checkpoint
    was saved at another TP size.
    """
    if tp_cooperate is None:
        tp_cooperate = int(os.environ.get("WORLD_SIZE", "1")) > 1
    folder = checkpoint.resolve(ckpt_path, step)
    config = checkpoint.load_config_of(folder)
    if tp_cooperate:
        parallel.init_distributed()
        tp = dist.get_world_size()
        parallel.initialize(tp)
        state = checkpoint.load_rank_shard(folder, tp, parallel.tp_rank(), trust)
    else:
        tp = 1
        parallel.initialize(1)
        state = checkpoint.merge_tp_shards(checkpoint.load_model_shards(folder, trust))
    source = checkpoint.tokenizer_of(folder, config)
    tokenizer = source.build() if source else None
    # the run's config at this TP size, with the padded vocabulary the weights were saved with
    config = replace(config, model_parallel_size=tp, make_vocab_size_divisible_by=1,
                     vocab_size=state["word_embeddings.weight"].shape[0] * tp)
    model = build_model(config, perform_initialization=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("_extra_state")]
    if missing or unexpected:
        raise UserError(f"checkpoint {folder} does not match its config: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    model = model.to(dtype=torch_dtype(dtype)).eval()
    return model, config, tokenizer


# ---------------------------------------------------------------------- sampling
def process_logits(logits: torch.Tensor, previous: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """transformers' logits processors in its order: repetition penalty over `previous` [b, n] (repeats
    are harmless), then temperature, top-k and top-p; filtered entries become -inf."""
    logits = logits.float()
    if p.repetition_penalty != 1.0:
        seen = logits.gather(1, previous)
        seen = torch.where(seen < 0, seen * p.repetition_penalty, seen / p.repetition_penalty)
        logits = logits.scatter(1, previous, seen)
    if p.temperature <= 0:
        return logits
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
    return logits


def next_token(logits: torch.Tensor, previous: torch.Tensor, p: SamplingParams, generator) -> torch.Tensor:
    """One token per row from the last position's logits [b, vocab]: argmax at temperature 0, else a
    draw; `generator` is one torch.Generator or a list of one per row."""
    logits = process_logits(logits, previous, p)
    if p.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(probs[i : i + 1], 1, generator=g)[:, 0] for i, g in enumerate(generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ---------------------------------------------------------------------- masked forward with a cache
def last_logits(model: NeoXModel, tokens, position_ids, key_valid, start: int, caches=None) -> torch.Tensor:
    """Logits [b, vocab] of the last position of `tokens` [b, s], which occupy slots start..start+s.

    key_valid [b, >= start+s]: False for padding slots. A query sees valid keys at or before its slot
    (and itself, so padding rows never softmax over nothing). Only the last position reaches the head.
    """
    sq = tokens.shape[1]
    mask = None
    if not bool(key_valid[:, : start + sq].all()) or (start > 0 and sq > 1):
        q_slots = torch.arange(start, start + sq, device=tokens.device)
        k_slots = torch.arange(start + sq, device=tokens.device)
        allowed = (k_slots[None, :] <= q_slots[:, None])[None] & key_valid[:, None, : start + sq]
        mask = (allowed | (k_slots[None, :] == q_slots[:, None])[None])[:, None]  # [b, 1, sq, sk]
    hidden = model.hidden_states(tokens, position_ids, kv_cache=caches, attention_mask=mask)
    return model.full_logits(hidden[:, -1:])[:, -1]


def _tp_size() -> int:
    return parallel.tp_size() if parallel_state.model_parallel_is_initialized() else 1


def _tp_rank() -> int:
    return parallel.tp_rank() if parallel_state.model_parallel_is_initialized() else 0


def _broadcast_from_tp_rank0(token: torch.Tensor) -> torch.Tensor:
    if _tp_size() > 1:
        dist.broadcast(token, src=parallel_state.get_tensor_model_parallel_src_rank(),
                       group=parallel_state.get_tensor_model_parallel_group())
    return token


# ---------------------------------------------------------------------- generation
StopFn = Callable[[int, list[int]], bool]


@torch.no_grad()
def generate(model: NeoXModel, prompts: list[list[int]], params: SamplingParams, eod: int | None = None,
             use_cache: bool = True, max_positions: int | None = None, batch_size: int = 8,
             stop: StopFn | None = None) -> tuple[list[list[int]], dict]:
    """Generated ids (prompt excluded, a final EOD included) for each prompt, and timing stats.

    Prompts run `batch_size` at a time, longest first to waste little padding. `stop(i, ids)` may end
    prompt i early (e.g. on a stop string). `use_cache=False` recomputes every position each step.
    """
    params.check()
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise UserError(f"prompt {i} is empty: give at least one token")
        if max_positions and len(prompt) + params.max_new_tokens > max_positions:
            raise UserError(f"prompt {i} of {len(prompt)} tokens + {params.max_new_tokens} new tokens exceeds "
                            f"seq-length {max_positions}; shorten the prompt or --max-new-tokens")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    started = time.perf_counter()
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        produced = _generate_batch(model, [prompts[i] for i in rows], rows, params, eod, use_cache, stop)
        for i, ids in zip(rows, produced):
            outputs[i] = ids
    seconds = time.perf_counter() - started
    new_tokens = sum(map(len, outputs))
    return outputs, {"new_tokens": new_tokens, "seconds": seconds,
                     "tokens_per_sec": new_tokens / seconds if seconds else 0.0}


def _generate_batch(model, prompts, indices, params, eod, use_cache, stop) -> list[list[int]]:
    device = next(model.parameters()).device
    b, width = len(prompts), max(map(len, prompts))
    total = width + params.max_new_tokens
    # Left padding repeats each row's first token: harmless under the mask and for the repetition penalty.
    tokens = torch.tensor([[p[0]] * (width - len(p)) + p for p in prompts], device=device)
    key_valid = torch.ones(b, total, dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        key_valid[row, : width - len(p)] = False
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    generators = [torch.Generator(device=device).manual_seed(params.seed + i) for i in indices]
    caches = model.new_kv_cache(capacity=total) if use_cache else None

    produced: list[list[int]] = [[] for _ in prompts]
    done = [False] * b
    step_tokens, start = tokens, 0
    for step in range(params.max_new_tokens):
        if use_cache:
            positions = (lengths + step - step_tokens.shape[1])[:, None] + torch.arange(step_tokens.shape[1], device=device)
            logits = last_logits(model, step_tokens, positions.clamp(min=0), key_valid, start, caches)
        else:
            positions = (torch.cumsum(key_valid[:, : tokens.shape[1]].long(), dim=1) - 1).clamp(min=0)
            logits = last_logits(model, tokens, positions, key_valid, 0)
        if _tp_rank() == 0:
            token = next_token(logits, tokens, params, generators)
        else:
            token = torch.empty(b, dtype=torch.long, device=device)
        token = _broadcast_from_tp_rank0(token)
        chosen = token.tolist()  # one device sync per step
        for row in range(b):
            if done[row]:
                continue
            produced[row].append(chosen[row])
            if (params.stop_on_eod and eod is not None and produced[row][-1] == eod) or \
                    (stop is not None and stop(indices[row], produced[row])):
                done[row] = True
        if all(done):
            break
        start += step_tokens.shape[1]
        step_tokens = token[:, None]
        tokens = torch.cat((tokens, step_tokens), dim=1)
    return produced


# ---------------------------------------------------------------------- prompts in, results out
def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts from a .jsonl file (objects with a "prompt" field) or a text file (one per non-empty line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--input-file {path}: no such file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"--input-file {path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f"--input-file {path}:{number}: expected an object with a string \"prompt\" field")
        prompts.append(record["prompt"])
    return prompts


def interactive_prompts(stream=None) -> Iterator[str | None]:
    """Lines from stdin until EOF, read on global rank 0 and broadcast so TP ranks decode together;
    yields None once at EOF."""
    stream = stream or sys.stdin
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    while True:
        line = None
        if not distributed or dist.get_rank() == 0:
            if sys.stdin.isatty():
                print("prompt> ", end="", file=sys.stderr, flush=True)
            raw = stream.readline()
            line = None if raw == "" else raw.rstrip("\n")
        if distributed:
            box = [line]
            dist.broadcast_object_list(box, src=0)
            line = box[0]
        if line is None:
            return
        if line.strip():
            yield line


def result_record(prompt, ids: list[int], tokenizer, eod: int | None) -> dict:
    """The JSON written per prompt: the prompt, the generated ids (a final EOD included) and their text."""
    text_ids = ids[:-1] if ids and eod is not None and ids[-1] == eod else ids
    text = tokenizer.decode(text_ids) if tokenizer is not None else None
    return {"prompt": prompt, "token_ids": ids, "text": text}


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with checkpoint.atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
