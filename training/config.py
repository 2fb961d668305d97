"""Every training knob in one dataclass, the named presets, and the command line built from them.

A run's configuration is assembled in layers, later ones winning: the dataclass defaults, the
chosen preset, the saved arguments of the run being resumed (with --resume), and finally the flags
typed on the command line. Flags default to None in argparse precisely so that "typed" can be told
apart from "default". The final config is saved in every checkpoint as JSON.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import MISSING, asdict, dataclass, fields

from model.config import ModelConfig
from model.errors import UserError
from model.tokenizer import check_bpe_size
from training.budget import CHOSEN, HEAD_LR, sized_for_budget


@dataclass
class TrainConfig:
    # data
    data: str = "builtin"
    val_data: str | None = None
    text_column: str = "text"
    max_bytes: int | None = None
    tokenizer: str = "bpe"
    vocab_size: int = 2048
    cache_dir: str | None = None
    chat_data: str | None = None
    messages_column: str = "messages"
    max_conversations: int = 0  # 0 = all
    # model
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_kv_head: int = 4
    context: int = 256
    tie_embeddings: bool = False
    dropout: float = 0.0
    token_noise: float = 0.0
    # optimisation
    optimizer: str = "muon"
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    embed_lr: float = 0.01
    muon_lr: float = 0.02
    weight_decay: float = 0.0
    warmup_steps: int = 5
    cooldown: float = 0.4
    grad_clip: float = 1.0
    calibration_tokens: int = 0
    pass_temperature: bool = True
    # budget
    max_steps: int | None = None
    max_minutes: float | None = 5.0
    max_passes: float = 0.0  # 0 = no limit
    # evaluation and output
    eval_interval: int = 200
    eval_tokens: int = 65536
    sample_tokens: int = 64
    log_interval: int = 10
    out_dir: str = "out/base"
    resume: bool = False
    init_from: str | None = None
    # hardware and reproducibility
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    seed: int = 1337
    preset: str = "cpu"
    progress: bool = True

    def vocabulary(self) -> int:
        """The model's vocabulary: GPT-2's for its tokenizer, else --vocab-size (the trained BPE's may be smaller)."""
        return 50257 if self.tokenizer == "gpt2" else self.vocab_size

    def model_config(self) -> ModelConfig:
        """The model these flags describe (the vocabulary is the tokenizer's, known once data is prepared)."""
        return ModelConfig(
            vocab_size=self.vocabulary(),
            context=self.context,
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            n_head=self.n_head,
            n_kv_head=self.n_kv_head,
            tie_embeddings=self.tie_embeddings,
            dropout=self.dropout,
        )

    def validate(self) -> None:
        positive = ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "context", "batch_size", "grad_accum")
        for name in positive + ("log_interval", "eval_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.tokenizer == "bpe":
            check_bpe_size(self.vocab_size)  # before the corpus is prepared, not after
        for name in ("warmup_steps", "eval_interval", "sample_tokens", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise UserError(f"--{name.replace('_', '-')} must be 0 (off) or more, got {getattr(self, name)}")
        numbers = ("lr", "embed_lr", "muon_lr", "weight_decay", "cooldown", "dropout", "token_noise", "max_passes")
        for name in numbers + ("max_minutes",) * (self.max_minutes is not None):
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise UserError(
                f"--n-embd ({self.n_embd}) must be a multiple of --n-head ({self.n_head}), "
                f"and --n-head a multiple of --n-kv-head ({self.n_kv_head})"
            )
        if (self.n_embd // self.n_head) % 2:
            raise UserError("the head size (n_embd / n_head) must be even for rotary embeddings")
        if self.batch_size % self.grad_accum:
            raise UserError("--batch-size must be a multiple of --grad-accum")
        if self.max_steps is None and self.max_minutes is None:
            raise UserError("give a budget: --max-steps or --max-minutes")
        if (self.max_steps is not None and self.max_steps < 1) or (
            self.max_minutes is not None and self.max_minutes <= 0
        ):
            raise UserError("--max-steps and --max-minutes must be positive")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise UserError(f"--max-bytes must be at least 1, got {self.max_bytes}")
        if self.max_passes < 0:
            raise UserError(f"--max-passes must be 0 (no limit) or more, got {self.max_passes}")
        if self.chat_data is not None and not self.chat_data.strip():
            raise UserError("--chat-data is empty; give builtin, a .jsonl file, a folder or a dataset name")
        if self.max_conversations < 0:
            raise UserError(f"--max-conversations must be 0 (all) or more, got {self.max_conversations}")
        if self.max_conversations and not self.chat_data:
            raise UserError("--max-conversations applies to chat fine-tuning (--chat-data)")
        if self.chat_data and self.max_passes:
            raise UserError(
                "--max-passes applies to pre-training; chat fine-tuning stops on --max-steps or --max-minutes"
            )
        if min(self.lr, self.muon_lr, self.embed_lr) <= 0 or self.weight_decay < 0 or not 0 <= self.cooldown <= 1:
            raise UserError("learning rates must be positive, weight decay >= 0, cooldown in [0, 1]")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.token_noise < 1:
            raise UserError(f"--token-noise must be in [0, 1), got {self.token_noise}")
        if self.chat_data and self.token_noise:
            raise UserError("--token-noise applies to pre-training windows; chat fine-tuning does not use it")
        if self.calibration_tokens < 0:
            raise UserError(f"--calibration-tokens must be 0 (off) or more, got {self.calibration_tokens}")
        if self.chat_data and self.calibration_tokens:
            raise UserError("--calibration-tokens applies to pre-training; chat fine-tuning does not use it")
        if self.resume and self.init_from:
            raise UserError("--resume continues a run; --init-from starts a new one: give one of them")


PRESETS: dict[str, dict] = {
    # For tests and a first look: seconds on any machine.
    "tiny": dict(
        vocab_size=512,
        n_layer=2,
        n_embd=64,
        n_head=2,
        n_kv_head=2,
        context=64,
        batch_size=8,
        max_steps=40,
        max_minutes=None,
        eval_interval=20,
        eval_tokens=4096,
        sample_tokens=24,
        warmup_steps=5,
    ),
    # The default: five minutes, the model sized for the budget and the machine (training/budget.py),
    # weight decay on the matrices (benchmarks/NOTES.md, tuning split: -0.02 bits/byte at 90 s, -0.03 at 5 min),
    # a 1,024-token vocabulary (benchmarks/NOTES.md, "A smaller vocabulary, and faster decoding to afford it"),
    # and half the AdamW learning rate for the head and norm scales (chosen on the tuning split at both budgets:
    # NOTES, "The 5-minute recipe at a fixed step count"; the budget rule halves it again for models that
    # memorise, NOTES "The head's learning rate halved again").
    "cpu": dict(weight_decay=0.4, vocab_size=1024, lr=HEAD_LR),
    # Chat fine-tuning (chosen automatically with --chat-data): a few minutes.
    "chat": dict(max_minutes=3.0, batch_size=32, warmup_steps=10, eval_interval=100, sample_tokens=48),
    # One modern GPU: nanoGPT's GPT-2 small shape (124M-class), bf16, compiled.
    "gpu": dict(
        vocab_size=32768,
        n_layer=12,
        n_embd=768,
        n_head=12,
        n_kv_head=12,
        context=1024,
        batch_size=64,
        grad_accum=2,
        max_minutes=60.0,
        eval_interval=500,
        eval_tokens=1 << 20,
        compile=True,
        muon_lr=0.02,
        lr=3e-3,
        warmup_steps=100,
    ),
}

HELP = {
    "data": "training text: builtin (offline default), tinyshakespeare (downloads), a .txt file, a folder, "
    "a .jsonl/.parquet file, or a Hugging Face dataset name (owner/name[:config])",
    "val_data": "separate validation text (default: the last 10%% of --data)",
    "text_column": "field holding the text in .jsonl/.parquet files and hub datasets",
    "max_bytes": "read at most this many bytes of a Hugging Face dataset's training text (default 200 MB; local files are read whole)",
    "chat_data": 'fine-tune for chat on conversations: builtin, a .jsonl of {"messages": [...]}, a .parquet '
    "file, a dataset folder, or a Hugging Face dataset name (needs --init-from a trained model)",
    "messages_column": "column holding the messages in hub chat datasets and .jsonl files",
    "max_conversations": "read only the first this many conversations of --chat-data (a hub dataset's validation "
    "split: a tenth as many); a few minutes of fine-tuning uses thousands, and a large dataset is held in memory "
    "whole (0 = all)",
    "cache_dir": "where prepared token files and the best training speed measured on this machine are kept "
    "(default: data/cache in the project)",
    "tokenizer": "bpe (trained on the data), char (one token per character) or gpt2 (tiktoken's GPT-2)",
    "vocab_size": "vocabulary size of the bpe tokenizer, special tokens included",
    "n_layer": "transformer blocks",
    "n_embd": "width of the residual stream",
    "n_head": "attention heads",
    "n_kv_head": "key/value heads (fewer than --n-head = grouped-query attention)",
    "context": "tokens per training window, the model's context length",
    "tie_embeddings": "share the input embedding and the output head",
    "dropout": "residual dropout while training (helps when the run sees its data many times)",
    "token_noise": "fraction of pre-training input tokens replaced by random ones, targets unchanged, until the "
    "learning rate starts to cool (data augmentation for runs that see their data many times)",
    "optimizer": "muon (Muon for hidden matrices, AdamW for the rest) or adamw (AdamW for all)",
    "batch_size": "sequences per optimizer step, summed over all processes",
    "grad_accum": "micro-steps per optimizer step (splits the batch to save memory)",
    "lr": "peak AdamW learning rate (output head, norms; all matrices with --optimizer adamw)",
    "embed_lr": "peak AdamW learning rate of the token embedding (each row is updated rarely, so it can take a large one)",
    "muon_lr": "peak Muon learning rate for the hidden weight matrices",
    "weight_decay": "decoupled weight decay of the matrices",
    "warmup_steps": "steps of linear learning-rate warm-up",
    "cooldown": "final fraction of the budget over which the learning rate decays linearly to 0",
    "grad_clip": "clip the gradient norm to this (0 = off)",
    "calibration_tokens": "training tokens (the end of the split, at most 5%%) kept out of training to fit the "
    "output temperature, which the saved model carries in its final norm (0 = off)",
    "pass_temperature": "when --calibration-tokens is 0, fold an output temperature that grows with the square root of "
    "the passes over the training data into the saved model: a run that sees a small corpus many times ends "
    "overconfident (training/calibration.py); --no-pass-temperature saves the model as trained",
    "max_steps": "stop after this many optimizer steps",
    "max_minutes": "stop after this many minutes of training; the schedule ends exactly then (or at --max-passes)",
    "max_passes": "stop after this many passes over the training data, if that comes before the other budgets "
    "(the schedule then ends there): a small corpus seen more often is memorised (0 = no limit)",
    "eval_interval": "evaluate, print a sample and save a checkpoint every this many steps (0 = only at the end)",
    "eval_tokens": "validation tokens scored at each evaluation during training",
    "sample_tokens": "tokens in the sample printed at each evaluation (0 = none)",
    "log_interval": "steps between lines in metrics.jsonl",
    "out_dir": "run folder for checkpoints and metrics.jsonl",
    "resume": "continue the run in --out-dir from its latest checkpoint",
    "init_from": "start a new run from the weights (and tokenizer) of this checkpoint",
    "device": "auto, cpu, cuda or cuda:N",
    "dtype": "auto (bf16 where the hardware has it and it multiplies faster than fp32), bf16 or fp32",
    "compile": "compile the model with torch.compile (faster steps after about a minute of compiling on a CPU the first "
    "time, seconds once cached; a CPU needs a C++ compiler such as g++)",
    "seed": "random seed for initialisation and data order",
    "preset": f"named defaults: {', '.join(PRESETS)} (cpu: ~5 minutes on 2 cores; tiny: seconds; "
    "chat: fine-tuning, the default with --chat-data; gpu: GPT-2 small)",
    "progress": "show progress bars (--no-progress for logs)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a GPT on a text corpus. `python train.py` trains the default model on the built-in corpus.",
    )
    for field in fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not MISSING else None
        kind = field.type.split(" |")[0] if isinstance(field.type, str) else field.type
        if field.name in CHOSEN:
            preset_value = PRESETS["cpu"].get(field.name)
            unsized = "" if preset_value is None else f", {preset_value} in the cpu preset without it"
            shown = f"sized for --max-minutes in the cpu preset{unsized}, else {default}"
        elif field.name in PRESETS["cpu"]:
            shown = f"{PRESETS['cpu'][field.name]} in the cpu preset, else {default}"
        else:
            shown = str(default)
        if others := [f"{PRESETS[p][field.name]} in {p}" for p in PRESETS if p != "cpu" and field.name in PRESETS[p]]:
            shown += f"; {', '.join(others)}"  # what --preset tiny, chat or gpu sets instead
        if kind == "bool":
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{HELP[field.name]} (default: {shown})",
            )
            continue
        convert = {"int": int, "float": float, "str": str}[kind]
        choices = {
            "preset": list(PRESETS),
            "tokenizer": ["bpe", "char", "gpt2"],
            "optimizer": ["muon", "adamw"],
            "dtype": ["auto", "bf16", "fp32"],
        }.get(field.name)
        parser.add_argument(
            flag, type=convert, default=None, choices=choices, help=f"{HELP[field.name]} (default: {shown})"
        )
    return parser


def typed_flags(args: argparse.Namespace) -> dict:
    """The flags the user actually gave."""
    return {k: v for k, v in vars(args).items() if v is not None}


def preset_of(typed: dict, saved: dict | None = None) -> str:
    """The preset a run uses: typed, else the resumed run's, else chat with --chat-data, else cpu."""
    chat = typed.get("chat_data") or (saved or {}).get("chat_data")
    return typed.get("preset") or (saved or {}).get("preset") or ("chat" if chat else "cpu")


def budget_minutes(typed: dict, saved: dict | None) -> float | None:
    """The time budget training/budget.py sizes the model for, where it applies (a new pre-training run
    of the cpu preset with a time budget, not one from --init-from, whose model is its base's, nor one
    typed to end after --max-steps without a typed --max-minutes); None elsewhere."""
    preset = preset_of(typed, saved)
    minutes = {"max_minutes": TrainConfig.max_minutes, **PRESETS[preset], **typed}["max_minutes"]
    new_model = not (saved or typed.get("init_from") or typed.get("chat_data"))
    by_steps = "max_steps" in typed and "max_minutes" not in typed  # ends by steps: not sized for the time
    return minutes if preset == "cpu" and new_model and minutes and not by_steps else None


def budget_sizing(
    typed: dict, saved: dict | None, step_flops: float | None, corpus_tokens: int | None, peak_flops: float | None
) -> dict:
    """The settings training/budget.py picks (CHOSEN), where it applies and the machine's training FLOP/s
    and the corpus's size in tokens are known (tests and other callers may pass neither; without the
    matmul peak the anchor's rate alone predicts the passes)."""
    minutes = budget_minutes(typed, saved)
    if not (minutes and step_flops and corpus_tokens):
        return {}
    known = {f.name for f in fields(TrainConfig)}
    run = TrainConfig(**{k: v for k, v in {**PRESETS[preset_of(typed)], **typed}.items() if k in known})
    kept = dict(vocab_size=run.vocabulary(), context=run.context, tie_embeddings=run.tie_embeddings)
    compiled = typed.get("compile")  # None: the budget decides
    return sized_for_budget(minutes, step_flops, corpus_tokens, peak_flops, compiled, kept)


# What a run is made of: --resume continues it as it was, so none of these may change (and a fine-tune
# keeps its base model's shape, the part of this that --init-from brings).
RUN_IDENTITY = (
    "data",
    "val_data",
    "text_column",
    "tokenizer",
    "vocab_size",
    "chat_data",
    "messages_column",
    "max_conversations",
    "optimizer",
)
MODEL_SHAPE = ("n_layer", "n_embd", "n_head", "n_kv_head", "context", "tie_embeddings")
PRETRAINING_DATA = ("data", "val_data", "text_column", "max_bytes")


def inherited(base_meta: dict, chat: bool) -> dict:
    """What a run started from a checkpoint (--init-from) takes from it rather than from flags: the
    model's shape and tokenizer, and for a chat fine-tune, which reads no corpus, the pre-training
    data. Its saved config then describes the model it holds, and a --resume of it agrees."""
    trained = base_meta.get("train", {})
    tokenizer = (base_meta.get("data") or {}).get("tokenizer", {}).get("kind", trained.get("tokenizer"))
    values = {name: base_meta["model"][name] for name in MODEL_SHAPE}
    values |= {"tokenizer": tokenizer, "vocab_size": trained.get("vocab_size", base_meta["model"]["vocab_size"])}
    if chat:
        values |= {name: trained.get(name) for name in PRETRAINING_DATA}
    return values


def check_vocab_flag(typed: dict, config: TrainConfig) -> None:
    """Refuse a typed --vocab-size for a tokenizer it does not size (char and gpt2 have their own)."""
    if "vocab_size" in typed and config.tokenizer != "bpe":
        raise UserError(
            f"--vocab-size sets the size of the bpe tokenizer; --tokenizer {config.tokenizer} has its own "
            "vocabulary: drop --vocab-size"
        )


def checked_config(typed: dict, saved: dict | None = None) -> TrainConfig:
    """The run's config before the budget sizes it (`assemble`), with every check the flags alone allow.
    It needs no torch, so train.py refuses a mistyped flag before loading it (two seconds on two cores)."""
    config = assemble(typed, saved)
    check_vocab_flag(typed, config)
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's
    if config.batch_size % (config.grad_accum * processes):
        raise UserError(
            f"--batch-size ({config.batch_size}) must be divisible by --grad-accum ({config.grad_accum}) times "
            f"the number of processes ({processes})"
        )
    return config


def check_unchanged(typed: dict, recorded: dict, names: tuple[str, ...], what: str) -> None:
    """Refuse a typed flag that would change what `recorded` (a resumed run, a base model) already is."""
    for name in names:
        if name in typed and name in recorded and typed[name] != recorded[name]:
            had = "none" if recorded[name] is None else recorded[name]
            raise UserError(
                f"--{name.replace('_', '-')} {typed[name]} differs from the {what}'s ({had}) and cannot change; drop the flag"
            )


def assemble(
    typed: dict,
    saved: dict | None = None,
    step_flops: float | None = None,
    corpus_tokens: int | None = None,
    peak_flops: float | None = None,
) -> TrainConfig:
    """defaults < preset < size for the budget (budget_sizing) < saved run arguments < typed flags."""
    if "n_head" in typed and "n_kv_head" not in typed and not saved:  # a typed head count: full attention
        typed = {**typed, "n_kv_head": typed["n_head"]}  # unless --n-kv-head asks for grouped queries
    preset = preset_of(typed, saved)
    sized = budget_sizing(typed, saved, step_flops, corpus_tokens, peak_flops)
    values = {**PRESETS[preset], **sized, **(saved or {}), **typed, "preset": preset}
    known = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in values.items() if k in known})
    config.validate()
    return config


def saved_arguments(train: object, source: str) -> dict:
    """A resumed run's saved arguments (checkpoint.json's "train", which no checksum covers), checked
    against the config's types: a damaged file is refused by name, not met later as a traceback."""
    if not isinstance(train, dict):
        raise UserError(f"{source} is damaged: it has no run arguments; resume from an earlier checkpoint")
    kinds = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
    for field in fields(TrainConfig):
        kind, _, optional = str(field.type).partition(" | ")
        value = train.get(field.name)
        if field.name not in train or (value is None and optional):
            continue
        if not isinstance(value, kinds[kind]) or (isinstance(value, bool) and kind != "bool"):
            raise UserError(f"{source} is damaged: its {field.name} is {value!r}; resume from an earlier checkpoint")
    return {k: v for k, v in train.items() if k not in ("resume", "init_from")}


def to_dict(config: TrainConfig) -> dict:
    return asdict(config)
