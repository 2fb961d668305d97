"""Quality per minute: train with a time budget a few times, score each run, report medians.

    python -m benchmarks.quality --corpus tinyshakespeare --max-minutes 1.5 5 --runs 3

Splits the corpus nanoGPT's way (first 90% of the characters to train, last 10% to validate),
trains `train.py` once per seed and budget, scores every run with `python -m model.evaluate` over
the whole validation text, and writes the figures as JSON and a Markdown table to `--out`
(default `benchmarks/results/`). Each run also keeps its validation curve (bits per byte against
training seconds, from metrics.jsonl: the evaluations during training, on `--eval-tokens` of the
validation text) for the plot. Runs are sequential: on a 2-core machine
anything running alongside a run changes its result. `--corpus tinyshakespeare` is downloaded once
into data/cache, as `train.py --data tinyshakespeare` does; a corpus with no text, or too short for
one training window, is refused before any run.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchmarks
from benchmarks import report
from data.prepare import DEFAULT_CACHE
from data.sources import tinyshakespeare
from model.checkpoint import load_checkpoint
from model.errors import UserError
from training.config import PRESETS, TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> str:
    """Run a project script; its failure is ours, told in one line (its own last line says why)."""
    result = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        script = cmd[1] if cmd[0] == "-m" else cmd[0]
        raise UserError(f"{script} failed: {lines[-1].removeprefix('error: ')}")
    return result.stdout


def check_arguments(corpus: str, runs: int, budgets: list[float], flags: list[str], budget_flag: str) -> Path:
    """Refuse, before any training, what this benchmark (alone or in the suite) cannot measure; returns
    the corpus file (`tinyshakespeare` fetched first). `budget_flag` names the budgets for the user."""
    if runs < 1:
        raise UserError(f"--runs must be at least 1, got {runs}")
    bad = [minutes for minutes in budgets if not (math.isfinite(minutes) and minutes > 0)]
    if bad:
        raise UserError(f"{budget_flag} takes positive numbers of minutes, got {bad[0]:g}")
    named = [f"{minutes:g}" for minutes in budgets]
    if len(set(named)) < len(named):
        repeated = next(name for name in named if named.count(name) > 1)
        raise UserError(f"{budget_flag} names {repeated} more than once; give each budget once")
    path = resolve_corpus(corpus)
    read_corpus(path, window(flags))
    return path


def resolve_corpus(corpus: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """--corpus as a file; `tinyshakespeare` is downloaded once into the data cache (data/cache in the
    project), as `train.py --data tinyshakespeare` does, and read from there afterwards."""
    if corpus == "tinyshakespeare":
        return tinyshakespeare(cache_dir)
    path = Path(corpus)
    if not path.is_file():
        raise UserError(f"--corpus {corpus} is not a file; give a UTF-8 text file, or tinyshakespeare to download it")
    return path


def window(flags: list[str]) -> int:
    """The context, in tokens, of training runs given `flags`: their --context, else their --preset's."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("--preset", default=TrainConfig.preset)
    parser.add_argument("--context", type=int)
    try:
        known, _ = parser.parse_known_args(flags)
    except argparse.ArgumentError:  # train.py will say what is wrong with them
        return TrainConfig.context
    return known.context or PRESETS.get(known.preset, {}).get("context", TrainConfig.context)


def read_corpus(corpus: Path, context: int) -> str:
    """The corpus's text, refused in one line naming --corpus if it is not UTF-8, has no text, or its
    first 90% is too short for one training window of `context` tokens (a token is a byte or more)."""
    try:
        text = corpus.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(
            f"--corpus {corpus} is not UTF-8 text (byte {error.start}); convert it, e.g. iconv -t UTF-8, and rerun"
        ) from None
    except OSError as error:
        raise UserError(f"cannot read --corpus {corpus} ({error.strerror}); give a readable text file") from None
    if not text.strip():
        raise UserError(f"--corpus {corpus} has no text; give a corpus with some text in it")
    train_bytes = len(text[: int(len(text) * 0.9)].encode())
    if train_bytes <= context:
        raise UserError(
            f"--corpus {corpus} is too small for these runs: its first 90% ({train_bytes:,} bytes) is shorter "
            f"than one training window of {context} tokens; give a longer corpus"
        )
    return text


def split_corpus(corpus: Path, folder: Path) -> tuple[Path, Path]:
    """First 90% of the characters to train.txt, the last 10% to val.txt."""
    text = read_corpus(corpus, 0)
    cut = int(len(text) * 0.9)
    train, val = folder / "train.txt", folder / "val.txt"
    train.write_text(text[:cut], encoding="utf-8")
    val.write_text(text[cut:], encoding="utf-8")
    return train, val


def named_as_corpus(error: UserError, corpus: Path, train: Path, val: Path) -> UserError:
    """A training run's error told about --corpus, not the suite's own split files and flags."""
    message = str(error).replace(str(train), f"--corpus {corpus} (its first 90%)")
    message = message.replace(str(val), f"--corpus {corpus} (its last 10%)")
    message = message.replace("use more text or a smaller --context", f"give a longer --corpus than {corpus}")
    return UserError(message)


