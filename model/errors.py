"""The one exception type for mistakes a user can make, and the CLI boundary that reports it.

Every error a person can cause by what they type or point us at (a missing corpus, a broken
checkpoint, a nonsense flag value) is raised as `UserError` with a message that says what to do.
Entry scripts wrap their `main` in `run_cli`, which prints that message on one line and exits with
status 2, so a user never sees a traceback for their own mistake. Bugs still raise normally.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix; the message says how."""


def run_cli(main: Callable[[], None]) -> None:
    """Run an entry point, turning `UserError` and Ctrl-C into a one-line message and an exit code
    (and a closed output pipe into a quiet exit)."""
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # whoever read the output stopped (`python sample.py ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail too
        sys.exit(141)  # the status of a program stopped by SIGPIPE, as `head`'s shell expects
