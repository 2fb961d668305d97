"""Compiles model/decode_step.c with the system's C compiler and loads it: the fast decode step.

Why build at run time rather than ship binaries: the step is one short C file with no dependencies,
and compiling it for the machine it runs on (`-march=native`) is what lets the compiler vectorise
its inner loops for that processor; it takes about a second, once. The library is cached under
`model/build/` (or the temporary folder when that is read-only), named by a hash of the source,
the compiler command and the processor, so an edit or a new machine builds afresh. It is written
to a temporary name and renamed, so a build that dies half-way is never loaded.

Without a compiler (or if the build fails) `load()` returns None and says why once on stderr;
generation then uses the PyTorch step in model/decoder.py, which computes the same thing more
slowly (`Engine(..., use_c=False)` chooses it on purpose, as `benchmarks/generation.py --decoder torch`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from model.device import cpu_info

SOURCE = Path(__file__).with_name("decode_step.c")
BUILD_DIR = Path(__file__).with_name("build")
FLAGS = ["-O3", "-shared", "-fPIC", "-std=c99"]
TUNED = ["-march=native"]  # dropped if this compiler does not know it


class Matrix(ctypes.Structure):
    """decode_step.c's `Matrix`: fp32 values (scales NULL), or int8 values with one scale per output."""

    _fields_ = [("values", ctypes.c_void_p), ("scales", ctypes.c_void_p)]


class Model(ctypes.Structure):
    """decode_step.c's `Model`: sizes, then pointers to FusedDecoder's tensors."""

    _fields_ = [
        *((name, ctypes.c_int) for name in ("n_layer", "n_embd", "n_head", "n_kv_head", "head_dim")),
        *((name, ctypes.c_int) for name in ("mlp_hidden", "vocab", "context")),
        ("floor", ctypes.c_float),
        ("head_floor", ctypes.c_float),
        ("embed", ctypes.c_void_p),
        ("inv_freq", ctypes.c_void_p),
        ("qkv", ctypes.POINTER(Matrix)),
        ("qk_norm", ctypes.POINTER(ctypes.c_void_p)),
        *((name, ctypes.POINTER(Matrix)) for name in ("o", "gate_up", "down")),
        ("head", Matrix),
    ]


class Sampling(ctypes.Structure):
    """decode_step.c's `Sampling`: how a row's next token is drawn (model/sampling.py)."""

    _fields_ = [
        ("n", ctypes.c_int),
        ("temperature", ctypes.c_float),
        ("top_k", ctypes.c_int),
        ("top_p", ctypes.c_float),
        ("banned", ctypes.c_void_p),
    ]


def _compiler() -> list[str]:
    """The compiler's command: $CC split as a shell splits it (`ccache gcc`, `gcc -m64`), else cc, gcc
    or clang. Raises OSError with the reason when there is none; a $CC naming a program that is not
    there is not replaced by another compiler, since it may be set on purpose (the tests set it)."""
    if typed := os.environ.get("CC"):
        try:
            command = shlex.split(typed)
        except ValueError as error:  # an unclosed quote
            raise OSError(f"CC={typed!r} cannot be split into a command ({error})") from None
        if not command or shutil.which(command[0]) is None:
            raise OSError(f"CC={typed!r} names no program that is installed (set CC to a C compiler, or unset it)")
        return command
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if found is None:
        raise OSError("no C compiler found (install gcc or clang, or set CC)")
    return [found]


def _library_path(compiler: list[str], flags: list[str]) -> Path:
    processor = [platform.machine(), platform.processor(), cpu_info("model name"), cpu_info("flags")]
    identity = "\n".join([SOURCE.read_text(), *compiler, *flags, *processor])
    name = f"decode_step-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.so"
    try:
        BUILD_DIR.mkdir(exist_ok=True)
        if os.access(BUILD_DIR, os.W_OK):
            return BUILD_DIR / name
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / name


def _build(compiler: list[str]) -> Path:
    """Compile (if not already cached) and return the library's path; raises OSError with the reason."""
    error = ""
    for flags in (FLAGS + TUNED, FLAGS):
        path = _library_path(compiler, flags)
        if path.is_file():
            return path
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            result = subprocess.run(
                [*compiler, *flags, str(SOURCE), "-o", str(partial), "-lm"], capture_output=True, text=True, timeout=120
            )
            if result.returncode == 0:
                os.replace(partial, path)
                return path
            error = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        except (OSError, subprocess.SubprocessError) as failure:
            error = str(failure)
        finally:
            partial.unlink(missing_ok=True)
    raise OSError(f"{shlex.join(compiler)} could not build {SOURCE.name}: {error}")


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled decode step, or None (with a one-line note on stderr) when it cannot be had."""
    try:
        library = ctypes.CDLL(str(_build(_compiler())))
    except OSError as reason:
        print(f"note: generation uses the slower PyTorch decode step: {reason}", file=sys.stderr)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int
    step = dict(model=ctypes.POINTER(Model), tokens=pointer, positions=pointer, rows=size, keys=pointer)
    step.update(values=pointer, kv_bf16=size, length=size, mask=pointer, mask_len=size, logits=pointer)
    draw = dict(logits=pointer, rows=size, stride=ctypes.c_long, sampling=ctypes.POINTER(Sampling))
    draw.update(u=pointer, tokens=pointer)
    run = dict(model=ctypes.POINTER(Model), sampling=ctypes.POINTER(Sampling), last=pointer, positions=pointer)
    run.update(rows=size, keys=pointer, values=pointer, kv_bf16=size, length=size, mask=pointer, mask_len=size)
    run.update(stops=pointer, done=pointer, count=size, u=pointer, out=pointer)
    for function, arguments in ((library.decode_step, step), (library.draw_tokens, draw), (library.decode_tokens, run)):
        function.restype = ctypes.c_int
        function.argtypes = list(arguments.values())  # in the C function's order
    return library
