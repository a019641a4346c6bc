#!/usr/bin/env python
"""Sample from a neox_fork checkpoint.

    python generate.py --checkpoint CKPT_DIR --prompt "The meaning of life" --max-new-tokens 32
    python generate.py --checkpoint CKPT_DIR --prompt-ids 1,2,3 --temperature 0 --json
"""

import argparse
import json
import sys

from neox_fork.errors import UserError, exit_on_user_error
from neox_fork.generation import SamplingParams, generate, load_for_inference


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (with 'latest') or a global_stepN folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a tokenizer saved with the checkpoint)")
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    p.add_argument("--json", action="store_true", help="print one JSON object with token_ids and text")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    model, config, tokenizer = load_for_inference(args.checkpoint, dtype=args.dtype)
    if args.prompt is not None:
        if tokenizer is None:
            raise UserError(f"checkpoint {args.checkpoint} has no tokenizer; pass --prompt-ids instead of --prompt")
        prompt = tokenizer.encode(args.prompt)
    else:
        try:
            prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise UserError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                            args.repetition_penalty, args.seed)
    (ids,), stats = generate(model, [prompt], params, eod=tokenizer.eod if tokenizer else None,
                             use_cache=not args.no_cache, max_positions=config.max_positions)
    text = tokenizer.decode(ids) if tokenizer else None
    if args.json:
        print(json.dumps({"token_ids": ids, "text": text, "tokens_per_sec": stats["tokens_per_sec"]}))
    else:
        print((args.prompt or "") + (text if text is not None else " ".join(map(str, ids))))
        print(f"[{stats['new_tokens']} tokens, {stats['tokens_per_sec']:.1f} tokens/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
