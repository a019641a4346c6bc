"""User-facing errors: one clear line, no traceback.

Anything a user can get wrong (a config key, a path, a size that does not divide) raises `UserError`
with a message naming the file, key or value and what would be valid. Entry points catch it through
`exit_on_user_error` and print just that line.
"""

import functools
import sys


class UserError(Exception):
    """A mistake in user input; its message is the whole report."""


def exit_on_user_error(main):
    """Wrap an entry point so that a `UserError` prints `error: MESSAGE` and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