def train_and_score(train: Path, val: Path, out: Path, seed: int, flags: list[str]) -> dict:
    """One training run with `flags`, scored on all of `val`; figures plus the validation curve."""
    start = time.perf_counter()
    log = run(
        ["train.py", "--data", str(train), "--val-data", str(val), "--out-dir", str(out), "--seed", str(seed)]
        + ["--no-progress", "--sample-tokens", "0", "--cache-dir", str(out.parent / "cache"), *flags]
    )
    wall = time.perf_counter() - start
    figures = json.loads(run(["-m", "model.evaluate", "--checkpoint", str(out), "--text", str(val)]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "val_bpb" in r][-1]
    model_line = next(line for line in log.splitlines() if line.startswith("model:"))
    checkpoint = load_checkpoint(out)
    return {
        "seed": seed,
        "bpb": figures["bpb"],
        "wall_seconds": round(wall, 1),
        "train_seconds": final["time"],
        "steps": final["step"],  # trained; the score is the best evaluation's checkpoint, at scored_step
        "scored_step": checkpoint.step,
        "tokens_per_sec": final.get("tokens_per_sec"),
        "mfu": final.get("mfu"),
        "model": model_line.removeprefix("model: "),
        "parameters": checkpoint.model_config.num_parameters(),
        "curve": [[r["time"], r["val_bpb"]] for r in records if "val_bpb" in r],
        "eval_tokens": checkpoint.meta["train"]["eval_tokens"],  # what each point of the curve scored
    }


def summarise(runs: list[dict]) -> dict:
    """Medians over the runs; a run that logged no MFU or rate (none measured) is left out of those."""

    def median(key: str) -> float | None:
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.median(values) if values else None

    return {
        "median_bpb": median("bpb"),
        "median_wall_seconds": median("wall_seconds"),
        "median_mfu": median("mfu"),
        "median_tokens_per_sec": median("tokens_per_sec"),
    }


def run_folder(work: Path, minutes: float, seed: int) -> Path:
    """Where `measure` trains the run of `minutes` and `seed`; it lasts as long as `work` does."""
    return work / f"budget{minutes:g}-seed{seed}"


def percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def measure(corpus: Path, budgets: list[float], runs: int, flags: list[str], work: Path) -> list[dict]:
    """For each budget in minutes, `runs` seeds; returns one summary per budget."""
    train, val = split_corpus(corpus, work)
    results = []
    for minutes in budgets:
        budget_runs = []
        for seed in range(1, runs + 1):
            out = run_folder(work, minutes, seed)
            try:
                result = train_and_score(train, val, out, seed, ["--max-minutes", f"{minutes:g}", *flags])
            except UserError as error:
                raise named_as_corpus(error, corpus, train, val) from None
            budget_runs.append(result)
            print(
                f"{minutes:g} min, seed {seed}: {result['bpb']:.4f} bits/byte, {result['steps']} steps, "
                f"{result['wall_seconds']:.0f} s wall, MFU {percent(result['mfu'])}",
                flush=True,
            )
        results.append({"minutes": minutes, "runs": budget_runs, **summarise(budget_runs)})
    return results


def table(results: list[dict]) -> str:
    rows = [
        "| budget (min) | model | runs | steps | MFU | val bits/byte (each) | median |",
        "|---|---|---|---|---|---|---|",
    ]
    for budget in results:
        each = ", ".join(f"{r['bpb']:.3f}" for r in budget["runs"])
        steps = ", ".join(
            str(r["steps"]) + (f" (scored at {r['scored_step']})" if r["scored_step"] != r["steps"] else "")
            for r in budget["runs"]
        )
        models = "; ".join(dict.fromkeys(r["model"] for r in budget["runs"]))  # each size the seeds got, once
        rows.append(
            f"| {budget['minutes']:g} | {models} | {len(budget['runs'])} | {steps} | "
            f"{percent(budget['median_mfu'])} | {each} | **{budget['median_bpb']:.3f}** |"
        )
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--corpus",
        required=True,
        help="UTF-8 text file to train and validate on, or tinyshakespeare (downloaded once into data/cache)",
    )
    parser.add_argument("--max-minutes", type=float, nargs="+", default=[1.5, 5.0], help="training budgets")
    parser.add_argument("--runs", type=int, default=3, help="runs (seeds 1..N) per budget; medians are reported")
    parser.add_argument("--train-flags", default="", help="extra train.py flags, e.g. '--preset tiny --max-steps 10'")
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results"), help="folder for quality.json and quality.md"
    )
    args = parser.parse_args()
    try:
        flags = shlex.split(args.train_flags)
    except ValueError as error:
        raise UserError(f"--train-flags cannot be split as a shell would ({error}); check its quotes") from None
    corpus = check_arguments(args.corpus, args.runs, args.max_minutes, flags, "--max-minutes")
    report.check_writable(args.out, folder=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(corpus, args.max_minutes, args.runs, flags, Path(tmp))
    print(table(results), flush=True)
    report.write_files(
        Path(args.out),
        {
            "quality.json": json.dumps({"corpus": str(corpus), "budgets": results}, indent=2) + "\n",
            "quality.md": f"`{corpus.name}`, last 10% held out\n\n{table(results)}",
        },
    )


if __name__ == "__main__":
    benchmarks.run(main)
