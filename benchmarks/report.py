"""Write the suite's figures: one JSON file, one Markdown table, one loss-versus-training-time plot (PNG).

Each file is written atomically (model/files.py), after the table has been printed, so a full disk
costs the files but no figure, and never leaves a half-written one.

The targets and nanoGPT's reference figures (from issue 5, measured on the 2-core reference
machine class) live here, next to the table that compares against them, and nowhere else.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

from model.errors import UserError
from model.files import writable_folder, write_atomically

NANOGPT = {
    "cpu": {"seconds": 89, "bpb": 2.74, "label": "nanoGPT CPU recipe (0.8M, char)"},
    "a100": {"bpb": 2.12, "label": "nanoGPT on an A100 (10.7M, 5000 iters)"},
    "generation_bytes_per_second": 875,
}
TARGETS = {
    "bpb_1.5min": 2.10,
    "bpb_5min": 1.95,
    "mfu": 0.50,
    "generation_bytes_per_second": 6000,
    "first_token_ms": 50,
    "bpe_seconds_1MB": 2,
    "bpe_seconds_100MB": 120,
    "prepare_seconds_100MB": 120,
    "prepare_peak_mb_100MB": 2048,
}
PLOT = "loss_vs_time.png"


QUICK = "quick run: tiny preset, 20 steps"  # what `--quick` trains at every budget (benchmarks/__main__.py)


def rows(figures: dict) -> list[tuple[str, str, str, str]]:
    """(figure, measured, target, met?) for every figure present. A `--quick` suite's model figures
    are a tiny model's, labelled so and not judged against the targets, which are the real models'."""
    out = []
    quick = figures.get("quick", False)

    def add(name: str, value, target, better: str, fmt: str = "{:g}", judged: bool = True) -> None:
        if not judged:
            out.append((name, fmt.format(value), "", ""))
            return
        met = value <= target if better == "low" else value >= target
        out.append(
            (
                name,
                fmt.format(value),
                ("<= " if better == "low" else ">= ") + fmt.format(target),
                "yes" if met else "no",
            )
        )

    for budget in figures.get("quality", []):
        key = f"bpb_{budget['minutes']:g}min"
        name = f"{budget['minutes']:g} min budget" if not quick else f"{QUICK}, --max-minutes {budget['minutes']:g}"
        judged = key in TARGETS and not quick
        add(f"val bits/byte, {name} (median)", budget["median_bpb"], TARGETS.get(key), "low", "{:.3f}", judged)
    budgets = sorted(figures.get("quality", []), key=lambda budget: budget["minutes"])
    if len(budgets) > 1 and not quick:  # issue 5: longer budgets improve or hold steady, never end worse
        medians = [budget["median_bpb"] for budget in budgets]
        steady = all(longer <= shorter for shorter, longer in itertools.pairwise(medians))
        out.append(
            (
                "val bits/byte, " + " / ".join(f"{budget['minutes']:g}" for budget in budgets) + " min (medians)",
                " / ".join(f"{median:.3f}" for median in medians),
                "each <= the shorter budget's",
                "yes" if steady else "no",
            )
        )
    # Which budget's runs the MFU and generation figures come from (the suite's default_budget)
    minutes = figures.get("default_minutes")
    runs, model = (f", the {minutes:g} min runs", f", the {minutes:g} min model") if minutes else ("", "")
    if quick:
        runs = model = f" ({QUICK})"
    if figures.get("mfu") is not None:
        label = "MFU of the training step" if quick else "MFU of the default training step"
        add(f"{label}{runs}", figures["mfu"], TARGETS["mfu"], "high", "{:.0%}", not quick)
    generation = figures.get("generation", {})
    for key in ("within_context", "past_context"):
        if f"bytes_per_second_{key}" in generation:
            tokens = generation[f"tokens_{key}"]
            label = f"generation bytes/s, batch 1, {tokens} tokens ({key.replace('_', ' ')}){model}"
            value = generation[f"bytes_per_second_{key}"]
            add(label, value, TARGETS["generation_bytes_per_second"], "high", "{:,}", not quick)
    if "first_token_ms" in generation:
        add(
            f"time to first token, {generation['prompt_bytes']}-byte prompt (ms){model}",
            generation["first_token_ms"],
            TARGETS["first_token_ms"],
            "low",
            judged=not quick,
        )
    labels = {
        "bpe_seconds": "BPE training (s), {}",
        "prepare_seconds": "preparing (s), {}",
        "prepare_peak_mb": "preparing, peak memory (MB), {}",
    }
    for key, value in figures.get("data", {}).items():
        kind, size = key.rsplit("_", 1) if "_" in key else (key, "")
        if kind not in labels:
            continue  # not a figure: the number of runs, the vocabulary size
        label = labels[kind].format(size.replace("MB", " MB"))
        if key in TARGETS:
            add(label, value, TARGETS[key], "low")
        else:  # a size the issue sets no target for (--quick, --megabytes): shown, not judged
            out.append((label, f"{value:g}", "", ""))
    return out


def markdown(figures: dict) -> str:
    corpus = f" Corpus: `{figures['corpus']}` (last 10% held out)." if "corpus" in figures else ""
    lines = [
        f"Machine: {figures.get('machine', '?')}.{corpus}",  # no corpus without the quality runs
        "",
        "| figure | measured | target | met |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(figures)]
    lines += [
        "",
        f"nanoGPT for comparison: {NANOGPT['cpu']['label']}: {NANOGPT['cpu']['bpb']} bits/byte in "
        f"{NANOGPT['cpu']['seconds']} s; {NANOGPT['a100']['label']}: {NANOGPT['a100']['bpb']} bits/byte; its "
        f"sample.py: about {NANOGPT['generation_bytes_per_second']} characters/s.",
    ]
    return "\n".join(lines) + "\n"


def check_plotting() -> None:
    """Refuse, before minutes of measuring, a suite that could not draw its plot at the end."""
    try:
        import matplotlib  # noqa: F401 - only whether it is there
    except ImportError:
        raise UserError(
            "the suite plots its loss curves with matplotlib, which is not installed; pip install -e '.[bench]' "
            "(or --skip quality)"
        ) from None


def draw(figures: dict):
    """The quality runs' validation curves, with nanoGPT's figures, as a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.4), dpi=110)
    for budget in figures.get("quality", []):
        for i, run in enumerate(budget["runs"]):
            seconds, bpb = zip(*run["curve"], strict=True) if run["curve"] else ((), ())
            ax.plot(
                seconds,
                bpb,
                marker=".",
                alpha=0.85 if i == 0 else 0.35,
                label=f"--max-minutes {budget['minutes']:g}" if i == 0 else None,
                color=f"C{figures['quality'].index(budget)}",
            )
    cpu = NANOGPT["cpu"]
    ax.scatter([cpu["seconds"]], [cpu["bpb"]], marker="x", s=80, color="black", label=cpu["label"], zorder=5)
    ax.axhline(NANOGPT["a100"]["bpb"], linestyle="--", color="grey", label=NANOGPT["a100"]["label"])
    ax.set_xlabel("training time (seconds on this machine; start-up and evaluation pauses not counted)")
    ax.set_ylabel("validation bits per byte (lower is better)")
    ax.set_title(f"Validation loss against training time: {figures.get('corpus', '')}")
    ax.grid(alpha=0.3)
    ax.legend()
    slices = sorted(
        {run.get("eval_tokens") for budget in figures.get("quality", []) for run in budget["runs"]} - {None}
    )
    tokens = " or ".join(f"{n:,}" for n in slices) or "a slice of"
    fig.text(
        0.01,
        0.01,
        f"Curves: the evaluations during training, on {tokens} validation tokens. The table's scores are "
        "the whole validation text,\nscored once after training (model.evaluate), so a curve's end is not its run's score.",
        fontsize=7.5,
        color="dimgrey",
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def png(figures: dict) -> bytes:
    import matplotlib.pyplot as plt

    fig = draw(figures)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def check_writable(out: str | Path | None, folder: bool = False) -> None:
    """Refuse, before minutes of measuring, an --out the figures could not be written to."""
    if not out:
        return
    out = Path(out)
    if not folder and out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name for the figures")
    writable_folder(out if folder else out.parent, "--out" if folder else "the folder of --out")


def print_json(figures: dict, out: str | None) -> None:
    """Print one part's figures as JSON, then write them to `out` when given."""
    text = json.dumps(figures, indent=2) + "\n"
    print(text, end="", flush=True)
    if out:
        write_files(Path(out).parent, {Path(out).name: text})


def write_files(folder: Path, outputs: dict[str, str | bytes]) -> None:
    """Write each of `outputs` (name: contents) into `folder` atomically (model/files.py): a full disk
    leaves the earlier file or none, never a half-written one. Call it after printing the figures,
    so that a failed write loses none of them."""
    for name, data in outputs.items():
        path = folder / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_atomically(path, data)
        except OSError as error:
            reason = error.strerror or error
            raise UserError(
                f"could not write {path} ({reason}); the figures are printed above: free some space "
                "or give another --out, and measure again to have the files"
            ) from None


def write(figures: dict, folder: Path) -> list[str]:
    """Write benchmarks.json, benchmarks.md and, with quality runs, their plot to `folder`; a plot an
    earlier run left there is removed, since it would not be this run's. Returns what was done."""
    outputs: dict[str, str | bytes] = {
        "benchmarks.json": json.dumps(figures, indent=2) + "\n",
        "benchmarks.md": markdown(figures),
    }
    if figures.get("quality"):
        outputs[PLOT] = png(figures)
    write_files(folder, outputs)
    done = [f"wrote {', '.join(str(folder / name) for name in outputs)}"]
    if PLOT not in outputs and (folder / PLOT).exists():
        (folder / PLOT).unlink()
        done.append(f"removed an earlier run's {folder / PLOT} (no quality runs to plot)")
    return done
