"""The checkpoint format: the one place that knows how a model is laid out on disk.

A run folder (`out/NAME/`) holds `metrics.jsonl`, a `LATEST` file naming the newest complete
checkpoint (what `--resume` continues), a `BEST` file naming the one with the lowest validation
loss so far (what sampling, evaluation, the UI and `--init-from` load: a run that trains past its
best point keeps it), and those checkpoints' folders `step-NNNNNNN/`:

    model.safetensors      the weights (safetensors: loading never executes code, unlike pickle)
    checkpoint.json        format and version, model config, training arguments, latest metrics,
                           step, data description, chat template, a sha256 of every other file,
                           and the structure of the trainer state
    tokenizer.json         the tokenizer (see model/tokenizer.py)
    tokenizer.tiktoken
    trainer.safetensors    optimizer moments and RNG states, for --resume (absent in exports)

Writes are atomic: a checkpoint is written into a hidden temporary folder, flushed to disk, renamed
into place, and only then does `LATEST` (replaced atomically) point at it; older checkpoints are
deleted last (model/files.py). A crash at any moment leaves `LATEST` naming a complete checkpoint;
a full disk leaves the previous one in place and says so. Loading checks the format version, that
the pointers name folders of this run, every checksum, and that what checkpoint.json records (the one
file no checksum covers) has the shape its readers expect, and says which file is wrong and why.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from model.config import ModelConfig
from model.errors import UserError
from model.files import TEMPORARY, WRITE_ERRORS, remove_abandoned, settle_files, temporary_name, write_atomically
from model.gpt import GPT
from model.tokenizer import Tokenizer

FORMAT = "pocketgpt-checkpoint"
VERSION = 1
POINTER = "LATEST"
BEST = "BEST"
METRICS = "metrics.jsonl"
LOCK = ".lock"  # held by the training process writing the run (training/run_lock.py)
MAX_CONTEXT = 2**20  # tokens; far past what a CPU trains, and a bound a damaged config cannot pass
STEP_FOLDER = re.compile(r"step-\d{7}\+*")  # step-NNNNNNN, with a + per same-step save


@dataclass
class Checkpoint:
    folder: Path
    meta: dict

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.meta["model"])

    @property
    def step(self) -> int:
        return self.meta["step"]

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer, refused if it has ids the model has no embedding for (they would fail as an
        IndexError at the first special token; a model may have more rows than its tokenizer uses)."""
        tokenizer = Tokenizer.load(self.folder)
        if tokenizer.n_vocab > self.model_config.vocab_size:
            raise UserError(
                f"{self.folder / 'tokenizer.tiktoken'} has {tokenizer.n_vocab} ids but the model has "
                f"{self.model_config.vocab_size}; the checkpoint is damaged"
            )
        return tokenizer

    def load_model(self, device: torch.device | str = "cpu") -> GPT:
        model = GPT(self.model_config)
        try:  # on the CPU, so that an error here is the file's and not the device's
            load_model(model, self.folder / "model.safetensors", strict=True)
        except (SafetensorError, RuntimeError) as error:
            first = str(error).strip().splitlines()[-1].strip()[:200]  # torch lists every mismatch on its own line
            raise UserError(
                f"{self.folder / 'model.safetensors'} does not fit the model config ({first}); it is damaged"
            ) from None
        return model.to(device)

    def load_trainer_state(self) -> dict:
        """The optimizer and RNG state saved for --resume."""
        if "trainer_state" not in self.meta:
            raise UserError(f"{self.folder} has no trainer state, so it cannot be resumed; use --init-from")
        tensors = _read_tensors(self.folder / "trainer.safetensors")
        return _unpack(self.meta["trainer_state"], tensors)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: GPT,
    tokenizer: Tokenizer,
    meta: dict,
    trainer_state: dict | None = None,
    best: bool = False,
) -> Path:
    """Write a complete checkpoint for `step` under `run_dir`, point LATEST (and BEST if `best`) at it.

    If the disk fills up (or any write fails) the partial copy is removed and the error says that
    the previous checkpoint is intact: nothing it points at has been touched yet.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned(run_dir)
    name = f"step-{step:07d}"
    if name not in (_pointed(run_dir, POINTER), _pointed(run_dir, BEST)):
        shutil.rmtree(run_dir / name, ignore_errors=True)  # renamed into place, then killed before LATEST moved
    while (run_dir / name).exists():
        name += "+"
    tmp = temporary_name(run_dir / name)
    try:
        _write_folder(tmp, model, tokenizer, {**meta, "step": step}, trainer_state)
        os.replace(tmp, run_dir / name)
        write_atomically(run_dir / POINTER, name + "\n")
        if best:
            write_atomically(run_dir / BEST, name + "\n")
    except WRITE_ERRORS as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if _pointed(run_dir, POINTER) != name:
            shutil.rmtree(run_dir / name, ignore_errors=True)
        raise write_failed(run_dir, f"checkpoint {name} in {run_dir}", error) from None
    keep = {name, _pointed(run_dir, BEST) or name}
    for old in run_dir.glob("step-*"):
        if STEP_FOLDER.fullmatch(old.name) and old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return run_dir / name


def _write_folder(folder: Path, model: GPT, tokenizer: Tokenizer, meta: dict, trainer_state: dict | None) -> None:
    """Every file of one checkpoint, checksummed in checkpoint.json and flushed to disk."""
    folder.mkdir()
    save_model(model, str(folder / "model.safetensors"))
    tokenizer.save(folder)
    meta = {**meta, "format": FORMAT, "version": VERSION, "model": model.config.to_dict()}
    if trainer_state is not None:
        tensors: dict[str, torch.Tensor] = {}
        meta["trainer_state"] = _pack(trainer_state, tensors)
        save_file(tensors, str(folder / "trainer.safetensors"))
    meta["files"] = {p.name: _sha256(p) for p in sorted(folder.iterdir())}
    (folder / "checkpoint.json").write_text(json.dumps(meta, indent=2) + "\n")
    settle_files(folder)


WRITE_ADVICE = {
    errno.ENOSPC: "Free some space",
    errno.EDQUOT: "Free some space",
    errno.EACCES: "Make the run folder writable",
    errno.EPERM: "Make the run folder writable",
    errno.EROFS: "Copy the run to a writable disk",
}


def write_failed(run_dir: Path, what: str, error: Exception) -> UserError:
    """The error for a write into a run folder that failed (a full disk, most often), with what to do
    about its cause."""
    latest = _pointed(run_dir, POINTER)
    kept = f"the last complete checkpoint {latest} is intact" if latest else "no checkpoint was written yet"
    reason = getattr(error, "strerror", None) or error
    advice = WRITE_ADVICE.get(getattr(error, "errno", None), "Remove the cause")
    return UserError(f"could not write {what}: {reason}; {kept}. {advice}, then continue with --resume")


def strangers(run_dir: Path) -> list[str]:
    """Names in `run_dir` that a run does not write there (a new run refuses to train among them,
    since it deletes old checkpoints and rewrites the log)."""
    if not run_dir.is_dir():
        return []
    ours = (POINTER, BEST, METRICS, LOCK)
    return sorted(
        p.name
        for p in run_dir.iterdir()
        if p.name not in ours and not STEP_FOLDER.fullmatch(p.name) and not p.name.startswith(TEMPORARY)
    )


def _pointed(run_dir: Path, pointer: str) -> str | None:
    """The checkpoint folder name a pointer file holds, if it holds a plain name."""
    path = run_dir / pointer
    try:
        name = path.read_text().strip() if path.is_file() else ""
    except (OSError, UnicodeDecodeError):
        name = ""
    return name if name.startswith("step-") and _plain(name) else None


def _plain(name: str) -> bool:
    """A file or folder name inside its folder: no separators, not hidden, not `..`."""
    return "/" not in name and "\\" not in name and not name.startswith(".")


def resolve(path: Path | str, latest: bool = False) -> Path:
    """A run folder (follow BEST, or LATEST if `latest` or there is no BEST) or a checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint folder {path} does not exist; train one with `python train.py`")
    pointer = POINTER if latest or not (path / BEST).is_file() else BEST
    if (path / pointer).is_file():
        name = _pointed(path, pointer)
        if name is None:
            raise UserError(
                f"{path / pointer} does not name a checkpoint folder of this run; the run folder is damaged"
            )
        target = path / name
        if not target.is_dir():
            raise UserError(f"{path / pointer} names {target.name}, which is missing; the run folder is damaged")
        return target
    if (path / "checkpoint.json").is_file():
        return path
    if path.is_file():  # a file of a checkpoint (model.safetensors), or of a run (metrics.jsonl)?
        holds = (path.parent / "checkpoint.json").is_file() or (path.parent / POINTER).is_file()
        where = f"pass its folder, {path.parent}" if holds else "pass a run folder or a checkpoint folder"
        raise UserError(f"{path} is a file, not a checkpoint: {where}")
    raise UserError(f"{path} is not a checkpoint: it has neither {POINTER} nor checkpoint.json")


