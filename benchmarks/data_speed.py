"""Tokenizer and data preparation speed: BPE training on 1 MB and 100 MB, preparing 100 MB.

    python -m benchmarks.data_speed [--megabytes 1 100] [--runs 3]

The corpus is made here, never downloaded: the built-in corpus (Python's own documentation,
data/builtin.py) with its paragraphs shuffled by a seeded RNG, repeated until it reaches the size.
- BPE: `train_bpe` (vocabulary 2,048) fed the corpus in the ~1 MB pieces that preparation uses.
- Prepare: `data.prepare.prepare` on the file in a fresh process (counting pass, BPE, encoding,
  writing train.bin/val.bin), timed with its peak resident memory (ru_maxrss of that process).
Times are medians of `--runs` runs. Sizes are from MIN_MEGABYTES (0.01 MB) up: below it there is
nothing to time.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchmarks
from benchmarks import report
from data.builtin import builtin_documents
from data.sources import open_source
from model.errors import UserError
from model.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20
MIN_MEGABYTES = 0.01  # 10 KB: a few paragraphs; BPE and preparing take milliseconds below it


def make_corpus(path: Path, size: int, seed: int = 0) -> None:
    """Write `size` bytes of text: built-in paragraphs, reshuffled for every repetition."""
    paragraphs = [p for text in builtin_documents() for p in text.split("\n\n") if p.strip()]
    rng = random.Random(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        while written < size:
            rng.shuffle(paragraphs)
            for paragraph in paragraphs:
                data = paragraph + "\n\n"
                out.write(data)
                written += len(data.encode())
                if written >= size:
                    break


def bpe_seconds(path: Path, cache: Path) -> float:
    pieces = (text for _, text in open_source(str(path), cache_dir=cache).pieces())
    start = time.perf_counter()
    train_bpe(pieces, 2048)
    return time.perf_counter() - start


PREPARE = """
import sys, time
from pathlib import Path
from data.prepare import prepare
from model.errors import run_cli
def main():
    start = time.perf_counter()
    prepare(sys.argv[1], cache_dir=Path(sys.argv[2]), progress=False)
    print(time.perf_counter() - start)
run_cli(main)
"""


def prepare_seconds_and_peak(path: Path, cache: Path) -> tuple[float, int]:
    """Prepare `path` in a fresh process; its wall time and peak resident memory in bytes.

    Its failure is told in one line (its own last line says why); interrupted, it is stopped too."""
    errors = cache.with_name(f"{cache.name}-stderr.txt")
    with open(errors, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", PREPARE, str(path), str(cache)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        _, status, usage = os.wait4(process.pid, 0)
    except BaseException:  # Ctrl-C or SIGTERM (benchmarks.run): the child must not outlive us
        process.kill()
        process.wait()
        raise
    output = process.stdout.read()
    process.stdout.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        lines = errors.read_text().strip().splitlines() or [f"exit status {process.returncode}"]
        raise UserError(f"preparing {path.name} failed: {lines[-1].removeprefix('error: ')}")
    return float(output.strip().splitlines()[-1]), usage.ru_maxrss * 1024


def check_sizes(megabytes: list[float], prepare_megabytes: float) -> None:
    """Refuse sizes that are no number, or too small for a timing to mean anything (or to hold text)."""
    for flag, sizes in (("--megabytes", megabytes), ("--prepare-megabytes", [prepare_megabytes])):
        for size in sizes:
            if not (math.isfinite(size) and size >= MIN_MEGABYTES):
                raise UserError(
                    f"{flag} takes sizes of {MIN_MEGABYTES:g} MB or more (smaller ones time nothing), got {size:g}"
                )


def measure(megabytes: list[float], runs: int, prepare_megabytes: float) -> dict:
    figures: dict = {"runs": runs, "bpe_vocab": 2048}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sorted(set(megabytes) | {prepare_megabytes}):
            path = Path(tmp) / f"corpus-{size:g}MB.txt"
            make_corpus(path, int(size * MB))
            if size in megabytes:
                times = [bpe_seconds(path, Path(tmp)) for _ in range(runs)]
                figures[f"bpe_seconds_{size:g}MB"] = round(statistics.median(times), 3)
                print(f"BPE on {size:g} MB: {figures[f'bpe_seconds_{size:g}MB']} s (median of {runs})", flush=True)
            if size == prepare_megabytes:
                results = [prepare_seconds_and_peak(path, Path(tmp) / f"cache{run}") for run in range(runs)]
                figures[f"prepare_seconds_{size:g}MB"] = round(statistics.median(t for t, _ in results), 2)
                figures[f"prepare_peak_mb_{size:g}MB"] = round(max(m for _, m in results) / MB)
                print(
                    f"prepare {size:g} MB: {figures[f'prepare_seconds_{size:g}MB']} s, "
                    f"peak {figures[f'prepare_peak_mb_{size:g}MB']} MB resident",
                    flush=True,
                )
            path.unlink()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--megabytes", type=float, nargs="+", default=[1, 100], help="corpus sizes for BPE training")
    parser.add_argument("--prepare-megabytes", type=float, default=100, help="corpus size for the prepare figure")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per figure (medians are reported)")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.runs < 1:
        raise UserError(f"--runs must be at least 1, got {args.runs}")
    check_sizes(args.megabytes, args.prepare_megabytes)
    report.check_writable(args.out)
    figures = measure(args.megabytes, args.runs, args.prepare_megabytes)
    report.print_json(figures, args.out)


if __name__ == "__main__":
    benchmarks.run(main)
