"""Generate text from a checkpoint, streamed to the terminal as it is produced.

    python sample.py --prompt "ROMEO:"             # newest checkpoint under out/
    python sample.py --checkpoint out/base --prompt-file prompt.txt --num-samples 3
    echo "Once upon a time" | python sample.py --prompt -
    python sample.py --chat                         # talk to it; scripted: printf 'hi\n' | python sample.py --chat

All generation goes through model/engine.py, the same engine the UI uses. Several samples are
generated as one batch; the first streams live and the others follow when they are complete.
`--chat` renders the conversation with model/chat_template.py, exactly as the UI does; when
standard input is not a terminal, each line is one user message and each reply is printed.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from model.errors import UserError, run_cli
from model.flags import HelpFormatter, add_device_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate text from a trained checkpoint.", formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--checkpoint", help="run folder or checkpoint folder (default: the newest run under --out-root)"
    )
    parser.add_argument(
        "--out-root", default="out", help="where to look for the newest run when --checkpoint is not given"
    )
    parser.add_argument(
        "--prompt", help="text to continue; '-' reads it from standard input (without its final line end)"
    )
    parser.add_argument(
        "--prompt-file",
        help="read the prompt from this UTF-8 file ('-' for standard input), without its final line end",
    )
    parser.add_argument("--num-samples", type=int, default=1, help="how many samples to generate (as one batch)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate per sample")
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="randomness; 0 means greedy (always the likeliest token)"
    )
    parser.add_argument("--top-k", type=int, default=0, help="sample only from the k likeliest tokens (0 = off)")
    parser.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample from the smallest set of tokens with this much probability (1 = off)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible samples")
    parser.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    parser.add_argument("--chat", action="store_true", help="chat: read user messages, print the model's replies")
    parser.add_argument("--system", help="system prompt for --chat")
    add_device_flags(parser)
    return parser


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that would be ignored, or would fight over the prompt, before anything loads."""
    from model.tokenizer import has_lone_surrogate

    if args.system is not None and not args.chat:
        raise UserError("--system is the system prompt of --chat; add --chat, or leave --system out")
    chat_ignores = {"--prompt": args.prompt is not None, "--prompt-file": args.prompt_file is not None}
    chat_ignores["--num-samples"] = args.num_samples != 1
    for flag, given in chat_ignores.items():
        if args.chat and given:
            raise UserError(f"--chat reads each message from standard input and writes one reply; leave out {flag}")
    if args.checkpoint is not None and not args.checkpoint.strip():
        raise UserError(
            "--checkpoint is empty; give a run or checkpoint folder, or leave the flag out for the newest run"
        )
    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give the prompt with --prompt or with --prompt-file, not both")
    for flag, text in (("--prompt", args.prompt), ("--system", args.system), *(("--stop", t) for t in args.stop)):
        if text is not None and has_lone_surrogate(text):  # argv bytes that are not UTF-8
            raise UserError(f"the text of {flag} is not UTF-8 text; give it in UTF-8")


def read_prompt(args: argparse.Namespace) -> str:
    source = args.prompt_file or (args.prompt if args.prompt == "-" else None)
    if source is None:
        return args.prompt or ""
    if source == "-":
        data = sys.stdin.buffer.read()
        where = "standard input"
    else:
        path = Path(source)
        if not path.exists():
            raise UserError(f"prompt file {path} does not exist")
        if path.is_dir():
            raise UserError(f"prompt file {path} is a folder; give a text file")
        try:
            data, where = path.read_bytes(), str(path)
        except OSError as error:
            raise UserError(f"cannot read the prompt file {path} ({error.strerror}); give a text file") from None
    try:
        text = data.decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError:
        raise UserError(f"the prompt from {where} is not UTF-8 text") from None
    return text.removesuffix("\n")  # the line end echo and editors add is not part of the prompt


