"""The one exception type for mistakes a user can make, and the CLI boundary that reports it.

Every error a person can cause by what they type or point us at (a missing corpus, a broken
checkpoint, a nonsense flag value) is raised as `UserError` with a message that says what to do.
Entry scripts wrap their `main` in `run_cli`, which prints that message on one line and exits with
status 2, so a user never sees a traceback for their own mistake. Bugs still raise normally.

A command that leaves temporaries or child processes behind when killed (the export's half-built
folder, a benchmark's training run) asks `run_cli(..., sigterm=True)`: SIGTERM, the stop `kill` and
schedulers send, is then raised in the main thread like Ctrl-C, so the same clean-up runs, and the
command exits 143 ("terminated"). train.py handles SIGTERM itself (it saves a checkpoint first).
"""

from __future__ import annotations

import io
import os
import signal
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix; the message says how."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same clean-up runs."""


def _terminate(_signum: int, _frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
    raise Terminated


def run_cli(main: Callable[[], None], sigterm: bool = False) -> None:
    """Run an entry point, turning `UserError` and Ctrl-C (and with `sigterm`, SIGTERM) into a one-line
    message and an exit code (and a closed output pipe into a quiet exit)."""
    if sigterm:
        signal.signal(signal.SIGTERM, _terminate)
    for stream in (sys.stdout, sys.stderr):
        # A character the output's encoding lacks (a model's 'café' under PYTHONIOENCODING=ascii, or
        # a lone surrogate) is written as '?' rather than ending the program with UnicodeEncodeError.
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)  # the status of a program SIGTERM stopped, as train.py's
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # whoever read the output stopped (`python sample.py ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail too
        sys.exit(141)  # the status of a program stopped by SIGPIPE, as `head`'s shell expects
