#!/usr/bin/env python
"""Export a checkpoint as a Hugging Face folder; the same program as tools/ckpts/convert_neox_to_hf.py, whose
upstream flag spellings it also takes (see neox_fork/checkpoint/hf_cli.py)."""

from neox_fork.checkpoint.hf_cli import export_main as main

if __name__ == "__main__":
    main()
