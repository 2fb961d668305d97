"""Benchmarks: scripts that measure and write their figures to benchmarks/results/.

Every script's command line goes through `run`: model.errors.run_cli (a user's mistake in one
line, Ctrl-C as "interrupted") with SIGTERM, the stop a scheduler or `kill` sends, ending the
measurement as Ctrl-C does: the training run or preparation it started is stopped and its
temporary folder removed, where SIGTERM's default ending left both behind.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from model.errors import run_cli


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same clean-up runs."""


def _terminate(_signum: int, _frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
    raise Terminated


def run(main: Callable[[], None]) -> None:
    """Run a benchmark's `main` as a command: run_cli, and SIGTERM stops it as Ctrl-C does (exit 143)."""

    def main_until_terminated() -> None:
        try:
            main()
        except Terminated:
            print("terminated", file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)  # the status of a program SIGTERM stopped, as train.py's

    signal.signal(signal.SIGTERM, _terminate)
    run_cli(main_until_terminated)
