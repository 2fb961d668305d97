"""One training process per run folder, held for the run's life.

A new run checks that its --out-dir holds no run (no LATEST), but a run writes LATEST only at its
first evaluation: two runs started into one folder (two terminals, both `python train.py`) would
both pass, delete each other's checkpoints and interleave one metrics.jsonl. So the run's main
process takes an exclusive advisory lock (`flock`) on a file in the folder before it prepares
anything, and the second run is refused. The kernel drops the lock when the process ends, however it
ends (kill -9 included), so a crashed run never leaves a stale lock behind. Windows has no `fcntl`:
runs there are not guarded.

A run that fails before it writes anything (a missing corpus, a model too big for memory) removes
the folder it created, lock file and all (`remove_if_unused`), so a refused run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from model.checkpoint import LOCK
from model.errors import UserError


@contextlib.contextmanager
def run_folder_lock(out_dir: Path, take: bool = True) -> Iterator[None]:
    """Hold the lock of `out_dir` (an existing folder) inside the block (`take=False`: the other
    processes of a torchrun run, whose main process holds it)."""
    try:
        import fcntl
    except ImportError:
        take = False
    if not take:
        yield
        return
    with open(out_dir / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another training process is using {out_dir}; let it finish, or give this run another --out-dir"
            ) from None
        yield  # closing the file releases the lock


def remove_if_unused(out_dir: Path) -> None:
    """Remove the run folder a failed run created, if the run wrote nothing there but the lock file.
    A log or a checkpoint it wrote stays."""
    with contextlib.suppress(OSError):
        if [path.name for path in out_dir.iterdir()] == [LOCK]:
            (out_dir / LOCK).unlink()
            out_dir.rmdir()
