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
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from neox_fork.checkpoint import store as checkpoint
from neox_fork.parallel import groups as parallel
from neox_fork.config.dtypes import torch_dtype
from neox_fork.errors import UserError
from neox_fork.model.transformer import NeoXModel, build_model

log = logging.getLogger("neox_fork")


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
                       trust: bool = False, tp: int | None = None):
    """(model, config, tokenizer or None) for this process.

    One process (the default): the checkpoint's TP shards are merged into a TP=1 model. With
    `tp_cooperate` (default: when launched with WORLD_SIZE > 1) the ranks form tensor-parallel groups of
    `tp` (default: the whole world; further groups are data-parallel replicas that compute the same):
    each rank loads its own `mp_rank_XX` shard, re-split from the merged state only when the checkpoint
    was saved at another TP size.
    """
    if tp_cooperate is None:
        tp_cooperate = int(os.environ.get("WORLD_SIZE", "1")) > 1
    folder = checkpoint.resolve(ckpt_path, step)
    config = checkpoint.load_config_of(folder)
    if tp_cooperate:
        parallel.init_distributed()
        tp = tp or dist.get_world_size()
        parallel.initialize(tp)
        state = checkpoint.load_rank_shard(folder, tp, parallel.tp_rank(), trust)
    else:
        tp = 1
        parallel.initialize(1)
        state, _, _ = checkpoint.load_merged(folder, trust=trust)  # a LoRA folder: base + adapters
    source = checkpoint.tokenizer_of(folder, config)
    tokenizer = source.build() if source else None
    if config.context_parallel_size > 1:  # the weights do not depend on it (every CP rank holds them whole)
        log.info("%s was trained at context_parallel_size %d; generation and evaluation run each sequence whole "
                 "(context_parallel_size 1): further ranks are copies", folder, config.context_parallel_size)
    # the run's config at this TP size (and context parallel size 1), with the padded vocabulary the weights were
    # saved with
    config = replace(config, model_parallel_size=tp, context_parallel_size=1, make_vocab_size_divisible_by=1,
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


# ---------------------------------------------------------------------- chat
def chat_replies(model: NeoXModel, chat_tokenizer, conversations: list[list[dict]], params: SamplingParams,
                 use_cache: bool = True, max_positions: int | None = None,
                 batch_size: int = 8) -> tuple[list[dict], dict]:
    """The model's next turn in each conversation (lists of {"role", "content"} messages) through the chat
    template of `chat_tokenizer` (a transformers tokenizer, data.chat.checkpoint_chat_tokenizer): the rendered
    conversation and generation prompt are the prompt, and sampling stops at an end-of-turn token
    (data.chat.end_of_turn_ids) unless params.stop_on_eod is off. Returns ({"token_ids", "text"} per
    conversation, stats); the ids end with the end-of-turn token when one came, the text is the reply alone."""
    from neox_fork.data.chat import chat_prompt_ids, end_of_turn_ids

    stops = set(end_of_turn_ids(chat_tokenizer))
    prompts = [chat_prompt_ids(chat_tokenizer, messages) for messages in conversations]
    stop = (lambda i, ids: ids[-1] in stops) if params.stop_on_eod else None
    outputs, stats = generate(model, prompts, params, eod=None, use_cache=use_cache, max_positions=max_positions,
                              batch_size=batch_size, stop=stop)
    return [{"token_ids": ids, "text": reply_text(ids, chat_tokenizer, stops)} for ids in outputs], stats


def reply_text(ids: list[int], chat_tokenizer, stops) -> str:
    """A reply's text: without the end-of-turn token that ended it and without special tokens or the
    whitespace around it."""
    body = ids[:-1] if ids and ids[-1] in stops else ids
    return chat_tokenizer.decode(body, skip_special_tokens=True).strip()


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


# ---------------------------------------------------------------------- upstream's config-driven sampling
TEXT_GEN_TYPES = ("unconditional", "input-file", "interactive")
NO_TEXT = "no text generated: the first token sampled was the end-of-document token"


def config_sampling(c) -> SamplingParams:
    """SamplingParams from a config's text-generation keys, with upstream's meanings: greedy only when
    temperature, top_k and top_p are all 0; temperature 0 with top_k or top_p set samples unscaled; top_p 0
    is no nucleus filter. Prompt i samples with seed `c.seed + i`."""
    checks = {"maximum_tokens": c.maximum_tokens >= 1, "temperature": c.temperature >= 0,
              "top_p": 0 <= c.top_p <= 1, "top_k": c.top_k >= 0, "num_samples": c.num_samples >= 1}
    valid = {"maximum_tokens": "at least 1", "temperature": ">= 0", "top_p": "in [0, 1] (0 disables it)",
             "top_k": ">= 0 (0 disables it)", "num_samples": "at least 1"}
    for key, ok in checks.items():
        if not ok:
            raise UserError(f"{c.where(key)}: {key} {getattr(c, key)!r} must be {valid[key]}")
    greedy = c.temperature == 0 and c.top_k == 0 and c.top_p == 0
    return SamplingParams(max_new_tokens=c.maximum_tokens, temperature=0.0 if greedy else (c.temperature or 1.0),
                          top_p=c.top_p or 1.0, top_k=c.top_k, seed=c.seed)


def config_prompts(c) -> list[str]:
    """The contexts `text_gen_type` asks for: num_samples empty ones (unconditional), or sample_input_file
    split at prompt_end, each stripped, empty ones dropped (input-file)."""
    if c.text_gen_type == "unconditional":
        return [""] * c.num_samples
    if not c.sample_input_file:
        raise UserError(f"{c.where('text_gen_type')}: text_gen_type input-file needs sample_input_file "
                        "(a config key, or -i FILE)")
    path = Path(c.sample_input_file)
    if not path.is_file():
        raise UserError(f"{c.where('sample_input_file')}: sample_input_file {path}: no such file")
    if not c.prompt_end:
        raise UserError(f"{c.where('prompt_end')}: prompt_end must not be empty")
    prompts = [p.strip() for p in path.read_text(encoding="utf-8").split(c.prompt_end)]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserError(f"{c.where('sample_input_file')}: sample_input_file {path} holds no prompts")
    return prompts


def sample_record(context: str, ids: list[int], tokenizer, eod: int | None, seconds: float) -> dict:
    """Upstream's record of one sample: the context, the completion's text and token count (a final EOD
    not counted), whether it ended on EOD, a message (null, or why there is no text) and the seconds
    its batch took."""
    finished = bool(ids) and eod is not None and ids[-1] == eod
    completion = ids[:-1] if finished else ids
    return {"context": context, "text": tokenizer.decode(completion) if completion else None,
            "length": len(completion), "finished": finished, "message": None if completion else NO_TEXT,
            "duration_seconds": float(seconds)}


def generate_from_config(c, step: int | None = None, trust: bool = False, batch_size: int = 8, out=None) -> list[dict]:
    """What upstream's generate.py does with a config: sample as `text_gen_type` says from the checkpoint in
    `load` and write the records (jsonl) to sample_output_file on global rank 0 (input-file without one:
    SAMPLE_INPUT_FILE.output.jsonl; interactive prints each completion and writes nothing). Under a launcher
    (WORLD_SIZE > 1) the ranks form tensor-parallel groups of model_parallel_size. Returns the records."""
    if c.text_gen_type not in TEXT_GEN_TYPES:
        hint = " (upstream's precompute is not built)" if c.text_gen_type == "precompute" else ""
        raise UserError(f"{c.where('text_gen_type')}: text_gen_type {c.text_gen_type!r} is not supported{hint}; "
                        f"valid: {', '.join(TEXT_GEN_TYPES)}")
    if not c.load:
        raise UserError("no checkpoint: set `load` in a config (the folder training saved to)")
    params = config_sampling(c)
    prompts = [] if c.text_gen_type == "interactive" else config_prompts(c)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    model, mconfig, tokenizer = load_for_inference(c.load, step, tp_cooperate=launched, trust=trust,
                                                   tp=c.model_parallel_size if launched else None)
    if tokenizer is None:
        raise UserError(f"checkpoint {c.load} has no tokenizer.json and its config names no vocab-file that exists; "
                        "generation from a config needs the tokenizer the model was trained with")
    lead = not dist.is_initialized() or dist.get_rank() == 0
    out = out or sys.stdout

    def run(texts: list[str]) -> list[dict]:
        records = []
        for first in range(0, len(texts), batch_size):
            chunk = texts[first : first + batch_size]
            encoded = [tokenizer.encode(t) if t else [tokenizer.eod] for t in chunk]
            # as upstream, a long context gets fewer new tokens rather than an error
            room = [min(params.max_new_tokens, mconfig.max_positions - len(ids)) for ids in encoded]
            if min(room) < 1:
                i = room.index(min(room))
                raise UserError(f"prompt {first + i + 1} has {len(encoded[i])} tokens: no room to generate within "
                                f"seq_length {mconfig.max_positions}; shorten it")
            # one batch when every context has room for maximum_tokens, else one call per context (each keeps
            # its seed, c.seed + its index)
            calls = [range(len(chunk))] if len(set(room)) == 1 else [range(i, i + 1) for i in range(len(chunk))]
            outputs: list = [None] * len(chunk)
            for rows in calls:
                got, stats = generate(model, [encoded[i] for i in rows],
                                      replace(params, max_new_tokens=room[rows[0]], seed=params.seed + first + rows[0]),
                                      eod=tokenizer.eod, use_cache=not c.recompute, max_positions=mconfig.max_positions,
                                      batch_size=batch_size)
                for i, ids in zip(rows, got):
                    outputs[i] = (ids, stats["seconds"])
            records += [sample_record(t, ids, tokenizer, tokenizer.eod, s) for t, (ids, s) in zip(chunk, outputs)]
        return records

    if c.text_gen_type == "interactive":
        records = []
        for text in interactive_prompts():
            records += run([text])
            if lead:
                print(records[-1]["text"] or "", file=out, flush=True)
        return records
    records = run(prompts)
    target = c.sample_output_file or (f"{c.sample_input_file}.output.jsonl" if c.text_gen_type == "input-file" else None)
    if lead and target:
        write_jsonl(target, records)
    if lead:
        print(f"[{len(records)} samples ({c.text_gen_type}) from {c.load}"
              + (f" written to {target}]" if target else "]"), file=sys.stderr, flush=True)
    return records
