#!/usr/bin/env python
"""Tokenize chat conversations with a Hugging Face chat template into token and label files for
supervised fine-tuning (GPT-NeoX's tool of the same name and flags).

Each input line is a JSON object whose --jsonl-keys hold lists of {"role": ..., "content": ...}
messages. Example:
    python tools/datasets/preprocess_data_with_chat_template.py --input chats.jsonl \
        --output-prefix data/sft/chats --tokenizer-path path/to/hf-tokenizer-folder --jsonl-keys messages
writes data/sft/chats_messages_document.bin/.idx (token ids) and data/sft/chats_messages_label_document.bin/.idx
(the token's id where it is trained, -100 where not); train with
    train_data_paths: [data/sft/chats_messages_document]
    train_label_data_paths: [data/sft/chats_messages_label_document]
See docs/post-training.md.
"""

import argparse

from neox_fork.data.chat import DEFAULT_KEY, ChatOptions, preprocess_chat
from neox_fork.data.pipeline import check_dataset_impl, print_report
from neox_fork.data.preprocess import split_input_list
from neox_fork.errors import exit_on_user_error


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True,
                       help="files or globs (.jsonl, .jsonl.gz, .jsonl.zst); a comma-separated list also works")
    group.add_argument("--jsonl-keys", nargs="+", default=[DEFAULT_KEY],
                       help="keys holding conversations, one set of output files each (default: conversation)")
    group.add_argument("--generation-role", default="assistant",
                       help="the role whose turns are trained (default: assistant)")
    group.add_argument("--only-last", action="store_true", help="train on the last turn only")
    group.add_argument("--no-mask", action="store_true", help="train on every token, no end-of-sequence added")
    group.add_argument("--for-rm", action="store_true",
                       help="reward-model data: mask everything but a final end-of-sequence token")
    group.add_argument("--reward-key", default=None, help="key holding each record's reward (a number)")
    group.add_argument("--binary-reward", action="store_true", help="the reward is the key's truth: +1 or -1")
    group.add_argument("--num-docs", type=int, default=None, help="records in the input, for the progress bar")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-path", required=True, help="a Hugging Face tokenizer folder with a chat template")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="writes PREFIX_{key}_document and PREFIX_{key}_label_document .bin/.idx")
    group.add_argument("--dataset-impl", default="mmap", help="only mmap (upstream also names lazy, cached)")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizing processes (output is the same for any)")
    group.add_argument("--log-interval", type=int, default=100, help="refresh the progress bar every N records")
    group.add_argument("--max-bad-fraction", type=float, default=0.01,
                       help="fail (writing nothing) if more than this fraction of records is malformed")
    group.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    check_dataset_impl(args.dataset_impl)
    options = ChatOptions(
        generation_role=args.generation_role,
        only_last=args.only_last,
        no_mask=args.no_mask,
        for_rm=args.for_rm,
        reward_key=args.reward_key,
        binary_reward=args.binary_reward,
    )
    result = preprocess_chat(
        split_input_list(args.input),
        args.output_prefix,
        args.tokenizer_path,
        jsonl_keys=args.jsonl_keys,
        options=options,
        workers=args.workers,
        max_bad_fraction=args.max_bad_fraction,
        progress=not args.no_progress,
        num_docs=args.num_docs,
        log_interval=args.log_interval,
    )
    print_report(result, "conversations")


if __name__ == "__main__":
    main()
