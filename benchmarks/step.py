"""Where one training step spends its time: forward, backward, clipping and each optimizer.

    python -m benchmarks.step                           # the 5-minute model of the reference Xeon: 5 x 320, dropout 0.2
    python -m benchmarks.step --compare attention       # our CPU attention against PyTorch's kernel
    python -m benchmarks.step --compare dropout         # our dropout masks (model/dropout.py) against F.dropout
    python -m benchmarks.step --dropout 0 --compile
    python -m benchmarks.step --compile --system-malloc  # without training/allocator.py's setting

The step is the trainer's (model/gpt.py, training/optim.py with the cpu preset's settings, bf16
autocast where the CPU has it) on random tokens, so the data pipeline is left out. The model is
shaped as training/budget.py shapes one of `--n-layer` layers (64 wide and one head per layer), with
the dropout the rule gives that depth on a corpus it memorises, such as Tiny Shakespeare: by default
the README's default 5-minute model on the reference Xeon (5 x 320, dropout 0.2; 4 x 256 with 0.1 is
what a Zen 4 trains in 5 minutes). Sizes are refused as train.py would refuse them. Each part is
the median over `--steps` steps after three warm-up steps, and each figure the median of `--rounds`
such rounds. `--compare` swaps one of the model's own implementations for PyTorch's stock one and
alternates the two round by round in one process: on this shared machine the speed drifts by a
third from minute to minute (Muon's time, which neither swap can change, shows it), so separate
runs cannot compare them. MFU is model FLOPs (6N + attention, as the training log counts them)
over the matmul peak of the dtype the step runs in (bf16, or fp32 on a CPU without native bf16),
measured in the same process; Muon's own matrix arithmetic is not model
FLOPs, so it lowers MFU. Prints the figures and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import benchmarks
import model.gpt
from benchmarks import report
from model.config import ModelConfig
from model.device import autocast, matmul_peak_flops, pick_device, pick_dtype
from model.errors import UserError
from model.gpt import GPT
from training.allocator import keep_freed_memory
from training.budget import HEAD_DIM, memorising_dropout
from training.config import PRESETS, TrainConfig
from training.optim import build_optimizers

ROOT = Path(__file__).resolve().parent.parent

PARTS = ("forward", "backward", "clip", "adamw", "muon")
OURS = {"dropout": model.gpt.cheap_dropout, "attention": model.gpt.causal_attention}
STOCK = {  # what each would be with PyTorch's own kernels
    "dropout": lambda x, p, seed=None: F.dropout(x, p) if p else x,
    "attention": model.gpt.fused_causal_attention,
}


def time_step(config: ModelConfig, batch: int, steps: int, compile_model: bool) -> dict[str, float]:
    """Median seconds of each part of a training step (the first three steps warm up)."""
    device = pick_device("auto")
    dtype = pick_dtype(device)
    torch.manual_seed(0)
    network = GPT(config).to(device).train()
    step_fn = torch.compile(network) if compile_model else network
    adamw, *muon = build_optimizers(network, TrainConfig(**{**PRESETS["cpu"], "compile": compile_model}), dtype)
    x = torch.randint(0, config.vocab_size, (batch, config.context), device=device)
    y = torch.randint(0, config.vocab_size, (batch, config.context), device=device)
    times: dict[str, list[float]] = {part: [] for part in PARTS}
    for step in range(steps + 3):
        marks = [time.perf_counter()]
        with autocast(device, dtype):
            loss = step_fn(x, y)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        marks.append(time.perf_counter())
        for optimizer in (adamw, *muon):
            optimizer.step()
            marks.append(time.perf_counter())
        network.zero_grad(set_to_none=True)
        if step >= 3:
            for part, start, end in zip(PARTS, marks, marks[1:], strict=False):
                times[part].append(end - start)
    return {part: statistics.median(values) for part, values in times.items() if values}


def use(part: str | None, version: str) -> None:
    """Point the model's `part` at our implementation (`ours`) or at PyTorch's (`stock`)."""
    for name in OURS:
        setattr(model.gpt, OURS[name].__name__, STOCK[name] if name == part and version == "stock" else OURS[name])


def measure(config: ModelConfig, args: argparse.Namespace, version: str, rounds: list[dict], peak: float) -> dict:
    """Medians over rounds of each part, the step, tokens/s and MFU for one version of the model."""
    parts = {part: statistics.median(r[part] for r in rounds) for part in rounds[0]}
    step = statistics.median(sum(r.values()) for r in rounds)
    flops = GPT(config).flops_per_token() * args.batch_size * args.context
    return {
        "version": version,
        "ms": {part: round(seconds * 1e3, 1) for part, seconds in parts.items()},
        "step_ms": round(step * 1e3, 1),
        "step_ms_each_round": [round(sum(r.values()) * 1e3, 1) for r in rounds],
        "tokens_per_second": round(args.batch_size * args.context / step),
        "mfu": round(flops / step / peak, 5),  # a tiny model on a busy machine can be under 0.1%
        "mfu_forward_backward": round(flops / (parts["forward"] + parts["backward"]) / peak, 5),
    }


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The model to time, with the defaults filled in from the budget rule (into `args` too, so the
    JSON's settings say what ran), refused in one line where train.py would refuse it."""
    if args.n_embd is None:
        args.n_embd = HEAD_DIM * args.n_layer
    if args.dropout is None:
        args.dropout = memorising_dropout(args.n_layer)
    if min(args.n_layer, args.n_embd, args.context, args.batch_size, args.vocab_size, args.steps, args.rounds) < 1:
        raise UserError("sizes, --steps and --rounds must be at least 1")
    heads = max(1, args.n_embd // HEAD_DIM)
    if args.n_embd % heads or args.n_embd // heads % 2:
        raise UserError(
            f"--n-embd {args.n_embd} does not split into {heads} heads of an even size (one head per 64); "
            "give a multiple of 64, or an even width under 64"
        )
    shape = dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=heads, n_kv_head=heads, dropout=args.dropout)
    sizes = dict(context=args.context, batch_size=args.batch_size, vocab_size=args.vocab_size)
    TrainConfig(**{**PRESETS["cpu"], **shape, **sizes}).validate()  # train.py's own checks (--dropout in [0, 1))
    return ModelConfig(vocab_size=args.vocab_size, context=args.context, **shape)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--n-layer", type=int, default=5, help="layers")
    parser.add_argument("--n-embd", type=int, help="width, one head per 64 (default: 64 x --n-layer)")
    preset = TrainConfig(**PRESETS["cpu"])  # the default run's context, batch and vocabulary
    parser.add_argument("--context", type=int, default=preset.context, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=preset.batch_size, help="sequences per step")
    parser.add_argument("--vocab-size", type=int, default=preset.vocab_size, help="vocabulary size")
    parser.add_argument(
        "--dropout",
        type=float,
        help="residual dropout (default: the budget rule's for --n-layer on a memorised corpus)",
    )
    parser.add_argument(
        "--compare",
        choices=list(OURS),
        help="also time the step with PyTorch's stock version of this part, alternating round by round",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's malloc as it is, returning freed memory to the system (training keeps it: training/allocator.py)",
    )
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round (after 3 warm-up steps)")
    parser.add_argument(
        "--rounds", type=int, default=4, help="rounds per version (each --compare version runs this many)"
    )
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "step.json"), help="where to write the figures"
    )
    args = parser.parse_args()
    config = model_config(args)
    report.check_writable(args.out)
    if not args.system_malloc:
        keep_freed_memory()
    versions = ["ours", "stock"] if args.compare else ["ours"]
    rounds: dict[str, list[dict]] = {version: [] for version in versions}
    for number in range(args.rounds):
        for version in versions if number % 2 == 0 else versions[::-1]:  # alternate which goes first
            use(args.compare, version)
            rounds[version].append(time_step(config, args.batch_size, args.steps, args.compile))
    use(None, "ours")
    device = pick_device("auto")
    peak = matmul_peak_flops(device, pick_dtype(device))
    results = [measure(config, args, version, rounds[version], peak) for version in versions]
    for result in results:
        label = f"{result['version']} {args.compare}" if args.compare else "step"
        print(
            f"{label}: "
            + ", ".join(f"{part} {ms:.0f}" for part, ms in result["ms"].items())
            + f"; step {result['step_ms']:.0f} ms (rounds: {result['step_ms_each_round']}); "
            f"{result['tokens_per_second']:,} tokens/s, MFU {result['mfu']:.0%} "
            f"(forward + backward alone {result['mfu_forward_backward']:.0%})"
        )
    out = Path(args.out)
    figures = {"settings": vars(args), "peak_gflops": round(peak / 1e9), "results": results}
    print(f"peak {figures['peak_gflops']} GFLOP/s", flush=True)
    report.write_files(out.parent, {out.name: json.dumps(figures, indent=2) + "\n"})
    print(f"wrote {out}")


if __name__ == "__main__":
    benchmarks.run(main)
