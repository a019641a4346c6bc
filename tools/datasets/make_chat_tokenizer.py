#!/usr/bin/env python
"""Write a Hugging Face tokenizer folder with a chat template, for
tools/datasets/preprocess_data_with_chat_template.py --tokenizer-path, from a tokenizer.json (such as
the demo corpus's) and a Jinja template file. Example (the demo chat set):
    python tools/datasets/make_chat_tokenizer.py --vocab-file data/demo/tokenizer.json \
        --chat-template examples/chat/chat_template.jinja --output-dir data/demo/chat_tokenizer
"""

import argparse

from neox_fork.data.chat import write_chat_tokenizer
from neox_fork.data.tokenizer import EOD_TOKEN
from neox_fork.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-file", required=True, help="tokenizer.json")
    parser.add_argument("--chat-template", required=True, help="a Jinja chat template file")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--eos-token", default=EOD_TOKEN, help=f"the end-of-sequence token (default: {EOD_TOKEN})")
    args = parser.parse_args(argv)
    print(f"wrote {write_chat_tokenizer(args.vocab_file, args.chat_template, args.output_dir, args.eos_token)}")


if __name__ == "__main__":
    main()
