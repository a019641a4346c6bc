#!/usr/bin/env python
"""Import a Hugging Face GPTNeoX (Pythia), Llama, Mistral, StableLm or Mixtral folder as a neox_fork checkpoint, with upstream
gpt-neox's flags (--model --model_path --tp --pp) and ours (--hf-dir --output-dir --tp); see neox_fork/checkpoint/hf_cli.py.

Train from it with `load: CKPT_DIR` and `finetune: true` in your config.
"""

from neox_fork.checkpoint.hf_cli import import_main as main

if __name__ == "__main__":
    main()
