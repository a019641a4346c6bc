#!/usr/bin/env python
"""Export a checkpoint as a Hugging Face folder, with upstream gpt-neox's flags (--input_dir --config_file
--output_dir --precision --architecture --no_save_tokenizer --vocab-is-hf-tokenizer --pad-token-id) and ours
(see neox_fork/checkpoint/hf_cli.py; tools/convert_to_hf.py is the same program)."""

from neox_fork.checkpoint.hf_cli import export_main as main

if __name__ == "__main__":
    main()
