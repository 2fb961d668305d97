"""The one exception type for mistakes a user can make, and the CLI boundary that reports it.

Every error a person can cause by what they type or point us at (a missing corpus, a broken
checkpoint, a nonsense flag value) is raised as `UserError` with a message that says what to do.
Entry scripts wrap their `main` in `run_cli`, which prints that message on one line and exits with
status 2, so a user never sees a traceback for their own mistake. Bugs still raise normally.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix; the message says how."""


def run_cli(main: Callable[[], None]) -> None:
    """Run an entry point, turning `UserError` and Ctrl-C into a one-line message and an exit code."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
