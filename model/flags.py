"""The command-line flags that choose where and how precisely a model runs, shared by `sample.py`,
the chat UI (`python -m ui`) and the evaluator, so each means the same everywhere.

Kept free of torch imports: the scripts build their parsers before importing torch, so `--help`
answers at once.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after a flag's help, except where it would say nothing (no value, an
    empty one, a switch that is off) or repeat what the help says of the default already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        empty = action.default is None or action.default is False or action.default in ("", [])
        if empty or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_device_flags(parser: argparse.ArgumentParser, decoding: bool = True) -> None:
    """--device and --dtype; with `decoding`, also --int8-weights (add_int8_weights_flag)."""
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="matmul precision of the forward passes (auto: bf16 where the hardware computes it natively and faster than fp32)",
    )
    if decoding:
        add_int8_weights_flag(parser)


def add_int8_weights_flag(parser: argparse.ArgumentParser) -> None:
    """--int8-weights / --no-int8-weights: the C decode step's matrices (model/decoder.py)."""
    parser.add_argument(
        "--int8-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode with int8 copies of the matrices, one scale per output: a quarter of fp32's memory "
        "traffic per token, no measurable change in bits per byte (--no-int8-weights: fp32, exact)",
    )
