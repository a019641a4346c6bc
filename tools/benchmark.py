#!/usr/bin/env python
"""Training-step throughput (tokens/s, MFU, peak memory) on random tokens, optionally against transformers.

    python tools/benchmark.py --config configs/tiny.yml --compare hf
    python tools/benchmark.py --config configs/stablelm-3b-4e1t.yml --micro-batch 4 --compare hf --json

See docs/performance.md for the method and the measured numbers.
"""

import sys


from neox_fork.benchmark import main
from neox_fork.errors import exit_on_user_error

if __name__ == "__main__":
    sys.exit(exit_on_user_error(main)())
