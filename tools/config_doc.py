#!/usr/bin/env python
"""Write docs/config.md from the config class (`--check`: exit 1 if the committed page differs)."""

import argparse
import sys
from pathlib import Path

from neox_fork.config.doc import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is out of date; run python tools/config_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
