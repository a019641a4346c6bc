#!/usr/bin/env python
"""What a checkpoint's files hold, or how two checkpoints differ, with upstream gpt-neox's flags (DIR
--attributes --interactive --compare --diff); see neox_fork/checkpoint/inspection.py."""

from neox_fork.checkpoint.inspection import main

if __name__ == "__main__":
    main()
