"""Where the model runs and in which precision, detected once and shared by training and inference.

bf16 autocast is the biggest single speed lever on CPUs that have native bf16 matmuls (AVX-512
BF16 or AMX on x86): about 4x the fp32 matmul rate on the reference machine. On CPUs without them
bf16 is emulated and slower, so "auto" only turns it on where the hardware has it, and only where it
measures faster: a flag is not a speed. An Intel Xeon (Sapphire Rapids class) whose hypervisor hides
AMX still lists AVX-512 BF16, yet PyTorch's bf16 products ran there at 175 GFLOP/s against 336 in
fp32, and the 4 x 256 model's compiled training step at 4,400 tokens/s against 6,236
(benchmarks/NOTES.md, "A Xeon without AMX"). Weights and optimizer state stay in fp32 either way;
autocast changes the precision of the matmuls (and, in training, of the residual stream between
them: model/gpt.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from data.prepare import DEFAULT_CACHE
from model.errors import UserError
from model.files import write_atomically

DTYPES = ("auto", "bf16", "fp32")


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    device = _usable(requested)
    if device is None:
        raise UserError(f"--device {requested} is not a device this machine has; use auto, cpu or cuda[:N]")
    return device


def _usable(requested: str) -> torch.device | None:
    """The device `requested` names if a model can run on it, else None. Torch takes more than that:
    `meta` (tensors without data, which then failed as if the checkpoint were damaged) and `cpu:1`
    (there is one CPU device), besides backends this build lacks and GPUs past the last one. An Apple
    GPU (`mps`) that allocates is taken as asked for, as it was before these checks."""
    try:
        device = torch.device(requested)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, NotImplementedError):
        return None
    return device if device.type in ("cuda", "mps") or str(device) in ("cpu", "cpu:0") else None


def cpu_info(field: str) -> str:
    """The value of the first `field` line of /proc/cpuinfo ("model name", "flags"); "" where there is none."""
    try:
        found = re.search(rf"^{field}\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), flags=re.MULTILINE)
    except OSError:
        return ""
    return found.group(1).strip() if found else ""


def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with AVX-512 BF16 or AMX (read from /proc/cpuinfo; False elsewhere)."""
    flags = cpu_info("flags").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def bf16_multiplies_faster(folder: Path = DEFAULT_CACHE) -> bool:
    """Whether this CPU's bf16 matrix products outrun its fp32 ones (measured once per process,
    about 0.35 s: three rounds of 0.05 s per precision). Where bf16 is native the two differ by 2x
    or more either way (bf16 4.5x faster on a Zen 5, 2.2x on a Zen 4, 2x slower on a Xeon without
    AMX), so short timings decide it; they alternate and each keeps its best, because on a shared
    machine a timing now and then reads half the speed for a second, and one such dip must not pick
    the slower precision for a whole run. The decision is the best rates this machine has shown
    (`remembered_best`, in `folder`), not this process's alone: beside a test suite on two cores one
    sample.py in nine still timed bf16 slower, chose fp32 and printed other text for the same --seed."""
    cpu, best = torch.device("cpu"), {torch.bfloat16: 0.0, torch.float32: 0.0}
    for _ in range(3):
        for dtype in best:
            best[dtype] = max(best[dtype], matmul_peak_flops(cpu, dtype, size=512, seconds=0.05))
    shown = {
        dtype: remembered_best(rate, f"{machine_name(cpu, dtype)}, 512 x 512", folder) for dtype, rate in best.items()
    }
    return shown[torch.bfloat16] > shown[torch.float32]


def pick_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """The autocast dtype: bf16 where the hardware computes it natively and faster than fp32, else fp32."""
    if requested == "fp32":
        return torch.float32
    if requested == "bf16":
        if device.type == "cpu" and not cpu_has_native_bf16():
            note_emulated_bf16()
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_native_bf16() and bf16_multiplies_faster():
        return torch.bfloat16
    return torch.float32


@functools.cache
def note_emulated_bf16() -> None:
    """Say once that an asked-for bf16 is emulated here: runs work, several times slower than fp32."""
    print(
        "note: this CPU has no native bf16 (AVX-512 BF16 or AMX), so --dtype bf16 is emulated and several times "
        "slower than fp32; --dtype auto chooses fp32 here",
        file=sys.stderr,
    )


def can_compile(device: torch.device) -> bool:
    """Whether `torch.compile` can build kernels here: on a CPU, inductor writes C++ and needs a
    compiler (the one it would call: $CXX, else g++, clang++ on macOS); GPU kernels come with PyTorch."""
    if device.type != "cpu":
        return True
    return shutil.which(os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")) is not None


def autocast(device: torch.device, dtype: torch.dtype):
    """A context that runs matmuls in `dtype` (a no-op for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def matmul_peak_flops(
    device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 5, seconds: float = 1.0
) -> float:
    """FLOP/s of a square `size` matmul in `dtype` on `device`, measured now: the best of many
    short timings over about `seconds`.

    Model FLOPs utilisation (MFU) is quoted against this figure, measured in the same process as the
    training it describes, so it reflects the machine as it is (its threads, clocks and neighbours).
    The budget rule (training/budget.py) sizes the model from it too, so a momentary slowdown must
    not count: on the shared 2-core reference machine a best-of-3 over 0.3 s read about half the
    peak in 2 of 26 sweep runs, and one 5-minute run got a model sized for a machine half as fast.
    Timing for a whole second when the figure sizes a model (the CPU's clock ramp and a neighbour's
    burst both pass) and keeping the best short round keeps a short dip from deciding the figure.

    The first product warms up (on a GPU it also starts cuBLAS). On a CPU that emulates `dtype` (bf16
    on an AVX2-only CPU, about 1 GFLOP/s) it alone takes longer than `seconds`, and it is the figure:
    timing rounds there took 45 s before a typed `--dtype bf16` run's first step on a Zen 3.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    start = time.perf_counter()
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - start
    if device.type == "cpu" and first > seconds:
        return 2 * size**3 / first
    best = float("inf")
    deadline = time.perf_counter() + seconds
    rounds = 0
    while rounds < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
        rounds += 1
    return 2 * size**3 * repeats / best


REMEMBERED = "step_flops.json"  # the best rates this machine has shown (training steps, matmul peaks)


def machine_name(device: torch.device, dtype: torch.dtype) -> str:
    """What a remembered rate is valid for: the processor, the thread count and the dtype."""
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device)
    else:
        chip = cpu_info("model name") or platform.processor() or platform.machine()
        chip += f", {torch.get_num_threads()} threads"
    return f"{chip}, {str(dtype).removeprefix('torch.')}"


def remembered_best(measured: float, machine: str, folder: Path) -> float:
    """The best of `measured` and the rates measured earlier on `machine` (kept in folder/REMEMBERED)."""
    path = folder / REMEMBERED
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: start afresh
        known = {}
    known = known if isinstance(known, dict) else {}
    previous = float(known.get(machine, 0.0))
    if measured <= previous:
        return previous
    known[machine] = measured
    try:
        os.makedirs(folder, exist_ok=True)
        write_atomically(path, json.dumps(known, indent=1))
    except OSError:  # a read-only cache only loses the memory, not the run
        pass
    return measured
