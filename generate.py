#!/usr/bin/env python
"""Sample from a neox_fork checkpoint, as GPT-NeoX's generate.py does or with flags.

    python deepy.py generate.py -d configs 125M.yml local_setup.yml text_generation.yml   # upstream's way
    python generate.py CONFIG.yml [MORE.yml ...] [-i PROMPTS.txt] [-o OUT.jsonl] [--iteration N]

With config files, the checkpoint is `load` and the text-generation keys say what to do: text_gen_type
unconditional (num_samples), input-file (sample_input_file, prompts split at prompt_end) or interactive;
maximum_tokens, temperature, top_k, top_p, recompute. One JSON record per sample (context, text, length,
finished, message, duration_seconds) goes to sample_output_file. Without config files:

    python generate.py --checkpoint CKPT --prompt "The meaning of life" --max-new-tokens 32
    python generate.py --checkpoint CKPT --prompt "One" --prompt "Two words" --temperature 0.7 --seed 1
    python generate.py --checkpoint CKPT --prompt-ids 1,2,3 --temperature 0 --json
    python generate.py --checkpoint CKPT --input-file prompts.jsonl --output-file out.jsonl --batch-size 8
    python generate.py --checkpoint CKPT --interactive            # one prompt per stdin line, until EOF
    python generate.py --checkpoint CKPT --chat --prompt "What colour is the sky?"   # a chat model's reply
    python generate.py --checkpoint CKPT --chat --interactive     # a conversation: one user turn per line
    torchrun --nproc_per_node 2 generate.py --checkpoint CKPT --prompt "Hi"   # TP ranks cooperate

--input-file takes .jsonl (objects with a "prompt" field) or plain text (one prompt per line);
--output-file writes jsonl records {prompt, token_ids, text}. Generation stops at the tokenizer's EOD.
--chat (a checkpoint trained on chat data keeps its chat template, see docs/post-training.md): each prompt is
a user turn (after --system, if given) rendered with the template and its generation prompt; generation stops
at the template's end-of-turn token and only the reply is printed. Interactively, the turns accumulate.
"""

import argparse
import json
import sys

import torch.distributed as dist

from neox_fork.checkpoint import store as checkpoint
from neox_fork.config.loading import load_config
from neox_fork.data.chat import checkpoint_chat_tokenizer
from neox_fork.errors import UserError, exit_on_user_error
from neox_fork.inference.generation import (SamplingParams, chat_replies, generate, generate_from_config, interactive_prompts,
                                  load_for_inference, read_prompt_file, result_record, write_jsonl)
