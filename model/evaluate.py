"""Bits per byte: the number that compares runs, whatever their tokenizer.

    python -m model.evaluate --checkpoint out/base --text FILE

prints one JSON line: bits per byte over the whole file, the mean loss per token, and the token
and byte counts. Bits per byte = total cross-entropy in nats over the scored tokens, divided by
ln 2 and by the UTF-8 bytes those tokens stand for. Special tokens are never counted (they stand
for no bytes), so a char model, a BPE model and GPT-2's tokenizer are measured on the same scale.

Every token of the file is scored exactly once. The file is scored as one document (a document
separator first, so its very first token is scored too) in windows of the model's context that
advance by `--stride` tokens; each window scores only its tokens that no earlier window scored, so
with the default stride of half a context every token after the first window has at least half a
context of history. `--stride` equal to the context gives non-overlapping windows (faster, a
little pessimistic; training's periodic evaluation uses those).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.device import autocast, pick_device, pick_dtype
from model.errors import UserError, run_cli
from model.flags import HelpFormatter, add_device_flags
from model.gpt import GPT


@torch.inference_mode()
def score(model: GPT, batches, token_bytes: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict:
    """Loss and bits per byte over (inputs, targets) batches; targets of -1 are not scored. Scored
    targets that are special tokens (a chat reply's end of turn) stand for no bytes, so they are left
    out of both and reported on their own as "special_loss", their mean loss: how surely the model
    knows where a reply ends (absent when there are none)."""
    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device)
    was_training = model.training
    model.eval()
    nats, nbytes, counted, special_nats, specials = 0.0, 0, 0, 0.0, 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast(device, dtype):
            loss = model(inputs, targets, reduction="none")  # (B, T), 0 where the target is -1
        weights = token_bytes[targets.clamp(min=0)] * (targets >= 0)
        counts = weights > 0  # special tokens stand for no bytes and are not counted
        special = (targets >= 0) & ~counts
        nats += (loss * counts).sum().item()
        nbytes += int(weights.sum())
        counted += int(counts.sum())
        special_nats += (loss * special).sum().item()
        specials += int(special.sum())
    model.train(was_training)
    if nbytes == 0:
        raise UserError("nothing to score: the text is empty")
    result = {"bpb": nats / nbytes / math.log(2), "loss": nats / max(counted, 1), "tokens": counted, "bytes": nbytes}
    if specials:
        result["special_loss"] = special_nats / specials
    return result


def bits_per_byte(
    model: GPT,
    tokens: np.ndarray | list[int],
    token_bytes: torch.Tensor,
    *,
    stride: int | None = None,
    batch_size: int = 16,
    max_tokens: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> dict:
    """Score `tokens` (a document separator should come first) in strided windows; see module doc.
    `progress`: a bar on stderr (when it is a terminal) over the batches of windows."""
    tokens = tokens[: (max_tokens + 1) if max_tokens else None]
    batches = windows(tokens, model.config.context, stride, batch_size)
    if progress:
        count = -(-(len(tokens) - 1) // (stride or model.config.context))
        batches = tqdm(batches, desc="scoring", unit="batch", total=-(-count // batch_size), disable=None)
    return score(model, batches, token_bytes, dtype)


def windows(tokens: np.ndarray | list[int], context: int, stride: int | None = None, batch_size: int = 16):
    """(inputs, targets) batches that predict every token after the first exactly once (targets of -1
    are not scored): windows of at most `context` inputs that advance by `stride` (default: context)."""
    stride = stride or context
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    # Targets a..b-1 are scored by a window of inputs tokens[start : b-1] (at most a context long).
    spans = []  # (start, length, index of the first scored position in the window)
    for a in range(1, len(tokens), stride):
        b = min(a + stride, len(tokens))
        start = max(0, b - 1 - context)
        spans.append((start, b - 1 - start, a - 1 - start))
    for i in range(0, len(spans), batch_size):
        group = spans[i : i + batch_size]
        width = max(length for _, length, _ in group)
        inputs = torch.zeros(len(group), width, dtype=torch.long)
        targets = torch.full((len(group), width), -1, dtype=torch.long)
        for row, (start, length, first) in enumerate(group):
            inputs[row, :length] = tokens[start : start + length]
            targets[row, first:length] = tokens[start + 1 + first : start + 1 + length]
        yield inputs, targets


def encode_file(path: Path, tokenizer) -> np.ndarray:
    """A text file's tokens after a document separator, as int32: encoded in the ~1 MB pieces the
    file is read in (as preparing training data encodes them), so memory holds 4 bytes a token, not
    the whole text and a Python list of it. The text is read as training reads it: a leading BOM
    dropped and CRLF line ends made LF, so those bytes are not scored."""
    from data.sources import text_file_source

    parts = [np.array([tokenizer.doc_separator], dtype=np.int32)]
    with tqdm(desc="tokenizing", unit="B", unit_scale=True, total=path.stat().st_size, disable=None) as bar:
        for _, piece in text_file_source(path).pieces():
            parts.append(np.asarray(tokenizer.encode(piece), dtype=np.int32))
            bar.update(len(piece.encode("utf-8")))
    return np.concatenate(parts)


def check_batch_fits(model: GPT, batch_size: int) -> None:
    """Refuse a --batch-size whose windows cannot fit in memory, before they are allocated: the
    logits and one layer's activations at a time (no backward pass keeps the others), counted as
    training's estimate counts them (training/memory.py)."""
    from training.memory import activation_bytes, available_bytes

    need = activation_bytes(model.config, batch_size, layers=1)
    have = available_bytes()
    if need > have:
        raise UserError(
            f"--batch-size {batch_size:,} needs about {need / 2**30:,.1f} GB for its windows but {have / 2**30:,.1f} GB "
            f"are free: use at most {max(1, batch_size * have // need):,}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model.evaluate",
        description="Bits per byte of a checkpoint over a text file, as one JSON line.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="run folder (uses its best checkpoint, the one BEST names) or checkpoint folder",
    )
    parser.add_argument(
        "--text",
        required=True,
        help="UTF-8 text file to score, read as training reads text (a BOM dropped, CRLF line ends made LF)",
    )
    parser.add_argument("--stride", type=int, default=None, help="window advance in tokens (default: half the context)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows scored at once")
    add_device_flags(parser, decoding=False)
    args = parser.parse_args()

    from model.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    path = Path(args.text)
    if not path.exists() or path.is_dir():
        raise UserError(f"{path} is not a file")
    device = pick_device(args.device)
    model = checkpoint.load_model(device)
    context = model.config.context
    stride = max(1, context // 2) if args.stride is None else args.stride
    if not 1 <= stride <= context:
        raise UserError(f"--stride must be between 1 and the context ({context})")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    check_batch_fits(model, args.batch_size)
    tokenizer = checkpoint.load_tokenizer()
    tokens = encode_file(path, tokenizer)
    if len(tokens) == 1:
        raise UserError(f"{path} is empty")
    result = bits_per_byte(
        model,
        tokens,
        torch.tensor(tokenizer.token_byte_lengths()),
        stride=stride,
        batch_size=args.batch_size,
        dtype=pick_dtype(device, args.dtype),
        progress=True,
    )
    if not math.isfinite(result["bpb"]):
        raise UserError(
            f"the model in {checkpoint.folder} computes a loss that is not a number ({result['bpb']}): "
            "its weights or settings are damaged; score an earlier checkpoint"
        )
    result.update(checkpoint=str(checkpoint.folder), text=str(path), stride=stride, context=context)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    run_cli(main)
