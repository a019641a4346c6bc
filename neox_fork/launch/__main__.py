"""`python -m neox_fork.launch rank|watch|finished ...`: the per-rank entry deepy starts and the
`finished` check of slurm/common.sh (neox_fork/launch/launcher.py)."""

import sys

from neox_fork.launch.launcher import _main

sys.exit(_main(sys.argv[1:]))
