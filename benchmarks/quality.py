"""Quality per minute: train a preset on a corpus a few times, score each run, report medians.

    python -m benchmarks.quality --corpus ../shared/data/tinyshakespeare.txt --runs 3

Splits the corpus nanoGPT's way (first 90% of the characters to train, last 10% to validate),
trains `train.py` once per seed with the given preset and budget, scores every run with
`python -m model.evaluate` over the whole validation text, and writes the figures as JSON and as a
Markdown table to `--out` (default `benchmarks/results/`). Runs are sequential: on a 2-core
machine anything running alongside a run changes its result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> str:
    result = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{result.stderr.strip()[-2000:]}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--corpus", required=True, help="UTF-8 text file to train and validate on")
    parser.add_argument("--runs", type=int, default=3, help="runs (seeds 1..N); medians are reported")
    parser.add_argument("--preset", default="cpu", help="train.py preset")
    parser.add_argument("--max-minutes", type=float, help="training budget (default: the preset's)")
    parser.add_argument("--max-steps", type=int, help="step budget (default: the preset's)")
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results"), help="folder for quality.json and quality.md"
    )
    args = parser.parse_args()
    corpus = Path(args.corpus)
    if not corpus.is_file() or args.runs < 1:
        sys.exit(f"error: {corpus} is not a file, or --runs is below 1")

    budget = [f"--max-minutes={args.max_minutes}"] * (args.max_minutes is not None) + [
        f"--max-steps={args.max_steps}"
    ] * (args.max_steps is not None)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        text = corpus.read_text(encoding="utf-8")
        cut = int(len(text) * 0.9)
        train, val = Path(tmp) / "train.txt", Path(tmp) / "val.txt"
        train.write_text(text[:cut], encoding="utf-8")
        val.write_text(text[cut:], encoding="utf-8")
        for seed in range(1, args.runs + 1):
            out = Path(tmp) / f"run{seed}"
            start = time.perf_counter()
            run(
                [
                    "train.py",
                    "--preset",
                    args.preset,
                    "--data",
                    str(train),
                    "--val-data",
                    str(val),
                    "--out-dir",
                    str(out),
                    "--seed",
                    str(seed),
                    "--no-progress",
                    "--cache-dir",
                    str(Path(tmp) / "cache"),
                    *budget,
                ]
            )
            wall = time.perf_counter() - start
            figures = json.loads(run(["-m", "model.evaluate", "--checkpoint", str(out), "--text", str(val)]))
            meta = json.loads(next(out.glob("step-*/checkpoint.json")).read_text())
            results.append({"seed": seed, "bpb": figures["bpb"], "wall_seconds": wall, "steps": meta["step"]})
            print(f"seed {seed}: {figures['bpb']:.4f} bits/byte, {meta['step']} steps, {wall:.1f} s", flush=True)

    summary = {
        "corpus": str(corpus),
        "preset": args.preset,
        "budget": budget or "preset default",
        "runs": results,
        "median_bpb": statistics.median(r["bpb"] for r in results),
        "median_wall_seconds": statistics.median(r["wall_seconds"] for r in results),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = "\n".join(f"| {r['seed']} | {r['steps']} | {r['wall_seconds']:.1f} | {r['bpb']:.4f} |" for r in results)
    table = f"| seed | steps | wall (s) | val bits/byte |\n|---|---|---|---|\n{rows}\n| **median** | | {summary['median_wall_seconds']:.1f} | **{summary['median_bpb']:.4f}** |\n"
    (out_dir / "quality.md").write_text(f"Preset `{args.preset}` on `{corpus.name}` (last 10% held out)\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
