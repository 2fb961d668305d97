"""Writing files so that a crash, a kill -9 or a full disk never leaves a half-written one in use.

The pattern everywhere (checkpoints, prepared data, downloads): write into a temporary name that
starts with `.tmp-` and carries the writer's process id, flush it to disk, then rename it into
place (a rename is atomic on one filesystem). A reader therefore sees the old complete version or
the new complete version, never a mixture. Temporaries a killed writer left behind are removed by
the next writer once their process is gone.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from safetensors import SafetensorError

from model.errors import UserError

TEMPORARY = ".tmp-"
WRITE_ERRORS = (OSError, SafetensorError)  # safetensors reports a full disk as its own error type


def writable_folder(folder: Path, what: str) -> None:
    """Create `folder` (and its parents) if needed and check it can be written, before any long work
    that would write there; `what` names it for the user ("--out-dir", "the data cache")."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {what} {folder} ({error.strerror}); give a folder you can write") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"{what} {folder} is not writable; give a folder you can write")


def temporary_name(final: Path) -> Path:
    """Where to build `final` before renaming it into place."""
    return final.with_name(f"{TEMPORARY}{final.name}-{os.getpid()}")


def fsync(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def settle_files(folder: Path) -> None:
    """Flush every file in `folder` to disk, each with the permissions a new file gets from the umask:
    safetensors creates its files readable by their owner only, which a service or another user
    serving the model could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)
        fsync(path)


def fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: Path, data: str | bytes) -> None:
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_folder(path.parent)


def remove_abandoned(folder: Path, prefix: str = "") -> None:
    """Delete temporaries in `folder` whose writing process no longer runs (killed mid-write).

    `prefix` (a name) limits it, in a folder that is not ours alone, to the temporaries
    `temporary_name` gives that name and its `.old` (the name, a process id): a user's own
    `.tmp-<name>-notes` is not ours to delete.
    """
    if not folder.is_dir():
        return
    ours = re.compile(re.escape(f"{TEMPORARY}{prefix}") + r"(\.old)?-\d+")
    for path in folder.glob(f"{TEMPORARY}{prefix}*"):
        if prefix and not ours.fullmatch(path.name):
            continue
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _running(int(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
