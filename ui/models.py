"""The checkpoints the UI can serve: found under one folder, loaded one at a time, shared by all.

Only runs found under the configured folder can be loaded, and the one run or checkpoint folder
named on the command line wherever it is (a name from the browser is looked up in that list, never
used as a path, and a run or checkpoint that a symbolic link or pointer file leads outside its
folder is refused), so the page cannot be made to read files elsewhere. Switching models swaps one
reference under a lock, once everything the page shows of the new model has been read; replies
already streaming finish on the model they started with.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from model.chat_template import ChatTemplate, template_for
from model.checkpoint import POINTER, Checkpoint, is_number, load_checkpoint, resolve
from model.device import pick_device, pick_dtype
from model.engine import Engine
from model.errors import UserError


@dataclass
class LoadedModel:
    name: str
    run_dir: Path
    checkpoint: Checkpoint
    engine: Engine
    template: ChatTemplate
    description: str = field(init=False)  # what the Model tab says of it: built once, before it is served

    def __post_init__(self):
        self.description = self.describe()

    @property
    def is_chat_model(self) -> bool:
        return self.template.name == "turns"

    def describe(self) -> str:
        """A Markdown table of what it is."""
        meta, config = self.checkpoint.meta, self.checkpoint.model_config
        metrics = meta.get("metrics") or {}
        tokenizer = self.engine.tokenizer
        bpb = f"{metrics['val_bpb']:.4f}" if "val_bpb" in metrics else "not evaluated"
        rows = [
            ("Kind", "chat model (turn tokens)" if self.is_chat_model else "base model (plain transcript for chat)"),
            ("Parameters", f"{self.engine.model.num_parameters() / 1e6:.2f} M"),
            ("Layers x width", f"{config.n_layer} x {config.n_embd}, {config.n_head} heads"),
            ("Context", f"{config.context} tokens"),
            ("Tokenizer", f"{tokenizer.kind}, {tokenizer.n_vocab:,} ids"),
            ("Corpus", (meta.get("data") or {}).get("source", "unknown")),
            ("Tokens trained on", f"{meta.get('tokens_seen', 0):,}"),
            ("Validation bits per byte", bpb),
        ]
        header = f"| Run | `{self.name}` (step {meta['step']:,}) |\n|---|---|\n"
        return header + "\n".join(f"| {k} | {v} |" for k, v in rows)

    def curve(self):
        """Training loss and validation bits per byte by step (a DataFrame for gr.LinePlot)."""
        import pandas as pd

        points = []
        path = self.run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or not is_number(record.get("step")):
                continue  # a line no run writes (no checksum covers the log): left out of the plot
            for key, series in (("train_loss", "train loss (nats/token)"), ("val_bpb", "validation bits/byte")):
                if is_number(record.get(key)):
                    points.append({"step": record["step"], "value": record[key], "series": series})
        return pd.DataFrame(points, columns=["step", "value", "series"])


class ModelStore:
    def __init__(self, root: Path, device: str = "auto", dtype: str = "auto", int8_weights: bool = True):
        self.root = Path(root)
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.int8_weights = int8_weights
        self.current: LoadedModel | None = None
        self.named: dict[str, Path] = {}  # a folder named on the command line (`add`): its name -> its path
        self._lock = threading.Lock()

    def add(self, path: Path | str) -> str:
        """Offer a run folder or a checkpoint folder (`run/step-N`) that the command line names, inside
        the root or not; returns its name: its path under the root, or else its absolute path."""
        resolve(path)  # refuse what is not a checkpoint, in sample.py's words
        full, root = Path(path).resolve(), self.root.resolve()
        name = full.relative_to(root).as_posix() if full.is_relative_to(root) else full.as_posix()
        if name not in self._scan():
            self.named[name] = full
        return name

    def runs(self) -> list[str]:
        """The names on offer: the folder the command line named, then the runs under the root, newest first."""
        return [*self.named, *(name for name in self._scan() if name not in self.named)]

    def _scan(self) -> list[str]:
        """Names of the runs under the root, newest first."""
        if not self.root.is_dir():
            return []
        found = [p.parent for p in self.root.rglob(POINTER) if p.is_file()]
        found.sort(key=lambda run: (run / POINTER).stat().st_mtime, reverse=True)
        return [run.relative_to(self.root).as_posix() for run in found]

    def load(self, name: str) -> LoadedModel:
        """Serve the run or checkpoint `name`; the model served before stays served if it fails to load."""
        if name not in self.runs():
            raise UserError(f"'{name}' is not a run under {self.root}")
        path = self.named.get(name, self.root / name)
        fence = path if name in self.named else self.root.resolve()
        folder = resolve(path)  # a run's checkpoint its pointer names, or the checkpoint folder itself
        if not (path.resolve().is_relative_to(fence) and folder.resolve().is_relative_to(fence)):
            raise UserError(f"'{name}' leads outside {fence} (a symbolic link?); only folders inside it are served")
        current = self.current
        if current is not None and current.name == name and current.checkpoint.folder == folder:
            return current  # already served (Gradio 6.31's dropdown sends each pick twice)
        checkpoint = load_checkpoint(folder)  # reads and checksums the files: only after the check above
        tokenizer = checkpoint.load_tokenizer()
        model = checkpoint.load_model(self.device)
        engine = Engine(model, tokenizer, self.dtype, int8_weights=self.int8_weights)
        run_dir = folder.parent if (folder.parent / POINTER).is_file() else folder  # where metrics.jsonl is
        loaded = LoadedModel(name, run_dir, checkpoint, engine, template_for(checkpoint.meta, tokenizer))
        with self._lock:
            self.current = loaded
        return loaded