from neox_fork.checkpoint.safe_unpickle import add_trust_argument


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", help="NeoX YAML configs with text-generation keys (upstream's way)")
    p.add_argument("--checkpoint", help="checkpoint folder (with 'latest') or a global_stepN folder; "
                                        "with configs: instead of load")
    p.add_argument("--step", "--iteration", dest="step", type=int, help="read global_stepN instead of 'latest'")
    p.add_argument("-i", "--sample_input_file", help="with configs: instead of the sample_input_file key")
    p.add_argument("-o", "--sample_output_file", help="with configs: instead of the sample_output_file key")
    add_trust_argument(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch; needs the checkpoint's tokenizer)")
    src.add_argument("--prompt-ids", action="append", help="comma-separated token ids (repeat for a batch)")
    src.add_argument("--input-file", help=".jsonl with a 'prompt' field per line, or a text file of one prompt per line")
    src.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line, until EOF")
    p.add_argument("--output-file", help="write jsonl records {prompt, token_ids, text}")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (left padded)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    p.add_argument("--no-stop-on-eod", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--tp-cooperate", action="store_true",
                   help="every launched rank holds one tensor-parallel shard (default when WORLD_SIZE > 1)")
    p.add_argument("--chat", action="store_true",
                   help="prompts are user turns of a chat: apply the checkpoint's chat template, stop at its "
                        "end-of-turn token, print only the reply")
    p.add_argument("--system", help="with --chat: a system message before the first user turn")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt with token_ids and text")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def encode_prompts(args, tokenizer) -> list:
    """(shown prompt, token ids) pairs for --prompt / --prompt-ids / --input-file."""
    if args.prompt_ids:
        pairs = []
        for text in args.prompt_ids:
            try:
                pairs.append((text, [int(t) for t in text.split(",") if t.strip()]))
            except ValueError:
                raise UserError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
        return pairs
    texts = args.prompt if args.prompt else read_prompt_file(args.input_file)
    return [(text, encode_text(text, tokenizer, args.checkpoint)) for text in texts]


def encode_text(text, tokenizer, ckpt):
    if tokenizer is None:
        raise UserError(f"checkpoint {ckpt} has no tokenizer.json and its config names no vocab-file that exists; "
                        "pass --prompt-ids instead of text prompts")
    return tokenizer.encode(text)


def show(records, as_json: bool) -> None:
    for r in records:
        if as_json:
            print(json.dumps({"token_ids": r["token_ids"], "text": r["text"]}), flush=True)
        else:
            shown = r["text"] if r["text"] is not None else " ".join(map(str, r["token_ids"]))
            prompt = r["prompt"] if isinstance(r["prompt"], str) else ""
            print(prompt + shown + "\n", flush=True)


def chat(args, model, chat_tokenizer, params, options, lead):
    """--chat: each prompt a user turn (one conversation per prompt; interactively, one growing conversation);
    prints each reply alone. Returns (records, new tokens, seconds)."""
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    options = dict(options)
    del options["eod"]
    records, new_tokens, seconds = [], 0, 0.0
    if args.interactive:
        history = list(system)
        for text in interactive_prompts():
            turn = history + [{"role": "user", "content": text}]
            try:
                (reply,), stats = chat_replies(model, chat_tokenizer, [turn], params, **options)
            except UserError as err:  # a turn that no longer fits does not end the session
                if lead:
                    print(f"error: {err}", file=sys.stderr, flush=True)
                continue
            history = turn + [{"role": "assistant", "content": reply["text"]}]
            new_tokens, seconds = new_tokens + stats["new_tokens"], seconds + stats["seconds"]
            records.append({"prompt": text, **reply})
            if lead:
                print(json.dumps(reply) if args.json else reply["text"], flush=True)
        return records, new_tokens, seconds
    texts = args.prompt if args.prompt else read_prompt_file(args.input_file)
    if not texts:
        raise UserError(f"--input-file {args.input_file}: holds no prompts")
    replies, stats = chat_replies(model, chat_tokenizer, [system + [{"role": "user", "content": t}] for t in texts],
                                  params, **options)
    records = [{"prompt": text, **reply} for text, reply in zip(texts, replies)]
    if lead and not args.output_file:
        for reply in replies:
            print(json.dumps(reply) if args.json else reply["text"], flush=True)
    return records, stats["new_tokens"], stats["seconds"]


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    prompted = args.prompt or args.prompt_ids or args.input_file or args.interactive
    if args.configs and args.chat:
        raise UserError("--chat works with --checkpoint and prompts, not with config files (text_gen_type)")
    if args.configs and prompted:
        raise UserError("give prompts either through the configs' text_gen_type or with --prompt/--prompt-ids/"
                        "--input-file/--interactive, not both")
    if args.configs:
        overrides = {k: getattr(args, k) for k in ("sample_input_file", "sample_output_file") if getattr(args, k)}
        if args.checkpoint:
            overrides["load"] = args.checkpoint
        config = load_config(*args.configs, overrides=overrides)
        generate_from_config(config, args.step, trust=args.trust_checkpoint or config.trust_checkpoint,
                             batch_size=args.batch_size)
        return
    if not args.checkpoint or not prompted:
        raise UserError("pass config files (upstream's way), or --checkpoint DIR with one of --prompt, --prompt-ids, "
                        "--input-file, --interactive")
    if args.chat and args.prompt_ids:
        raise UserError("--chat takes text (--prompt, --input-file, --interactive), not --prompt-ids")
    if args.system is not None and not args.chat:
        raise UserError("--system needs --chat")
    chat_tokenizer = None
    if args.chat:  # before loading the weights: a checkpoint without a chat template is one line at once
        folder = checkpoint.resolve(args.checkpoint, args.step)
        chat_tokenizer = checkpoint_chat_tokenizer(checkpoint.tokenizer_of(folder, checkpoint.load_config_of(folder)),
                                                   args.checkpoint)
    model, config, tokenizer = load_for_inference(args.checkpoint, args.step, args.dtype,
                                                  tp_cooperate=args.tp_cooperate or None,
                                                  trust=args.trust_checkpoint)
    lead = not dist.is_initialized() or dist.get_rank() == 0
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                            args.repetition_penalty, args.seed, stop_on_eod=not args.no_stop_on_eod)
    params.check()
    eod = tokenizer.eod if tokenizer else None
    options = dict(eod=eod, use_cache=not args.no_cache, max_positions=config.max_positions,
                   batch_size=args.batch_size)
    records, new_tokens, seconds = [], 0, 0.0

    if args.chat:
        records, new_tokens, seconds = chat(args, model, chat_tokenizer, params, options, lead)
    elif args.interactive:
        for text in interactive_prompts():
            try:
                (ids,), stats = generate(model, [encode_text(text, tokenizer, args.checkpoint)], params, **options)
            except UserError as err:  # one bad line does not end the session
                if lead:
                    print(f"error: {err}", file=sys.stderr, flush=True)
                continue
            new_tokens, seconds = new_tokens + stats["new_tokens"], seconds + stats["seconds"]
            records.append(result_record(text, ids, tokenizer, eod))
            if lead:
                show(records[-1:], args.json)
    else:
        pairs = encode_prompts(args, tokenizer)
        if not pairs:
            raise UserError(f"--input-file {args.input_file}: holds no prompts")
        outputs, stats = generate(model, [ids for _, ids in pairs], params, **options)
        new_tokens, seconds = stats["new_tokens"], stats["seconds"]
        records = [result_record(shown, ids, tokenizer, eod) for (shown, _), ids in zip(pairs, outputs)]
        if lead and not args.output_file:
            show(records, args.json)
    if lead:
        if args.output_file:
            write_jsonl(args.output_file, records)
        rate = new_tokens / seconds if seconds else 0.0
        print(f"[{len(records)} prompts, {new_tokens} new tokens in {seconds:.2f} s: {rate:.1f} tokens/s]",
              file=sys.stderr)


if __name__ == "__main__":
    main()
