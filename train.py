"""Train a GPT on a text corpus: `python train.py` (built-in corpus, ~5 minutes on 2 CPU cores).

The table of contents of a run: parse the flags (training/config.py), prepare the data once
(data/prepare.py), build or load the model (model/), loop, evaluate and checkpoint
(training/trainer.py), then print a sample from the trained model. Runs unchanged under
`torchrun --nproc_per_node=N train.py ...`.
"""

import sys

from model.errors import run_cli


def main() -> None:
    from training.config import build_parser, checked_config, typed_flags

    typed = typed_flags(build_parser().parse_args())
    if not typed.get("resume"):  # a resumed run's flags are checked against its saved ones, once read
        checked_config(typed)  # a mistyped flag is refused before torch loads (two seconds on two cores)
    from training.trainer import train

    trainer, metrics = train(typed)
    if trainer.dist.is_main and metrics:
        ended = "saved" if trainer.stopped_early() else "done"  # a stopped run has said how to resume
        print(
            f"{ended}: step {metrics['step']}, val {metrics['val_bpb']:.4f} bits/byte; checkpoint in {trainer.out_dir}"
        )
        best = trainer.best
        if best and best["step"] != metrics["step"]:
            print(
                f"the best evaluation was step {best['step']} ({best['val_bpb']:.4f} bits/byte): sampling uses that one"
            )
        if trainer.chat_info:
            print(f"chat with it: python sample.py --checkpoint {trainer.out_dir} --chat   (or: python -m ui)")
        else:
            print(f"sample it: python sample.py --checkpoint {trainer.out_dir} --prompt 'The'")
    if trainer.stopped_early():  # the status of a program the signal stopped: scripts can tell it is unfinished
        sys.exit(128 + trainer.stop_signal)


if __name__ == "__main__":
    run_cli(main, sigterm=True)  # before the loop (which saves on SIGTERM) too: preparing data cleans up and says so