def load_checkpoint(path: Path | str, latest: bool = False) -> Checkpoint:
    """Open and verify a checkpoint (format, version, checksums) without loading weights yet.

    A run folder opens its best checkpoint, or with `latest` its newest (to resume training).
    """
    folder = resolve(path, latest)
    try:
        meta = json.loads((folder / "checkpoint.json").read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{folder / 'checkpoint.json'} cannot be read: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{folder / 'checkpoint.json'} is not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise UserError(
            f"{folder} is checkpoint format version {meta.get('version')}; this code reads version {VERSION}"
        )
    files = meta.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files:
        raise UserError(
            f"{folder / 'checkpoint.json'} lists no checksum for model.safetensors; the checkpoint is damaged"
        )
    for name, digest in files.items():
        if not _plain(name):
            raise UserError(f"{folder / 'checkpoint.json'} lists a file outside its folder ({name!r}); refusing it")
        if not (folder / name).is_file():
            raise UserError(f"{folder / name} is missing; the checkpoint is incomplete")
        if _sha256(folder / name) != digest:
            raise UserError(f"{folder / name} does not match its checksum; the file is damaged")
    _check_shape(folder, meta)
    _check_records(folder, meta)
    return Checkpoint(folder, meta)


def _check_shape(folder: Path, meta: dict) -> None:
    """The model config and step checkpoint.json records (the one file no checksum covers) are usable."""
    try:
        config = ModelConfig.from_dict(meta["model"])
        sizes = [getattr(config, f) for f in ("vocab_size", "context", "n_layer", "n_embd", "n_head", "n_kv_head")]
        sizes += [config.head_dim, config.mlp_hidden, meta["step"]]
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as error:
        raise UserError(f"{folder / 'checkpoint.json'} has no usable model config ({error!r}); it is damaged") from None
    if not all(type(size) is int and size >= 0 for size in sizes) or min(sizes[:-1]) < 1:
        raise UserError(
            f"{folder / 'checkpoint.json'} records sizes that are not positive whole numbers; it is damaged"
        )
    settings = {  # a rotary base of 0 or a negative norm epsilon computes NaN; a string fails deep in a layer
        "rope_theta": is_number(config.rope_theta) and 0 < config.rope_theta < math.inf,
        "norm_eps": is_number(config.norm_eps) and 0 <= config.norm_eps < math.inf,
        "dropout": is_number(config.dropout) and 0 <= config.dropout < 1,
        "tie_embeddings": type(config.tie_embeddings) is bool,
    }
    if bad := [(name, getattr(config, name)) for name, usable in settings.items() if not usable]:
        raise damaged_record(folder, "a model setting no model has", bad)
    # Checked before the model is built, which allocates what the config says (the rotary tables
    # alone are 16 bytes per position and dimension): a config larger than its weights would end in
    # an allocator's traceback, or in the kernel's out-of-memory killer.
    if config.context > MAX_CONTEXT:
        raise UserError(
            f"{folder / 'checkpoint.json'} records a context of {config.context:,} tokens, more than the "
            f"{MAX_CONTEXT:,} this code runs; it is damaged"
        )
    stored = _parameters_in(folder / "model.safetensors")
    if stored != config.num_parameters():
        raise UserError(
            f"{folder / 'checkpoint.json'} describes a model of {config.num_parameters():,} parameters but "
            f"model.safetensors holds {stored:,}; the checkpoint is damaged"
        )


def _check_records(folder: Path, meta: dict) -> None:
    """What else checkpoint.json records and sampling, the UI or training read (latest and best
    metrics, tokens trained on, the data and chat descriptions) has the types they read it as."""
    wrong = []  # (field, value)
    for table in ("metrics", "best"):
        values = meta.get(table, {})
        if not isinstance(values, dict):
            wrong.append((table, values))
            continue
        wrong += [(f"{table}.{name}", value) for name, value in values.items() if not is_number(value)]
    tokens = meta.get("tokens_seen", 0)
    if type(tokens) is not int or tokens < 0:
        wrong.append(("tokens_seen", tokens))
    for table, fields in (("data", {"source": str, "tokenizer": dict, "splits": dict}), ("chat", {"template": str})):
        values = meta.get(table)
        values = {} if values is None else values  # null: a run without one
        if not isinstance(values, dict):
            wrong.append((table, values))
            continue
        wrong += [
            (f"{table}.{name}", values[name])
            for name, kind in fields.items()
            if not isinstance(values.get(name, kind()), kind)
        ]
    if wrong:
        raise damaged_record(folder, "a field of the wrong type", wrong)


def damaged_record(folder: Path, what: str, wrong: list[tuple[str, object]]) -> UserError:
    """The refusal of a checkpoint.json that records `what`: each (field, value) of `wrong`, shown short."""
    shown = ", ".join(f"{name} = {json.dumps(value)[:40]}" for name, value in wrong)
    return UserError(f"{folder / 'checkpoint.json'} records {what} ({shown}); it is damaged")


def is_number(value) -> bool:
    """A number as JSON reads one: an int or a float, not a bool (nor a string)."""
    return type(value) in (int, float)


def _parameters_in(path: Path) -> int:
    """How many numbers a safetensors file holds, read from its header alone."""
    try:
        with safe_open(str(path), "pt") as file:
            return sum(math.prod(file.get_slice(name).get_shape()) for name in file.keys())
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path} cannot be read: {error}; it is damaged") from None


def newest_run(root: Path | str = "out") -> Path:
    """The run under `root` whose latest checkpoint is newest (what sample.py uses by default)."""
    runs = [p.parent for p in Path(root).glob(f"*/{POINTER}")]
    if not runs:
        raise UserError(f"no checkpoint found under {root}/; train one with `python train.py` or pass --checkpoint")
    return max(runs, key=lambda run: (run / POINTER).stat().st_mtime)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path} cannot be read: {error}") from None


def _pack(value, tensors: dict[str, torch.Tensor]):
    """Nested dicts/lists with tensors -> JSON, moving tensors into `tensors` (no pickle)."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {"__dict__": [[_pack(k, tensors), _pack(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_pack(v, tensors) for v in value]
    return value


def _unpack(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, dict) and "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if isinstance(value, dict) and "__dict__" in value:
        return {_unpack(k, tensors): _unpack(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_unpack(v, tensors) for v in value]
    return value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
