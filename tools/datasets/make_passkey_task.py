#!/usr/bin/env python
"""Write passkey-retrieval tasks (lm-eval YAML + jsonl) for eval.py, offline and deterministically, with the
prompt lengths measured in the tokens of the model's tokenizer. The shipped tasks/passkey/ is
    python tools/datasets/make_passkey_task.py --vocab-file .venv/share/tokenizers/gpt-neox-20b/tokenizer.json \
        --output-dir tasks/passkey
(GPT-NeoX-20B's tokenizer, StableLM-3B-4E1T's). For a model with another tokenizer or other lengths, e.g. the
tiny demo model:
    python tools/datasets/make_passkey_task.py --vocab-file data/demo/tokenizer.json --lengths 256 1024 \
        --output-dir data/passkey_demo
    python eval.py --checkpoint checkpoints/tiny-16k --include-path data/passkey_demo --tasks passkey
Tasks: passkey_{1k,4k,...} (loglikelihood of the key against distractors, acc), passkey_gen_{...} (greedy
digits, exact_match) and the groups passkey and passkey_gen over all lengths. See docs/long-context.md.
"""

import argparse
from pathlib import Path

from neox_fork.data.tokenizer import build_tokenizer
from neox_fork.errors import exit_on_user_error
from neox_fork.inference.passkey import DEPTHS, LENGTHS, write_passkey_tasks


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-file", required=True, help="the model's tokenizer.json (HFTokenizer)")
    p.add_argument("--output-dir", required=True, help="task folder to write (eval.py --include-path)")
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS),
                   help="prompt + answer tokens, at most (default: %(default)s)")
    p.add_argument("--depths", type=float, nargs="+", default=list(DEPTHS),
                   help="where the key sits in the filler, 0 (start) to 1 (end) (default: %(default)s)")
    p.add_argument("--per-depth", type=int, default=5, help="samples per length and depth (default: 5)")
    p.add_argument("--distractors", type=int, default=9, help="wrong keys per sample (default: 9: chance 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-generate", dest="generate", action="store_false", help="skip the passkey_gen_* tasks")
    args = p.parse_args(argv)
    tokenizer = build_tokenizer("HFTokenizer", args.vocab_file)
    names = write_passkey_tasks(tokenizer.encode, args.output_dir, args.lengths, args.depths, args.per_depth,
                                args.distractors, args.seed, args.generate, tokenizer_name=f"{Path(args.vocab_file).parent.name}/{Path(args.vocab_file).name}")
    print(f"wrote {', '.join(names)} to {args.output_dir}")


if __name__ == "__main__":
    main()
