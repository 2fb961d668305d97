"""Benchmarks: scripts that measure and write their figures to benchmarks/results/.

Every script's command line goes through `run`: model.errors.run_cli (a user's mistake in one
line, Ctrl-C as "interrupted") with SIGTERM, the stop a scheduler or `kill` sends, ending the
measurement as Ctrl-C does: the training run or preparation it started is stopped and its
temporary folder removed, where SIGTERM's default ending left both behind.
"""

from __future__ import annotations

from collections.abc import Callable

from model.errors import run_cli


def run(main: Callable[[], None]) -> None:
    """Run a benchmark's `main` as a command: run_cli, and SIGTERM stops it as Ctrl-C does (exit 143)."""
    run_cli(main, sigterm=True)
