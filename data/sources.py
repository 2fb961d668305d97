"""Where training text comes from: one `Source` interface over every kind of `--data SOURCE`.

A source yields its text as pieces `(starts_document, text)`, streamed in chunks of about a
megabyte, so a corpus of any size is read without holding it in memory. Kinds of source:

    builtin            the offline default corpus (data/builtin.py)
    tinyshakespeare    the classic 1 MB corpus, downloaded once into the cache
    path/to/file.txt   any UTF-8 text file (one document)
    path/to/folder     every .txt/.md/.rst file below it, in sorted order (one document each;
                       hidden files and folders are skipped, a file linked twice is read once)
    dataset folder     a folder laid out as a Hugging Face dataset (.parquet/.jsonl/.arrow files
                       below it, perhaps a README.md card), or one `Dataset.save_to_disk` wrote:
                       read like a hub dataset, splits and all
    file.jsonl         one JSON object per line; the text is in --text-column
    file.parquet       a Parquet table; the text is in --text-column
    owner/name[:conf]  a Hugging Face dataset, streamed with `datasets` (online users)

Text files must be UTF-8 (a byte-order mark is dropped, CRLF line ends become LF); a file that
looks binary or is in another encoding is refused with a message saying so, never half-read.
`fingerprint` changes whenever the text could have changed (a file's is a hash of its bytes); it keys
the prepared-data cache. It is taken when the source is opened, and `changed()` takes it again: a
file edited while it was being read must not leave tokens of its new text under its old key.
"""

from __future__ import annotations

import codecs
import hashlib
import http.client
import json
import os
import sys
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from model.errors import UserError
from model.files import fsync, remove_abandoned, temporary_name
from model.tokenizer import has_lone_surrogate

Piece = tuple[bool, str]
CHUNK_BYTES = 1 << 20
LONGEST_PIECE = CHUNK_BYTES  # characters a piece may reach waiting for a newline (a file of one line)
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
DATASET_SUFFIXES = (".parquet", ".jsonl", ".arrow")  # data files that make a folder a dataset
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_BYTES = 1_115_394  # the file's size: a cached or downloaded copy of another size is not it
HF_DEFAULT_MAX_BYTES = 200_000_000  # a streamed hub dataset can be terabytes; cap unless told


@dataclass
class Source:
    description: str
    fingerprint_now: Callable[[], str]  # what the text is now: a hash of a file's bytes, a dataset's name
    read: Callable[[], Iterator[Piece]]
    validation: Source | None = None  # a held-out part the source itself defines (hub datasets)

    def __post_init__(self):
        self.fingerprint = self.fingerprint_now()

    def changed(self) -> bool:
        """True if the text is no longer the one `fingerprint` was taken of."""
        return self.fingerprint_now() != self.fingerprint

    def pieces(self) -> Iterator[Piece]:
        return self.read()


def open_source(
    spec: str, *, text_column: str = "text", cache_dir: Path, max_bytes: int | None = None, flag: str = "--data"
) -> Source:
    """Turn a `--data` (or `flag`) value into a Source, or raise a UserError saying what is wrong with it."""
    if not spec.strip():  # an unset "$DATA": Path("") is the current folder, which would be read as the corpus
        raise UserError(f"{flag} is empty; give builtin, tinyshakespeare, a file, a folder, or a dataset name")
    if spec == "builtin":
        from data.builtin import builtin_documents

        version = f"python-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
        return Source(
            f"builtin ({version} documentation)", lambda: f"builtin:{version}", lambda: _documents(builtin_documents())
        )
    if spec == "tinyshakespeare":
        return text_file_source(tinyshakespeare(cache_dir))
    path = Path(spec)
    if path.is_dir():
        if is_dataset_folder(path):
            return hub_source(spec, text_column, max_bytes or HF_DEFAULT_MAX_BYTES)
        return folder_source(path)
    if path.is_file():
        if path.suffix.lower() == ".jsonl":
            return jsonl_source(path, text_column)
        if path.suffix.lower() == ".parquet":
            return parquet_source(path, text_column)
        return text_file_source(path)
    if path.exists():
        raise UserError(f"{spec} is neither a file nor a folder; give a text file, a folder, or a dataset name")
    if missing_local_path(spec):
        raise UserError(
            f"{flag} {spec} does not exist; give a text file, a folder, a .jsonl or .parquet file, or a dataset name"
        )
    return hub_source(spec, text_column, max_bytes or HF_DEFAULT_MAX_BYTES)


