"""The benchmark suite: quality per minute, hardware use, generation and data speed, in one command.

    python -m benchmarks --corpus tinyshakespeare

1. Quality per minute (benchmarks/quality.py): the default settings at each `--max-minutes`
   budget, `--runs` seeds each, scored on the held-out last 10% with model.evaluate.
2. Hardware use: the MFU the training log reports for the default budget's runs (5 minutes,
   what `python train.py` does; model FLOP/s over the matmul peak of the dtype the run trains in, bf16,
   or fp32 on a CPU without native bf16, measured in the same process).
3. Generation (benchmarks/generation.py): batch-1 bytes/s within and past the context, and time to
   first token for a 1,000-byte prompt, on the default budget's largest model.
4. Tokenizer and data (benchmarks/data_speed.py): BPE on 1 MB and 100 MB, preparing 100 MB.

The targets for 2 and 3 are about the default model, so a longer budget in `--budgets` does not
move them (its bigger model generates more slowly); without the default budget the longest stands in.

Writes `benchmarks.json`, `benchmarks.md` and `loss_vs_time.png` to `--out`. The full suite takes
about half an hour on 2 cores (24 minutes on the reference Xeon at d3ed303, README's run); `--quick`
runs every part small (seconds to minutes) to check that it works, its model rows labelled as quick
and not judged against the targets. `--skip quality` needs no corpus and skips generation too.
Nothing else should run on the machine meanwhile. SIGTERM stops it as Ctrl-C does (benchmarks.run).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

import benchmarks
from benchmarks import data_speed, generation, quality, report
from model.device import matmul_peak_flops, pick_dtype
from model.errors import UserError
from training.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    device = torch.device("cpu")
    dtype = pick_dtype(device)
    peak = matmul_peak_flops(device, dtype)
    name = platform.processor() or platform.machine()
    return (
        f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{str(dtype).removeprefix('torch.')} matmul peak {peak / 1e9:,.0f} GFLOP/s"
    )


def default_budget(budgets: list[dict]) -> dict:
    """The budget `python train.py` runs (TrainConfig.max_minutes) if measured, else the longest."""
    default = [budget for budget in budgets if budget["minutes"] == TrainConfig.max_minutes]
    return default[0] if default else max(budgets, key=lambda budget: budget["minutes"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--corpus",
        help="UTF-8 text file (trained on its first 90%%), or tinyshakespeare (downloaded once into data/cache); "
        "needed unless --skip quality",
    )
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.5, 5.0], help="--max-minutes budgets")
    parser.add_argument("--runs", type=int, default=3, help="seeds per budget and timed runs per speed figure")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["quality", "generation", "data"],
        help="parts to skip (generation times the default budget's largest model, so skipping quality skips it too)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes everywhere: checks the suite works")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the results")
    args = parser.parse_args()
    # Evaluations every 50 steps draw the curve (they pause the training clock, so cost no budget).
    flags = (
        ["--preset", "tiny", "--max-steps", "20", "--eval-interval", "5"] if args.quick else ["--eval-interval", "50"]
    )
    figures: dict = {"quick": args.quick}
    if "quality" in args.skip:
        if args.runs < 1:
            raise UserError(f"--runs must be at least 1, got {args.runs}")
        if "generation" not in args.skip:
            print("generation is timed on the quality runs' model: --skip quality skips it too", flush=True)
    else:
        if args.corpus is None:
            raise UserError("give --corpus FILE (or --corpus tinyshakespeare) for the quality runs, or --skip quality")
        corpus = quality.check_arguments(args.corpus, args.runs, args.budgets, flags, "--budgets")
        report.check_plotting()
        figures["corpus"] = corpus.name
    report.check_writable(args.out, folder=True)
    figures["machine"] = machine()
    with tempfile.TemporaryDirectory() as tmp:
        if "quality" not in args.skip:
            figures["quality"] = quality.measure(corpus, args.budgets, args.runs, flags, Path(tmp))
            default = default_budget(figures["quality"])
            figures["mfu"], figures["default_minutes"] = default["median_mfu"], default["minutes"]
            if "generation" not in args.skip:
                # The largest model (the slowest to generate from): on a machine where the budget's
                # rule sits near a rounding point, seeds of one budget can be sized differently.
                largest = max(default["runs"], key=lambda run: run["parameters"])
                checkpoint = quality.run_folder(Path(tmp), default["minutes"], largest["seed"])
                figures["generation"] = generation.measure(str(checkpoint), args.runs)
                # The run folder is temporary: say which run it was, not where it no longer is.
                del figures["generation"]["checkpoint"]
                figures["generation"]["model"] = f"{default['minutes']:g} min budget, seed {largest['seed']}"
                print(f"generation: {figures['generation']}", flush=True)
    if "data" not in args.skip:
        sizes, prepare_size = ([0.1, 1], 1) if args.quick else ([1, 100], 100)
        figures["data"] = data_speed.measure(sizes, args.runs, prepare_size)
    print(report.markdown(figures), flush=True)
    for line in report.write(figures, Path(args.out)):
        print(line)


if __name__ == "__main__":
    benchmarks.run(main)
