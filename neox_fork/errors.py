"""User-facing errors: one clear line, no traceback; and how a failing process ends.

Anything a user can get wrong (a config key, a path, a size that does not divide) raises `UserError`
with a message naming the file, key or value and what would be valid. Entry points catch it through
`exit_on_user_error` and print just that line.

A full filesystem is one such line too, from every writer (checkpoints, data, exports, results):
`full_disk_is_one_line` turns ENOSPC/EDQUOT, and the errno-less failures of torch's zip writer
("unexpected pos ...") when the filesystem has no room left, into a UserError naming the path and the
free space, after the writer's own cleanup ran.

A training rank (train.py) ends through `exit_on_rank_failure`: whatever fails (a step, a save, an
evaluation, a data-loader worker), it prints its error, tells deepy the cause (ERROR_FILE_ENV), kills its
data-loader workers and exits at once, never waiting on a peer or a worker.
"""

import contextlib
import errno
import functools
import gc
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path


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


# ---------------------------------------------------------------------- a full filesystem
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_WORDS = ("no space left on device", "disk quota exceeded", "os error 28)", "os error 122)")
# torch's zip writer (PyTorchStreamWriter) reports a short write without its errno
_WRITER_WORDS = ("unexpected pos", "file write failed", "iostream error", "failed writing")
LOW_SPACE_BYTES = 16 << 20  # after such a failure, less free space than this means the write ran out of room


def free_bytes(path) -> int | None:
    """Free space, for this user, on the filesystem that holds `path` (or would: its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def size_text(n: int | float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


def disk_is_full(err: BaseException, path) -> bool:
    """Whether `err`, raised while writing under `path`, means that filesystem ran out of space."""
    if not isinstance(err, Exception) or isinstance(err, UserError):
        return False
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
            return True
        text = str(err).lower()
        if any(w in text for w in _FULL_WORDS):
            return True
        if any(w in text for w in _WRITER_WORDS):
            free = free_bytes(path)
            if free is not None and free < LOW_SPACE_BYTES:
                return True
        err = err.__cause__ or err.__context__
    return False


def full_disk_message(path, needed=None, note="") -> str:
    """`PATH: the filesystem is full ...; WHAT needs about N, M free there; NOTE`; `needed` (bytes, what) and
    `note` may be given as functions returning them."""
    needed = needed() if callable(needed) else needed
    note = note() if callable(note) else note
    free = size_text(free_bytes(path))
    room = f"{needed[1]} needs about {size_text(needed[0])}, {free} free there" if needed else f"{free} free there"
    return f"{path}: the filesystem is full (no space left on device); {room}" + (f"; {note}" if note else "")


@contextlib.contextmanager
def full_disk_is_one_line(path, *, cleanup=None, needed=None, note=""):
    """Run a writer of files under `path`; on any failure run `cleanup` (which removes what it half wrote), and
    when the failure was a full filesystem raise one UserError line instead (free space measured after cleanup).
    `needed` is (bytes, what) for the message, e.g. (3_000_000, "one checkpoint")."""
    try:
        yield
    except BaseException as err:
        full = disk_is_full(err, path)
        if cleanup is not None:
            cleanup()
        if not full:
            raise
        _release(err)
        raise UserError(full_disk_message(path, needed, note)) from None


def _release(err: BaseException) -> None:
    """Close what the failed writer left open (its file, held by the traceback's frames), so that the blocks
    of the files `cleanup` removed count as free."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        err = err.__cause__ or err.__context__
    gc.collect()


# ---------------------------------------------------------------------- a failing training rank
ERROR_FILE_ENV = "NEOX_FORK_ERROR_FILE"  # set by deepy per rank: where a failing rank writes its cause
END_WORKERS_SECONDS = 5.0


def report_failure(cause: str) -> None:
    """Leave this rank's one-line cause (and when it failed) where deepy's supervisor reads it, if it asked."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps({"time": time.time(), "cause": cause}))


def end_now(status: int) -> None:
    """Kill the multiprocessing children this process still has (data-loader workers not ended yet) and exit
    with `status` without waiting on anything else (a collective a dead peer will never join, a stuck
    communicator's destructor)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # deepy's SIGTERM to the other ranks must not interrupt this
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise about the workers killed here
    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    deadline = time.monotonic() + END_WORKERS_SECONDS
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
    logging.shutdown()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)


def _cause(err: BaseException) -> str:
    """`Type: first line` of an exception; a data-loader worker's re-raised one names the original's last line."""
    lines = str(err).strip().splitlines() or [""]
    if "Original Traceback" in str(err):
        return f"{lines[-1]} (in a data-loader worker)"
    return f"{type(err).__name__}: {lines[0]}".rstrip(": ")


def exit_on_rank_failure(main):
    """Wrap the per-rank entry point: a UserError prints `error: MESSAGE` (status 2), any other exception
    its traceback (status 1), a second Ctrl-C a line (status 130); then the rank ends at once (end_now)
    with that status, after telling deepy the cause (report_failure)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except SystemExit:
            raise  # argparse, or an exit the program chose
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            cause, status = str(err), 2
        except KeyboardInterrupt:
            print("error: interrupted (a second SIGINT): stopped without saving", file=sys.stderr, flush=True)
            cause, status = "interrupted (a second SIGINT)", 128 + signal.SIGINT
        except BaseException as err:  # noqa: BLE001 - every failure ends the rank the same way
            traceback.print_exc()
            cause, status = _cause(err), 1
        report_failure(cause)
        end_now(status)

    return wrapper
