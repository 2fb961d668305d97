"""Turn a source into token files once: `train.bin`, `val.bin`, `manifest.json`, the tokenizer.

Design decisions:
- Tokenize once, train many times: token ids are written as a flat array of uint16 (uint32 for
  vocabularies over 65,536) that training memory-maps, so a corpus larger than RAM costs nothing.
- A document separator token precedes every document, so the model learns where texts begin and
  generation can start a prompt as "a new document".
- Validation: `--val-data` if given, else the split the source defines (hub datasets), else the
  last 10% of the text by characters (nanoGPT's convention, so bits per byte compare).
- The cache key is a hash of everything the tokens depend on (source fingerprint, validation
  source, tokenizer kind and size or an existing tokenizer's fingerprint, this file's format
  version); a hit is reused only after its manifest and file sizes check out.
- A cache entry is built in a temporary folder and renamed into place, so an interrupted
  preparation never leaves a half-written entry that a later run would trust. Before it is
  published, the sources are fingerprinted again: a file edited while it was read is refused
  ("run again"), never cached under its old content's key. Publishing holds a lock on the cache
  (`flock`), and an entry another process published meanwhile is kept and ours dropped, so two
  runs preparing the same corpus never delete each other's entry. A write that fails (a full disk)
  is one line naming the cache folder.
- Text is streamed in ~1 MB pieces with a progress bar; memory stays flat for any corpus size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.sources import Piece, Source, open_source
from model.errors import UserError
from model.files import remove_abandoned, temporary_name, writable_folder
from model.tokenizer import Tokenizer, build_char, load_gpt2, train_bpe

PREP_VERSION = 1
DEFAULT_CACHE = Path(__file__).resolve().parent / "cache"
VAL_FRACTION = 0.1
ENCODE_BATCH_CHARS = 4 << 20


@dataclass
class Prepared:
    folder: Path
    manifest: dict
    tokenizer: Tokenizer

    def tokens(self, split: str) -> np.ndarray:
        """The token ids of `split` ("train" or "val"), memory-mapped read-only."""
        return np.memmap(self.folder / f"{split}.bin", dtype=self.manifest["dtype"], mode="r")


def prepare(
    data: str,
    *,
    val_data: str | None = None,
    text_column: str = "text",
    tokenizer_kind: str = "bpe",
    vocab_size: int = 2048,
    tokenizer: Tokenizer | None = None,
    cache_dir: Path = DEFAULT_CACHE,
    max_bytes: int | None = None,
    progress: bool = True,
) -> Prepared:
    """Prepare (or reuse) the token files for `data`; `tokenizer` given means reuse that one."""
    cache_dir = Path(cache_dir)
    writable_folder(cache_dir, "the data cache (--cache-dir)")
    source = open_source(data, text_column=text_column, cache_dir=cache_dir, max_bytes=max_bytes)
    val_source = (
        source.validation
        if val_data is None
        else open_source(val_data, text_column=text_column, cache_dir=cache_dir, flag="--val-data")
    )
    tokenizer_key = tokenizer.fingerprint if tokenizer else f"{tokenizer_kind}:{vocab_size}"
    key_text = json.dumps([PREP_VERSION, source.fingerprint, val_source and val_source.fingerprint, tokenizer_key])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    folder = cache_dir / key
    if cached := _load_valid(folder):
        return cached

    remove_abandoned(cache_dir)  # entries a killed preparation was building
    tmp = temporary_name(folder)
    try:
        tmp.mkdir(parents=True)
        splitter = _Splitter(source, val_source, progress)
        if tokenizer is None:
            tokenizer = _make_tokenizer(tokenizer_kind, vocab_size, splitter)
        dtype = "uint16" if tokenizer.n_vocab <= 1 << 16 else "uint32"
        splits = {
            split: _write_tokens(splitter.pieces(split), tokenizer, tmp / f"{split}.bin", dtype, progress, split)
            for split in ("train", "val")
        }
        if splits["train"]["chars"] == 0:
            raise UserError(f"{source.description} has no text; give a corpus with some text in it")
        if splits["val"]["chars"] == 0 and val_data is not None:
            raise UserError(f"--val-data {val_source.description} has no text; give a validation file with text in it")
        if splits["val"]["chars"] == 0:
            raise UserError(f"the validation split of {source.description} is empty; use more text or --val-data")
        tokenizer.save(tmp)
        manifest = {
            "version": PREP_VERSION,
            "source": source.description,
            "val_source": val_source.description if val_source else f"last {VAL_FRACTION:.0%} of the source",
            "tokenizer": {"kind": tokenizer.kind, "n_vocab": tokenizer.n_vocab, "fingerprint": tokenizer.fingerprint},
            "dtype": dtype,
            "splits": splits,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        for read in (source, val_source):
            if read is not None and read.changed():
                raise UserError(f"{read.description} changed while it was being prepared; run again")
        with _publishing(cache_dir):
            if published := _load_valid(folder):  # another process prepared the same data meanwhile
                return published
            shutil.rmtree(folder, ignore_errors=True)  # a damaged entry that failed validation
            os.replace(tmp, folder)
    except OSError as error:  # a full disk, a quota, an I/O error: the sources' readers report their own
        raise UserError(
            f"cannot write the prepared data in {cache_dir} ({error.strerror or error}); "
            "free some space there or give another --cache-dir"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Prepared(folder, manifest, tokenizer)


@contextlib.contextmanager
def _publishing(cache_dir: Path) -> Iterator[None]:
    """Hold the cache's publishing lock (`flock` on the cache folder itself, so no lock file lies in
    it): one process at a time checks for an entry and renames its own into place, so none deletes an
    entry another has just published. Held for milliseconds (a wait, not a refusal); the kernel drops
    it when its process ends, however it ends. Windows has no `fcntl`: publishing there is unguarded."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    descriptor = os.open(cache_dir, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _load_valid(folder: Path) -> Prepared | None:
    """A cache entry, if its manifest reads (an object with both splits and a token type of ours), its
    version matches, its files have the right sizes and hold only ids of its tokenizer (a max over the
    tokens: about 5 ms for 50 M of them, cached)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest["dtype"] not in ("uint16", "uint32") or sorted(manifest["splits"]) != ["train", "val"]:
            return None
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for split, info in manifest["splits"].items():
            if (folder / f"{split}.bin").stat().st_size != info["tokens"] * itemsize:
                return None
        if manifest["version"] != PREP_VERSION:
            return None
        tokenizer = Tokenizer.load(folder)
        for split in manifest["splits"]:
            tokens = np.memmap(folder / f"{split}.bin", dtype=manifest["dtype"], mode="r")
            if len(tokens) and int(tokens.max()) >= tokenizer.n_vocab:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError):  # damaged in any way: rebuilt
        return None
    if tokenizer.fingerprint != manifest["tokenizer"]["fingerprint"]:
        return None
    return Prepared(folder, manifest, tokenizer)


class _Splitter:
    """Yields the pieces of each split; without a validation source, the last 10% of characters."""

    def __init__(self, source: Source, val_source: Source | None, progress: bool):
        self.source, self.val_source = source, val_source
        self.split_at: int | None = None
        if val_source is None:
            counted = (
                len(text)
                for _, text in tqdm(source.pieces(), desc="counting", unit="piece", disable=not progress, leave=False)
            )
            self.split_at = int(sum(counted) * (1 - VAL_FRACTION))

    def pieces(self, split: str) -> Iterator[Piece]:
        if self.val_source is not None:
            yield from (self.source if split == "train" else self.val_source).pieces()
            return
        seen = 0
        for starts, text in self.source.pieces():
            begin, end = seen, seen + len(text)
            seen = end
            if split == "train" and begin < self.split_at:
                yield starts, text[: self.split_at - begin]
            elif split == "val" and end > self.split_at:
                # The validation text starts a fresh document where it is cut out of the middle of one.
                yield starts or begin < self.split_at, text[max(0, self.split_at - begin) :]


def _make_tokenizer(kind: str, vocab_size: int, splitter: _Splitter) -> Tokenizer:
    if kind == "gpt2":
        return load_gpt2()
    texts = (text for _, text in splitter.pieces("train"))
    if kind == "char":
        return build_char(texts)
    if kind == "bpe":
        return train_bpe(texts, vocab_size)
    raise UserError(f"unknown tokenizer '{kind}'; choose bpe, char or gpt2")


def _write_tokens(
    pieces: Iterator[Piece], tokenizer: Tokenizer, path: Path, dtype: str, progress: bool, split: str
) -> dict:
    """Encode pieces in batches and append them to `path`; returns token, char and byte counts."""
    counts = {"tokens": 0, "chars": 0, "bytes": 0}
    bar = tqdm(desc=f"tokenizing {split}", unit="char", unit_scale=True, disable=not progress, leave=False)
    with open(path, "wb") as out, bar:
        batch: list[tuple[bool, str]] = []
        size = 0

        def flush() -> None:
            for (starts, text), ids in zip(batch, tokenizer.encode_batch([text for _, text in batch]), strict=True):
                if starts:
                    ids = [tokenizer.doc_separator, *ids]
                out.write(np.asarray(ids, dtype=dtype).tobytes())
                counts["tokens"] += len(ids)
                counts["chars"] += len(text)
                counts["bytes"] += len(text.encode("utf-8"))
                bar.update(len(text))
            batch.clear()

        for starts, text in pieces:
            batch.append((starts, text))
            size += len(text)
            if size >= ENCODE_BATCH_CHARS:
                flush()
                size = 0
        flush()
        out.flush()
        os.fsync(out.fileno())
    return counts