def missing_local_path(spec: str) -> bool:
    """True for a spec that names a local file or folder that is not there, rather than a hub
    dataset (hub names are `name` or `owner/name[:config]`: no suffix, no leading . / ~)."""
    if Path(spec).exists():
        return False
    return bool(Path(spec).suffix) or spec.startswith((".", "/", "~")) or spec.count("/") > 1


def text_file_source(path: Path) -> Source:
    return Source(str(path), lambda: _file_fingerprint(path), lambda: _text_file_pieces(path))


def folder_source(folder: Path) -> Source:
    files = _files_below(folder, TEXT_SUFFIXES)  # listed once: a file added while it is read is left to the next run
    if not files:
        raise UserError(f"folder {folder} has no {'/'.join(TEXT_SUFFIXES)} files (hidden ones are skipped)")

    def read() -> Iterator[Piece]:
        for path in files:
            yield from _text_file_pieces(path)

    return Source(f"{folder} ({len(files)} files)", lambda: _files_fingerprint(files), read)


def is_dataset_folder(folder: Path) -> bool:
    """True for a folder laid out as a Hugging Face dataset: one `save_to_disk` wrote, or one holding
    data files (.parquet/.jsonl/.arrow) and no text files but a dataset card (a top-level README.md).
    A folder of both is refused: either reading would leave the other kind out unseen."""
    if saved_to_disk(folder):
        return True
    listed = _files_below(folder, DATASET_SUFFIXES + TEXT_SUFFIXES)  # one walk of the tree for both kinds
    data_files = [path for path in listed if path.suffix.lower() in DATASET_SUFFIXES]
    if not data_files:
        return False
    text_files = [path for path in listed if path.suffix.lower() in TEXT_SUFFIXES and path != folder / "README.md"]
    if text_files:
        raise UserError(
            f"folder {folder} holds both text files ({text_files[0].name}) and dataset files ({data_files[0].name}); "
            "give a folder of one kind, or one file"
        )
    return True