def main() -> None:
    args = build_parser().parse_args()
    from model.checkpoint import load_checkpoint, newest_run
    from model.device import pick_device, pick_dtype
    from model.engine import Engine
    from model.sampling import SamplingConfig

    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    sampling.validate()
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
    check_flags(args)
    checkpoint = load_checkpoint(args.checkpoint or newest_run(args.out_root))
    device = pick_device(args.device)
    model, tokenizer = checkpoint.load_model(device), checkpoint.load_tokenizer()
    engine = Engine(model, tokenizer, pick_dtype(device, args.dtype), int8_weights=args.int8_weights)
    if args.chat:
        chat(engine, checkpoint.meta, sampling, args.system or "")
        return
    check_fits(engine, args.num_samples)
    prompt = read_prompt(args)
    tokens = engine.encode_prompt(prompt)
    if len(tokens) - 1 > engine.context:  # the text's tokens, after the document separator that starts them
        print(
            f"note: the prompt is {len(tokens) - 1} tokens; the model sees its last {engine.context}", file=sys.stderr
        )

    texts = [""] * args.num_samples
    pieces = engine.stream([tokens] * args.num_samples, sampling)
    first = next(pieces, None)  # the prompt's forward pass: its refusal (a model computing NaN) comes before any output
    out = sys.stdout
    if args.num_samples > 1:
        out.write("--- sample 1 ---\n")
    out.write(prompt)
    out.flush()
    for row, piece in itertools.chain([first] if first else [], pieces):
        texts[row] += piece
        if row == 0:
            out.write(piece)
            out.flush()
    out.write("\n")
    for number in range(1, args.num_samples):
        out.write(f"--- sample {number + 1} ---\n{prompt}{texts[number]}\n")
    out.flush()


def check_fits(engine, samples: int) -> None:
    """Refuse, before anything is allocated, more samples than their key/value cache leaves memory for
    (all samples are one batch, each row with a cache of the whole context), as train.py refuses a run."""
    from training.memory import available_bytes

    per_sample, free = engine.cache_bytes(1), available_bytes()
    if samples * per_sample > free:
        raise UserError(
            f"--num-samples {samples:,} needs about {samples * per_sample / 2**30:,.1f} GB for the key/value cache "
            f"({per_sample / 2**20:,.2f} MB a sample) but {free / 2**30:,.1f} GB are free: ask for fewer "
            f"(the cache alone leaves room for {free // per_sample:,}), or run the command several times"
        )


def chat(engine, meta: dict, sampling, system: str) -> None:
    """A conversation in the terminal (or scripted through a pipe), one user message per line."""
    from model.chat_template import prompt_budget, stream_reply, template_for

    template = template_for(meta, engine.tokenizer)
    interactive = sys.stdin.isatty()
    messages = [{"role": "system", "content": system}] if system else []
    template.check_system(messages, prompt_budget(engine.context, sampling.max_new_tokens))  # before any input
    if interactive:
        print(f"chatting with a {'chat' if template.name == 'turns' else 'base'} model; Ctrl-D to quit")
    number = 0
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        raw = sys.stdin.buffer.readline()  # UTF-8 whatever the locale says (PYTHONIOENCODING=ascii, LANG=C)
        number += 1
        if not raw:
            break
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8").replace("\r\n", "\n")
        except UnicodeDecodeError:
            problem = f"line {number} of the input is not UTF-8 text"
            if not interactive:
                raise UserError(f"{problem}; convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            print(f"error: {problem}; set your terminal to UTF-8 and type it again", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        try:
            prompt, pieces = stream_reply(engine, template, messages, sampling)
        except UserError as error:
            if not interactive:
                raise
            print(f"error: {error}", file=sys.stderr)  # a person can type a shorter message
            messages.pop()
            continue
        if prompt.dropped:
            print(
                f"(the {prompt.dropped} oldest messages no longer fit the context and were left out)", file=sys.stderr
            )
        if interactive:
            print("model> ", end="", flush=True)
        reply = ""
        for piece in pieces:
            piece = piece if reply else piece.lstrip()
            reply += piece
            print(piece, end="", flush=True)
        print(flush=True)
        messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    run_cli(main)
