"""Generation speed at batch 1: bytes per second within and past the context, and time to first token.

    python -m benchmarks.generation --checkpoint out/base [--runs 5]

- Throughput: sample `context` tokens, then `4 x context` tokens (three quarters of the second run
  are past the context, where the cache rolls), at temperature 0.8 with a fixed seed per run.
  Output bytes over wall time. "Flat" means the long run is about as fast per byte as the short one.
- Time to first token: a 1,000-byte prompt (the model's own sampled text, so any corpus works),
  timed from the call to the first text piece. A prompt longer than the context is cut to its
  newest tokens, as the engine documents.
Each figure is the median of `--runs` runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import benchmarks
from benchmarks import report
from model.checkpoint import load_checkpoint
from model.device import pick_dtype
from model.engine import Engine
from model.errors import UserError
from model.flags import add_int8_weights_flag
from model.sampling import SamplingConfig


def bytes_per_second(engine: Engine, tokens: int, seed: int) -> float:
    sampling = SamplingConfig(max_new_tokens=tokens, temperature=0.8, seed=seed, stop_at_special=False)
    start = time.perf_counter()
    text = engine.generate([""], sampling)[0]
    return len(text.encode()) / (time.perf_counter() - start)


def first_token_seconds(engine: Engine, prompt: str) -> float:
    start = time.perf_counter()
    next(iter(engine.stream([engine.encode_prompt(prompt)], SamplingConfig(max_new_tokens=8, seed=0))))
    return time.perf_counter() - start


def measure(checkpoint_dir: str, runs: int = 5, decoder: str = "c", int8_weights: bool = True) -> dict:
    checkpoint = load_checkpoint(checkpoint_dir)
    model = checkpoint.load_model(torch.device("cpu"))
    dtype = pick_dtype(torch.device("cpu"))
    engine = Engine(model, checkpoint.load_tokenizer(), dtype, use_c=decoder == "c", int8_weights=int8_weights)
    context = model.config.context
    prompt_source = engine.generate([""], SamplingConfig(max_new_tokens=2 * context, seed=0, stop_at_special=False))[0]
    prompt = (prompt_source * 8).encode()[:1000].decode(errors="ignore")
    decoder = "c" if engine.decoder.native else "torch"  # what actually ran (c falls back without a compiler)
    figures: dict = {"checkpoint": str(checkpoint.folder), "context": context, "runs": runs, "decoder": decoder}
    figures["weights"] = "int8" if int8_weights and engine.decoder.native else "fp32"
    for label, tokens in (("within_context", context), ("past_context", 4 * context)):
        bytes_per_second(engine, tokens, seed=0)  # warm-up
        rates = [bytes_per_second(engine, tokens, seed) for seed in range(1, runs + 1)]
        figures[f"bytes_per_second_{label}"] = round(statistics.median(rates))
        figures[f"tokens_{label}"] = tokens
    first_token_seconds(engine, prompt)
    times = [first_token_seconds(engine, prompt) for _ in range(runs)]
    figures["prompt_bytes"] = len(prompt.encode())
    figures["first_token_ms"] = round(1000 * statistics.median(times), 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="run folder or step folder to generate from")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per figure (medians are reported)")
    parser.add_argument(
        "--decoder",
        choices=("c", "torch"),
        default="c",
        help="decode step: the compiled C one, or PyTorch's (model/decoder.py)",
    )
    add_int8_weights_flag(parser)  # on by default, as sample.py and the UI decode
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.runs < 1:
        raise UserError("--runs must be at least 1")
    report.check_writable(args.out)
    figures = measure(args.checkpoint, args.runs, args.decoder, args.int8_weights)
    report.print_json(figures, args.out)


if __name__ == "__main__":
    benchmarks.run(main)