def saved_to_disk(folder: Path) -> bool:
    """True for a folder `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`) wrote."""
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def _files_below(folder: Path, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """The files below `folder` with one of `suffixes` (None: any), sorted: hidden files and folders (`.git`, `.venv`)
    are not corpus, and a file reached twice through symbolic links is read once (links to folders are
    not followed). A folder that cannot be read, or a broken link, is refused: it would be left out unseen."""

    def refuse(error: OSError) -> None:
        raise UserError(f"cannot read the folder {error.filename}: {error.strerror}")

    files: dict[Path, Path] = {}
    for parent, folders, names in os.walk(folder, onerror=refuse):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in names:
            path = Path(parent) / name
            if (suffixes is not None and path.suffix.lower() not in suffixes) or name.startswith("."):
                continue
            if path.is_file():
                target = path.resolve()
                files[target] = min(files.get(target, path), path)  # the first name in sorted order
            elif not path.exists():
                raise UserError(f"{path} is a symbolic link to nothing; remove it or restore what it pointed to")
    return sorted(files.values())


def read_jsonl(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """(line number, parsed row, None) per non-empty line, or (number, None, why) if it is not JSON."""
    try:
        with open(path, encoding="utf-8-sig") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line), None
                except json.JSONDecodeError as error:
                    yield number, None, error.msg
                except RecursionError:
                    yield number, None, "nested too deeply"
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text ({_bad_byte(path)}); convert it to UTF-8") from None
    except OSError as error:  # permissions, an I/O error: the file cannot be read at all
        raise UserError(f"cannot read {path}: {error.strerror}") from None


def _bad_byte(path: Path) -> str:
    """Where the first byte that is not UTF-8 is: "bad byte at offset N, line L". Found by reading the
    file again, since a decoder's error gives a position within the block it was decoding (and a
    text-mode reader decodes blocks ahead of the line it has handed out)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line, newline = 0, 1, b"\n"
    with open(path, "rb") as file:
        while True:
            block = file.read(CHUNK_BYTES)
            pending = len(decoder.getstate()[0])  # the first bytes of a character the last block cut in two
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                bad = offset - pending + error.start  # the decoder saw the pending bytes, then the block
                return f"bad byte at offset {bad:,}, line {line + block.count(newline, 0, max(0, bad - offset)):,}"
            if not block:
                return "the file changed while it was read"
            offset += len(block)
            line += block.count(newline)


def jsonl_source(path: Path, text_column: str) -> Source:
    def read() -> Iterator[Piece]:
        for number, row, problem in read_jsonl(path):
            if problem:
                raise UserError(f"{path} line {number} is not valid JSON ({problem})")
            if text := _text_field(row, text_column, f"{path} line {number}"):
                yield True, text

    return Source(f"{path} [{text_column}]", lambda: f"{_file_fingerprint(path)}:{text_column}", read)


def open_parquet(path: Path, column: str, flag: str):
    """A Parquet file (`pyarrow.parquet.ParquetFile`) that has `column`; `flag` is the option that names it."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises its own hierarchy for damaged files
        raise UserError(f"{path} is not a readable Parquet file ({_first_line(error)})") from None
    if column not in table.schema_arrow.names:
        raise UserError(f"{path} has no column '{column}' (columns: {table.schema_arrow.names}); use {flag}")
    return table


def parquet_values(table, path: Path, column: str) -> Iterator[object]:
    """The values of `column` of a `pyarrow.parquet.ParquetFile`, batch by batch; a damaged file
    (a corrupt page, bytes that are not UTF-8 in a string column) is refused naming it."""
    import pyarrow as pa

    try:
        for batch in table.iter_batches(columns=[column], batch_size=1024):
            yield from batch.column(0).to_pylist()
    except (OSError, ValueError, pa.ArrowException) as error:  # ArrowInvalid, UnicodeDecodeError are ValueErrors
        raise UserError(f"{path} is damaged ({_first_line(error)}); fix or replace that file") from None


def parquet_source(path: Path, text_column: str) -> Source:
    import pyarrow as pa

    def read() -> Iterator[Piece]:
        table = open_parquet(path, text_column, "--text-column")
        kind = table.schema_arrow.field(text_column).type
        if pa.types.is_dictionary(kind):  # pandas' category columns: the text is in the dictionary's values
            kind = kind.value_type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise UserError(
                f"{path}: column '{text_column}' holds {kind}, not text; name a text column with --text-column"
            )
        for text in parquet_values(table, path, text_column):
            if text:
                yield True, text.replace("\r\n", "\n")

    return Source(f"{path} [{text_column}]", lambda: f"{_file_fingerprint(path)}:{text_column}", read)


def hub_source(name: str, text_column: str, max_bytes: int) -> Source:
    """A Hugging Face dataset, streamed. `name` is `owner/dataset`, `owner/dataset:config`, or a local
    folder laid out as a dataset (see `load_dataset_splits`).

    The dataset's own validation (or test) split is used when it has one; otherwise every tenth
    document is held out. At most `max_bytes` of training text is read.
    """
    splits = load_dataset_splits(name)
    if "train" not in splits:
        raise UserError(f"dataset '{name}' has no train split (it has {list(splits)})")
    held_out = next((s for s in ("validation", "test") if s in splits), None)

    def base() -> str:
        # A local folder's files can change under its name: its key is a hash of their bytes, as a file's is.
        where = _files_fingerprint(_files_below(Path(name))) if Path(name).is_dir() else name
        return f"hf:{where}:{text_column}:{max_bytes}"

    def reader(split: str, keep: Callable[[int], bool], limit: int) -> Callable[[], Iterator[Piece]]:
        def read() -> Iterator[Piece]:
            seen = 0
            for index, row in dataset_rows(splits, split, name):
                if keep(index):
                    if not (text := _text_field(row, text_column, f"{name} [{split}] row {index}")):
                        continue
                    yield True, text
                    seen += len(text.encode())
                    if seen >= limit:
                        return

        return read

    if held_out:
        validation = Source(
            f"{name} [{held_out}]", lambda: f"{base()}:{held_out}", reader(held_out, lambda i: True, max_bytes // 10)
        )
        return Source(f"{name} [train]", base, reader("train", lambda i: True, max_bytes), validation)
    validation = Source(
        f"{name} [every 10th document]",
        lambda: f"{base()}:holdout",
        reader("train", lambda i: i % 10 == 9, max_bytes // 10),
    )
    return Source(f"{name} [train]", base, reader("train", lambda i: i % 10 != 9, max_bytes), validation)


def load_dataset_splits(name: str) -> Mapping[str, Iterable[dict]]:
    """The splits of a dataset: a hub name `owner/dataset[:config]` (streamed), a local folder laid out
    as a dataset repository (streamed the same way), or a folder `save_to_disk` wrote (memory-mapped)."""
    import datasets

    path = Path(name)
    if saved_to_disk(path):
        try:
            saved = datasets.load_from_disk(name)
        except Exception as error:  # a damaged folder: datasets and pyarrow raise many types
            raise UserError(f"cannot read the saved dataset {name} ({_first_line(error)}); save it again") from None
        return saved if isinstance(saved, datasets.DatasetDict) else {"train": saved}
    if path.is_dir():
        dataset_name, config = name, ""
        what, advice = f"the dataset folder {name}", "check its data files, or pass one .jsonl or .parquet file"
    else:
        dataset_name, _, config = name.partition(":")
        check_hub_dataset(dataset_name)
        what = f"the Hugging Face dataset '{dataset_name}'"
        advice = "check the name and your connection, or pass a local file or folder"
    try:
        return datasets.load_dataset(dataset_name, config or None, streaming=True)
    except Exception as error:  # offline, unknown name, gated, bad config: datasets raises many types
        raise UserError(f"cannot load {what} ({_first_line(error)}); {advice}") from None


def dataset_rows(splits: Mapping[str, Iterable[dict]], split: str, name: str) -> Iterator[tuple[int, dict]]:
    """(index, row) of one split, a file that cannot be read (a damaged Parquet page, bytes that are not
    UTF-8) refused with where it stopped rather than a traceback."""
    index = 0
    try:
        for index, row in enumerate(splits[split]):
            yield index, row
    except UserError:
        raise
    except Exception as error:  # pyarrow and datasets raise many types for a broken file
        raise UserError(
            f"cannot read '{name}' [{split}] near row {index:,} ({_first_line(error)}); fix or remove that file"
        ) from None


def _first_line(error: Exception) -> str:
    text = str(error).splitlines()[0][:160] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def check_hub_dataset(name: str) -> None:
    """Fail in a second with a clear reason, instead of `datasets`' half-minute of retries."""
    if Path(name).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1":
        return  # a local dataset folder, or an offline user relying on the datasets cache
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        huggingface_hub.HfApi().dataset_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise UserError(
            f"there is no dataset '{name}' on the Hugging Face Hub (or it is private); check the name"
        ) from None
    except Exception as error:  # connection errors of several libraries
        raise UserError(
            f"cannot reach the Hugging Face Hub for dataset '{name}' ({type(error).__name__}); "
            "go online, set HF_HUB_OFFLINE=1 to use a cached copy, or pass a local file or folder"
        ) from None


def tinyshakespeare(cache_dir: Path) -> Path:
    """The Tiny Shakespeare corpus, downloaded once into `cache_dir`."""
    return download(TINYSHAKESPEARE_URL, Path(cache_dir) / "tinyshakespeare.txt", TINYSHAKESPEARE_BYTES)


def download(url: str, destination: Path, size: int | None = None) -> Path:
    """Fetch `url` to `destination` once (atomically: a partial download is never kept, and a download
    shorter than the length the server announced is a partial one). With the file's known `size`, a
    copy of another size (cut short, an error page) is neither trusted from the cache nor kept."""
    if destination.is_file() and (size is None or destination.stat().st_size == size):
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(destination.parent)
    tmp = temporary_name(destination)
    try:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=30) as response:
            announced = response.headers.get("Content-Length")
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
            received = out.tell()
        if announced is not None and announced.isdigit() and received != int(announced):
            raise UserError(f"the download of {url} stopped at {received:,} of {int(announced):,} bytes; try again")
        if received == 0:
            raise UserError(f"the download of {url} was empty; try again, or pass a local file")
        if size is not None and received != size:
            raise UserError(f"the download of {url} gave {received:,} bytes, not its {size:,}; try again")
        fsync(tmp)
        os.replace(tmp, destination)
    except (OSError, http.client.HTTPException) as error:
        raise UserError(f"could not download {url} ({error}); check your connection or pass a local file") from None
    finally:
        tmp.unlink(missing_ok=True)
    return destination


def _documents(texts: Iterator[str]) -> Iterator[Piece]:
    for text in texts:
        yield True, text


def _text_field(row: object, column: str, where: str) -> str:
    """The text of a .jsonl or dataset row; a null one is empty, and rows without text are skipped by
    every reader alike (a Parquet column's nulls too): one missing text must not make a dataset unusable."""
    if not isinstance(row, dict) or column not in row:
        raise UserError(f"{where} has no '{column}' field; name the text field with --text-column")
    if row[column] is None:
        return ""
    if not isinstance(row[column], str):
        raise UserError(f"{where}: field '{column}' is not a string")
    text = row[column]
    if has_lone_surrogate(text):
        raise UserError(f"{where}: field '{column}' holds a lone surrogate escape, which is not text; fix it")
    return text.replace("\r\n", "\n")


def _text_file_pieces(path: Path) -> Iterator[Piece]:
    """Stream a UTF-8 file in ~1 MB pieces cut after a newline, refusing binary or non-UTF-8 input. A file
    with no newline for LONGEST_PIECE characters (one long line, or CR line ends) is cut before a space
    there (where the tokenizer splits words anyway), so that it is not held whole in memory."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
    pending, first = "", True
    try:
        with open(path, "rb") as file:
            while True:
                chunk = file.read(CHUNK_BYTES)
                if b"\0" in chunk:
                    raise UserError(f"{path} looks like a binary file (it contains NUL bytes); give a UTF-8 text file")
                try:
                    text = decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError:
                    raise UserError(
                        f"{path} is not UTF-8 text ({_bad_byte(path)}); convert it, e.g. `iconv -f latin1 -t utf-8`"
                    ) from None
                text = text.replace("\r\n", "\n")
                if pending.endswith("\r") and text.startswith("\n"):
                    pending = pending[:-1]  # a CRLF split across chunks
                pending += text
                cut = len(pending) if not chunk else pending.rfind("\n") + 1
                if pending.endswith("\r") and chunk:
                    cut = min(cut, len(pending) - 1)  # a CRLF may be split across chunks
                if cut <= 0 and len(pending) > LONGEST_PIECE:  # no newline for megabytes
                    space = pending.rfind(" ")
                    cut = space if space > 0 else len(pending) - 1  # before a space, else anywhere (not a CR)
                if cut > 0:
                    yield first, pending[:cut]
                    pending, first = pending[cut:], False
                if not chunk:
                    return
    except OSError as error:  # permissions, an I/O error: the file cannot be read at all
        raise UserError(f"cannot read {path}: {error.strerror}") from None


def _files_fingerprint(files: list[Path]) -> str:
    """One hash over the fingerprints of `files` (their paths and bytes)."""
    listing = "\n".join(_file_fingerprint(path) for path in files)
    return hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest()  # any file name


def _file_fingerprint(path: Path) -> str:
    """The file's path and a hash of its bytes. Size and modification time alone miss a changed file
    that a copy gave the old ones (`cp -p`, `rsync -a`, `tar x`, `touch -r`), and a stale cache entry
    would be trained on. sha256 reads 100 MB in about 0.07 s where the CPU has SHA instructions."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            while block := file.read(CHUNK_BYTES):
                digest.update(block)
    except OSError as error:  # permissions, an I/O error: the file cannot be read at all
        raise UserError(f"cannot read {path}: {error.strerror}") from None
    return f"{path.resolve()}:{digest.hexdigest()}"
