"""Preparing corpora in every source format, the cache, the split, and bad input."""

from __future__ import annotations

import http.server
import json
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.prepare import prepare
from data.sources import CHUNK_BYTES, _text_file_pieces, download, hub_source, open_source
from model.errors import UserError
from tests.conftest import PAIRS, conversation, make_text, run_script


def documents(source) -> list[str]:
    """A source's pieces regrouped into whole documents."""
    docs: list[str] = []
    for starts, text in source.pieces():
        if starts:
            docs.append("")
        docs[-1] += text
    return docs


def prepared_text(prepared, split: str) -> str:
    return prepared.tokenizer.decode(np.asarray(prepared.tokens(split)))


def test_text_file_splits_last_ten_percent_for_validation(tmp_path):
    text = make_text(400)
    (tmp_path / "c.txt").write_text(text)
    prepared = prepare(str(tmp_path / "c.txt"), tokenizer_kind="char", cache_dir=tmp_path / "cache", progress=False)
    cut = int(len(text) * 0.9)
    assert prepared_text(prepared, "train") == "<|endoftext|>" + text[:cut]
    assert prepared_text(prepared, "val") == "<|endoftext|>" + text[cut:]
    manifest = json.loads((prepared.folder / "manifest.json").read_text())
    assert manifest["splits"]["train"]["chars"] == cut
    assert manifest["tokenizer"]["kind"] == "char"


def test_preparation_is_cached_and_reused(tmp_path):
    (tmp_path / "c.txt").write_text(make_text(300))
    first = prepare(str(tmp_path / "c.txt"), vocab_size=300, cache_dir=tmp_path / "cache", progress=False)
    mtime = (first.folder / "train.bin").stat().st_mtime_ns
    second = prepare(str(tmp_path / "c.txt"), vocab_size=300, cache_dir=tmp_path / "cache", progress=False)
    assert second.folder == first.folder and (second.folder / "train.bin").stat().st_mtime_ns == mtime
    other = prepare(str(tmp_path / "c.txt"), vocab_size=320, cache_dir=tmp_path / "cache", progress=False)
    assert other.folder != first.folder  # another tokenizer, another entry
    expected = np.array(first.tokens("train"))
    (first.folder / "train.bin").write_bytes(b"\0\0")  # damage the entry: it is rebuilt, not trusted
    rebuilt = prepare(str(tmp_path / "c.txt"), vocab_size=300, cache_dir=tmp_path / "cache", progress=False)
    assert np.array_equal(np.asarray(rebuilt.tokens("train")), expected)
    assert not list((tmp_path / "cache").glob(".tmp-*"))
    size = (rebuilt.folder / "train.bin").stat().st_size  # the right size, ids past the vocabulary: rebuilt too
    (rebuilt.folder / "train.bin").write_bytes(b"\xff" * size)
    again = prepare(str(tmp_path / "c.txt"), vocab_size=300, cache_dir=tmp_path / "cache", progress=False)
    assert np.array_equal(np.asarray(again.tokens("train")), expected)


@pytest.mark.parametrize("kind", ["c.txt", "c.jsonl", "c.parquet", "folder"])
def test_a_changed_file_with_its_old_size_and_time_is_prepared_again(tmp_path, kind):
    """`cp -p`, `rsync -a` and `tar x` keep a file's size and modification time: the cache must not."""
    path = tmp_path / kind
    if kind == "folder":
        path.mkdir()
        path = path / "a.txt"

    def write(text: str) -> None:
        if kind == "c.jsonl":
            path.write_text(json.dumps({"text": text}) + "\n")
        elif kind == "c.parquet":
            pq.write_table(pa.table({"text": [text]}), path)
        else:
            path.write_text(text)

    old, new = "old text, " * 50, "new text, " * 50
    write(old)
    spec = str(tmp_path / kind)
    first = prepare(spec, tokenizer_kind="char", cache_dir=tmp_path / "cache", progress=False)
    stat = path.stat()
    write(new)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size  # what a `cp -p` over it leaves
    second = prepare(spec, tokenizer_kind="char", cache_dir=tmp_path / "cache", progress=False)
    assert second.folder != first.folder and "new text" in prepared_text(second, "train")
    os.utime(path)  # touched, text unchanged: the entry is reused
    assert prepare(spec, tokenizer_kind="char", cache_dir=tmp_path / "cache", progress=False).folder == second.folder


def test_folder_jsonl_and_parquet_sources_give_the_same_documents(tmp_path):
    docs = [make_text(30, seed=i) for i in range(6)]
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"{i:02d}.txt").write_text(doc)
    (folder / "skip.bin").write_bytes(b"\0\1")  # not a text suffix: ignored
    (folder / ".git").mkdir()
    (folder / ".git" / "notes.txt").write_text("not corpus")  # in a hidden folder: ignored
    (folder / ".draft.txt").write_text("not corpus")  # a hidden file: ignored
    (folder / "zz-link.txt").symlink_to(folder / "00.txt")  # the same file again: read once
    (folder / "zz-loop").symlink_to(folder)  # a link to a folder is not followed
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"content": docs, "id": list(range(6))}), tmp_path / "d.parquet")
    for spec in (folder, tmp_path / "d.jsonl", tmp_path / "d.parquet"):
        source = open_source(str(spec), text_column="content", cache_dir=tmp_path)
        assert documents(source) == docs, spec
    prepared = prepare(
        str(tmp_path / "d.jsonl"),
        text_column="content",
        tokenizer_kind="char",
        cache_dir=tmp_path / "c",
        progress=False,
    )
    assert prepared_text(prepared, "train").count("<|endoftext|>") == 6  # the split cuts into the sixth


def test_a_folder_reads_any_file_name_and_refuses_what_it_cannot_read(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / os.fsdecode(b"caf\xe9.txt")).write_text("a name that is not UTF-8\n")
    assert documents(open_source(str(folder), cache_dir=tmp_path)) == ["a name that is not UTF-8\n"]
    (folder / "gone.txt").symlink_to(tmp_path / "deleted.txt")
    with pytest.raises(UserError, match="gone.txt is a symbolic link to nothing"):  # not silently left out
        open_source(str(folder), cache_dir=tmp_path)
    (folder / "gone.txt").unlink()
    (folder / "mem.txt").symlink_to("/proc/self/mem")  # a file whose reading fails (EIO), even for root
    with pytest.raises(UserError, match="^cannot read .*mem.txt: Input/output error$"):
        documents(open_source(str(folder), cache_dir=tmp_path))
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".notes.txt").write_text("x")
    with pytest.raises(UserError, match="no .txt/.md/.rst/.text files \\(hidden ones are skipped\\)"):
        open_source(str(tmp_path / "hidden"), cache_dir=tmp_path)


def test_a_crlf_split_between_two_reads_becomes_one_line_end(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"a" * (CHUNK_BYTES - 1) + b"\r\n" + b"x\r\n" * 10)  # the \r ends the first read
    (text,) = documents(open_source(str(path), cache_dir=tmp_path))
    assert "\r" not in text and text == "a" * (CHUNK_BYTES - 1) + "\n" + "x\n" * 10


def test_a_lone_surrogate_escape_in_jsonl_is_refused_with_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "half a pair \\ud800 here"}\n')
    with pytest.raises(UserError, match="d.jsonl line 2: field 'text' holds a lone surrogate escape"):
        documents(open_source(str(path), cache_dir=tmp_path))


@pytest.mark.parametrize("lines, bad_line", [(6, 4), (2000, 1501)])
def test_a_bad_byte_in_jsonl_is_reported_on_its_own_line(tmp_path, lines, bad_line):
    """The text-mode reader decodes blocks ahead of the line it hands out: its position is not the line's."""
    rows = [json.dumps({"text": f"row {n} " + "words " * 10}).encode() for n in range(1, lines + 1)]
    rows[bad_line - 1] = rows[bad_line - 1].replace(b"row", b"r\xe9w")  # Latin-1's é
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    offset = sum(len(row) + 1 for row in rows[: bad_line - 1]) + 11
    with pytest.raises(UserError, match=f"not UTF-8 text \\(bad byte at offset {offset:,}, line {bad_line:,}\\)"):
        documents(open_source(str(tmp_path / "d.jsonl"), cache_dir=tmp_path))


def test_a_bad_byte_after_a_character_cut_between_two_reads_is_placed_exactly(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"a\n" * (CHUNK_BYTES // 2 - 1) + b"a" + b"\xc3x")  # \xc3 ends the first read, x cannot follow it
    with pytest.raises(UserError, match=f"bad byte at offset {CHUNK_BYTES - 1:,}, line {CHUNK_BYTES // 2:,}\\)"):
        documents(open_source(str(path), cache_dir=tmp_path))


def test_hub_dataset_loader_streams_a_local_dataset_repository(tmp_path):
    """`datasets` treats a local folder of Parquet files like a hub repo: the same code path online."""
    repo = tmp_path / "owner_dataset" / "data"
    repo.mkdir(parents=True)
    train_docs = [make_text(10, seed=i) for i in range(20)]
    pq.write_table(pa.table({"text": train_docs}), repo / "train-00000-of-00001.parquet")
    source = hub_source(str(repo.parent), "text", max_bytes=10**9)
    train = [text for _, text in source.pieces()]
    held_out = [text for _, text in source.validation.pieces()]
    assert held_out == train_docs[9::10]
    assert train == [d for i, d in enumerate(train_docs) if i % 10 != 9]
    pq.write_table(pa.table({"text": ["validation text"]}), repo / "validation-00000-of-00001.parquet")
    source = hub_source(str(repo.parent), "text", max_bytes=10**9)
    assert [text for _, text in source.validation.pieces()] == ["validation text"]
    capped = hub_source(str(repo.parent), "text", max_bytes=1)
    assert len(list(capped.pieces())) == 1


def test_separate_validation_file(tmp_path):
    (tmp_path / "train.txt").write_text(make_text(200))
    (tmp_path / "val.txt").write_text("held out text only")
    prepared = prepare(
        str(tmp_path / "train.txt"),
        val_data=str(tmp_path / "val.txt"),
        tokenizer_kind="char",
        cache_dir=tmp_path / "c",
        progress=False,
    )
    assert prepared_text(prepared, "val") == "<|endoftext|>held out text only"


def test_bom_and_crlf_are_normalised(tmp_path):
    (tmp_path / "w.txt").write_bytes("\ufeff".encode() + b"line one\r\nline two\r\n" * 50)
    source = open_source(str(tmp_path / "w.txt"), cache_dir=tmp_path)
    text = "".join(t for _, t in source.pieces())
    assert text == "line one\nline two\n" * 50


def test_large_files_stream_in_pieces_without_changing_the_text(tmp_path):
    text = make_text(30000)  # a few MB: several 1 MB pieces
    (tmp_path / "big.txt").write_text(text)
    pieces = list(open_source(str(tmp_path / "big.txt"), cache_dir=tmp_path).pieces())
    assert len(pieces) > 1 and "".join(t for _, t in pieces) == text
    assert [s for s, _ in pieces] == [True] + [False] * (len(pieces) - 1)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "no text"),
        (b"\x00\x01\x02binary", "binary"),
        ("café".encode("latin-1") * 100, "not UTF-8"),
    ],
)
def test_bad_text_files_are_refused_clearly(tmp_path, content, message):
    (tmp_path / "bad.txt").write_bytes(content)
    with pytest.raises(UserError, match=message):
        prepare(str(tmp_path / "bad.txt"), cache_dir=tmp_path / "c", progress=False)
    assert not list((tmp_path / "c").glob("*/manifest.json"))  # no cache entry was written


def test_missing_sources_and_bad_jsonl_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_source(str(tmp_path / "missing.txt"), cache_dir=tmp_path)
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        list(open_source(str(tmp_path / "broken.jsonl"), cache_dir=tmp_path).pieces())
    (tmp_path / "nocol.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match="--text-column"):
        list(open_source(str(tmp_path / "nocol.jsonl"), cache_dir=tmp_path).pieces())


@pytest.mark.parametrize("flag, values", [("--data", dict(data="")), ("--val-data", dict(val_data=" "))])
def test_an_empty_data_value_is_refused_not_read_as_this_folder(tmp_path, monkeypatch, flag, values):
    """An unset "$DATA" gives --data '': Path('') is the current folder, which holds text files here."""
    (tmp_path / "notes.txt").write_text(make_text(100))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"^{flag} is empty; give builtin"):
        prepare(**{"data": "notes.txt", **values}, tokenizer_kind="char", cache_dir=tmp_path / "c", progress=False)


def test_download_is_atomic_and_cached(tmp_path):
    remote = tmp_path / "remote.txt"
    remote.write_text("downloaded corpus")
    target = download(remote.as_uri(), tmp_path / "cache" / "corpus.txt")
    assert target.read_text() == "downloaded corpus"
    remote.write_text("changed")
    assert download(remote.as_uri(), target).read_text() == "downloaded corpus"  # cached
    with pytest.raises(UserError, match="could not download"):
        download((tmp_path / "nowhere.txt").as_uri(), tmp_path / "cache" / "other.txt")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["corpus.txt"]


def test_a_download_cut_short_is_refused_and_not_kept(tmp_path):
    """A server that announces 10,000 bytes and closes after 100: nothing is cached to be trusted later."""

    class CutShort(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "10000")
            self.end_headers()
            self.wfile.write(b"x" * 100)  # HTTP/1.0: the connection closes after this

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(UserError, match=r"stopped at 100 of 10,000 bytes|could not download"):
            download(f"http://127.0.0.1:{server.server_port}/corpus.txt", tmp_path / "cache" / "corpus.txt")
    finally:
        server.shutdown()
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_parquet_column_of_numbers_is_refused_clearly(tmp_path):
    pq.write_table(pa.table({"body": list(range(10))}), tmp_path / "ints.parquet")
    with pytest.raises(UserError, match="column 'body' holds int64, not text"):
        prepare(str(tmp_path / "ints.parquet"), text_column="body", cache_dir=tmp_path / "cache", progress=False)


def test_builtin_corpus_is_real_documentation():
    from data.builtin import builtin_documents

    documents = builtin_documents()
    text = "".join(documents)
    assert len(text) > 500_000
    assert "assert" in text and "Module json" in text


def test_training_windows_cover_each_epoch_once_in_a_fresh_order():
    from data.loader import Batches

    context, cpu = 16, torch.device("cpu")
    batches = Batches(np.arange(1000, dtype=np.uint16), context, seed=3)
    rows = 8
    epochs: list[list[int]] = []
    for step in range(3 * batches.passes.size // rows):
        inputs, targets = batches.get(step, range(rows), rows, cpu)
        assert torch.equal(targets[:, :-1], inputs[:, 1:])  # targets are the inputs shifted by one
        for n, start in enumerate(inputs[:, 0].tolist(), start=step * rows):
            if n % batches.passes.size == 0:
                epochs.append([])
            epochs[-1].append(start)
    first, second = epochs[0], epochs[1]
    assert len(set(first)) == len(first) == batches.passes.size == 1000 // context - 1  # no window twice in a pass
    assert len({start % context for start in first}) == 1  # back to back, at one phase
    assert first != second  # each pass has its own order (and phase)
    # Any slice of a step's rows (another rank's share) is the same data, whatever was asked before.
    late = Batches(np.arange(1000, dtype=np.uint16), context, seed=3).get(9, range(3, 7), rows, cpu)[0]
    assert torch.equal(late, batches.get(9, range(rows), rows, cpu)[0][3:7])


def test_chat_fine_tuning_sees_every_conversation_once_per_pass():
    from data.loader import ConversationBatches

    rendered = [([n, n + 1, n + 2], [False, True, True]) for n in range(0, 60, 3)]  # 20 conversations
    batches = ConversationBatches(rendered, context=8, seed=5)
    firsts = [batches.get(step, range(4), 4, torch.device("cpu"))[0][:, 0].tolist() for step in range(10)]
    first_pass, second_pass = sum(firsts[:5], []), sum(firsts[5:], [])
    assert sorted(first_pass) == sorted(second_pass) == list(range(0, 60, 3))
    assert first_pass != second_pass


def test_token_noise_replaces_a_share_of_the_inputs_never_the_targets_and_is_fixed_by_seed_and_step():
    from data.loader import Batches

    tokens, context, rows, cpu = np.arange(5000, dtype=np.uint16) % 400 + 100, 64, 16, torch.device("cpu")
    clean = Batches(tokens, context, seed=3)
    noisy = Batches(tokens, context, seed=3, noise=0.1, noise_ids=50)  # replacements are ids 0..49, never in the text
    (x, y), (nx, ny) = clean.get(4, range(rows), rows, cpu), noisy.get(4, range(rows), rows, cpu)
    replaced = nx != x
    assert torch.equal(ny, y)  # the targets are the true next tokens
    assert 0.07 < replaced.float().mean() < 0.13  # about a tenth of the 1,024 inputs
    assert (nx[replaced] < 50).all() and torch.equal(nx[~replaced], x[~replaced])
    assert torch.equal(nx, noisy.get(4, range(rows), rows, cpu)[0])  # the same for the same step
    assert torch.equal(Batches(tokens, context, 3, 0.1, 50).get(4, range(5, 9), rows, cpu)[0], nx[5:9])  # any rank
    assert not torch.equal(replaced[0], replaced[1])  # each row draws its own positions
    noisy.noisy = False  # as the trainer sets it for the cooldown
    assert torch.equal(noisy.get(4, range(rows), rows, cpu)[0], x)


def test_a_folder_laid_out_as_a_dataset_is_read_as_one_not_as_its_readme(tmp_path):
    """A dataset repository's clone (data/train-*.parquet and a README.md card), or a folder
    `save_to_disk` wrote: its rows are the corpus, never the card alone."""
    import datasets

    docs = [make_text(10, seed=i) for i in range(20)]
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": docs}), repo / "data" / "train-00000-of-00001.parquet")
    (repo / "README.md").write_text("---\nlicense: mit\n---\n# A dataset card, not corpus\n")
    source = open_source(str(repo), cache_dir=tmp_path)
    assert [text for _, text in source.pieces()] == [d for i, d in enumerate(docs) if i % 10 != 9]
    assert [text for _, text in source.validation.pieces()] == docs[9::10]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(saved))
    source = open_source(str(saved), cache_dir=tmp_path)
    assert [text for _, text in source.pieces()] + [text for _, text in source.validation.pieces()] == (
        [d for i, d in enumerate(docs) if i % 10 != 9] + docs[9::10]
    )
    prepared = prepare(str(repo), tokenizer_kind="char", cache_dir=tmp_path / "cache", progress=False)
    assert "dataset card" not in prepared_text(prepared, "train") and docs[0] in prepared_text(prepared, "train")
    (repo / "notes.txt").write_text("a text file beside the data files")
    with pytest.raises(UserError, match="holds both text files \\(notes.txt\\) and dataset files"):
        open_source(str(repo), cache_dir=tmp_path)


def test_a_chat_dataset_saved_to_disk_is_read_not_blamed_on_the_connection(tmp_path):
    import datasets

    from data.conversations import load_conversations

    chats = [conversation(q, a) for _ in range(5) for q, a in PAIRS]
    datasets.Dataset.from_list(chats).save_to_disk(str(tmp_path / "saved"))
    loaded = load_conversations(str(tmp_path / "saved"))
    assert len(loaded.train) + len(loaded.val) == 20


@pytest.mark.parametrize("kind", ["c.txt", "folder"])
def test_a_file_edited_while_it_is_prepared_is_refused_not_cached_under_its_old_key(tmp_path, monkeypatch, kind):
    """Another program rewrites the file after its first piece was read: the tokens would be of the new
    text, the key of the old. The edit is made by the test at that moment; the reading is the real one."""
    import data.sources

    path = tmp_path / kind
    if kind == "folder":
        path.mkdir()
        path = path / "a.txt"
    old = "old text, " * 50_000
    path.write_text(old)
    real_pieces = data.sources._text_file_pieces

    def edited_after_the_first_piece(file):
        for number, piece in enumerate(real_pieces(file)):
            yield piece
            if number == 0:
                path.write_text(old.upper())

    monkeypatch.setattr(data.sources, "_text_file_pieces", edited_after_the_first_piece)
    spec = str(tmp_path / kind)
    with pytest.raises(UserError, match="changed while it was being prepared; run again$"):
        prepare(spec, tokenizer_kind="char", cache_dir=tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").glob("*/manifest.json")) and not list((tmp_path / "cache").glob(".tmp-*"))
    monkeypatch.setattr(data.sources, "_text_file_pieces", real_pieces)
    path.write_text(old)
    again = prepare(spec, tokenizer_kind="char", cache_dir=tmp_path / "cache", progress=False)
    assert "OLD TEXT" not in prepared_text(again, "val")


def test_a_write_that_fails_while_preparing_is_one_line_naming_the_cache(tmp_path):
    """A full disk, made real with a limit on file size (the kernel's EFBIG, as ENOSPC, is an OSError)."""
    (tmp_path / "c.txt").write_text(make_text(4000))
    script = (
        "import resource, signal, sys; from data.prepare import prepare; from model.errors import run_cli; "
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000)); "
        f"run_cli(lambda: prepare({str(tmp_path / 'c.txt')!r}, tokenizer_kind='char', cache_dir={str(tmp_path / 'cache')!r}, progress=False))"
    )
    result = run_script("-c", script)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: cannot write the prepared data in {tmp_path / 'cache'} (File too large)")
    assert result.stderr.rstrip().endswith("free some space there or give another --cache-dir")
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary is removed


def test_an_entry_another_process_published_meanwhile_is_kept(tmp_path, monkeypatch):
    """Two runs preparing one corpus into one cache: the one that finishes second keeps the entry the
    first published (which the first is reading) and drops its own. The other run is a real process,
    started while this one is reading."""
    import data.sources

    (tmp_path / "c.txt").write_text(make_text(400))
    prepare_it = f"from data.prepare import prepare; prepare({str(tmp_path / 'c.txt')!r}, tokenizer_kind='char', cache_dir={str(tmp_path / 'cache')!r}, progress=False)"
    real_pieces, theirs = data.sources._text_file_pieces, []

    def the_other_run_publishes_first(file):
        if not theirs:
            assert run_script("-c", prepare_it).returncode == 0
            (entry,) = (tmp_path / "cache").glob("*/train.bin")
            theirs.append(entry.stat().st_ino)
        yield from real_pieces(file)

    monkeypatch.setattr(data.sources, "_text_file_pieces", the_other_run_publishes_first)
    ours = prepare(str(tmp_path / "c.txt"), tokenizer_kind="char", cache_dir=tmp_path / "cache", progress=False)
    assert (ours.folder / "train.bin").stat().st_ino == theirs[0]  # theirs, not deleted and replaced
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [ours.folder.name]  # ours dropped


def test_a_damaged_manifest_is_rebuilt_not_a_traceback(tmp_path):
    (tmp_path / "c.txt").write_text(make_text(300))
    first = prepare(str(tmp_path / "c.txt"), tokenizer_kind="char", cache_dir=tmp_path / "cache", progress=False)
    good = (first.folder / "manifest.json").read_text()
    manifest = json.loads(good)
    without_val = {**manifest, "splits": {"train": manifest["splits"]["train"]}}
    for damaged in (without_val, {**manifest, "dtype": "nonsense"}, {**manifest, "dtype": "float64"}, [manifest]):
        (first.folder / "manifest.json").write_text(json.dumps(damaged))
        again = prepare(str(tmp_path / "c.txt"), tokenizer_kind="char", cache_dir=tmp_path / "cache", progress=False)
        assert (again.folder / "manifest.json").read_text() == good and prepared_text(again, "val")


def damage_the_middle(path) -> None:
    """XOR 2,000 bytes in the middle of a file: corrupt pages, the footer intact."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = bytes(byte ^ 0x5A for byte in data[middle : middle + 2000])
    path.write_bytes(data)


def test_a_parquet_file_damaged_inside_is_refused_naming_it_by_every_reader(tmp_path):
    from data.conversations import load_conversations

    texts = [make_text(5, seed=i) for i in range(3000)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet", row_group_size=100)
    damage_the_middle(tmp_path / "d.parquet")
    with pytest.raises(UserError, match="d.parquet is damaged \\(OSError: .*\\); fix or replace that file$"):
        prepare(str(tmp_path / "d.parquet"), tokenizer_kind="char", cache_dir=tmp_path / "cache", progress=False)
    chats = [conversation(f"question {i}: {text}", "answer")["messages"] for i, text in enumerate(texts)]
    pq.write_table(pa.table({"messages": chats}), tmp_path / "chats.parquet", row_group_size=100)
    damage_the_middle(tmp_path / "chats.parquet")
    with pytest.raises(UserError, match="chats.parquet is damaged"):
        load_conversations(str(tmp_path / "chats.parquet"))
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    (tmp_path / "d.parquet").rename(repo / "train-00000-of-00001.parquet")
    with pytest.raises(UserError, match="cannot read '.*repo' \\[train\\] near row .*; fix or remove that file$"):
        prepare(str(repo.parent), tokenizer_kind="char", cache_dir=tmp_path / "cache", progress=False)


def test_a_download_of_a_known_size_trusts_no_copy_of_another_size(tmp_path):
    """Tiny Shakespeare's size is known: a cached copy cut short (or an error page) is fetched again,
    and a body cut short by a server that announced no length is refused, not kept."""
    corpus = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20

    class Server(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # HTTP/1.0 and no Content-Length: the end of the body is the connection's close
            self.send_response(200)
            self.end_headers()
            self.wfile.write(corpus[:100] if self.path == "/cut" else corpus)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        cached = tmp_path / "cache" / "corpus.txt"
        cached.parent.mkdir()
        cached.write_bytes(corpus[:50])  # a download an older version kept
        assert download(f"{url}/whole", cached, len(corpus)).read_bytes() == corpus
        cached.unlink()
        with pytest.raises(UserError, match=f"gave 100 bytes, not its {len(corpus):,}; try again$"):
            download(f"{url}/cut", cached, len(corpus))
    finally:
        server.shutdown()
    assert list((tmp_path / "cache").iterdir()) == []


def test_file_suffixes_are_read_whatever_their_case(tmp_path):
    from data.conversations import load_conversations

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "NOTES.TXT").write_text("upper case suffix\n")
    (folder / "b.Md").write_text("mixed case suffix\n")
    assert documents(open_source(str(folder), cache_dir=tmp_path)) == ["upper case suffix\n", "mixed case suffix\n"]
    (tmp_path / "FILE.JSONL").write_text(json.dumps({"text": "a row"}) + "\n")
    assert documents(open_source(str(tmp_path / "FILE.JSONL"), cache_dir=tmp_path)) == ["a row"]
    pq.write_table(pa.table({"text": ["a parquet row"]}), tmp_path / "FILE.PARQUET")
    assert documents(open_source(str(tmp_path / "FILE.PARQUET"), cache_dir=tmp_path)) == ["a parquet row"]
    (tmp_path / "CHATS.JSONL").write_text("".join(json.dumps(conversation(q, a)) + "\n" for q, a in PAIRS))
    assert len(load_conversations(str(tmp_path / "CHATS.JSONL")).train) == 3


def test_a_missing_or_empty_validation_file_is_named_with_its_flag(tmp_path):
    (tmp_path / "train.txt").write_text(make_text(200))
    (tmp_path / "empty.txt").write_text("")
    train = str(tmp_path / "train.txt")
    with pytest.raises(UserError, match=f"^--val-data {tmp_path / 'empty.txt'} has no text"):
        prepare(train, val_data=str(tmp_path / "empty.txt"), cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(UserError, match=f"^--val-data {tmp_path / 'gone.txt'} does not exist"):
        prepare(train, val_data=str(tmp_path / "gone.txt"), cache_dir=tmp_path / "c", progress=False)


@pytest.mark.parametrize("line_end", ["", "\r"], ids=["one line", "CR line ends"])
def test_a_file_without_newlines_is_read_in_pieces_not_whole(tmp_path, line_end):
    """A 13 MB file of one line (or of old Mac line ends) was held whole in memory: 50 MB of it took
    3.5 GB. It is cut before a space once no newline comes for LONGEST_PIECE characters."""
    words = ["stone", "river", "lantern", "cloud", "harbour"]
    line = " ".join(words[i % 5] for i in range(200)) + line_end
    text = (line + (" " if not line_end else "")) * 10_000
    path = tmp_path / "long.txt"
    path.write_text(text, newline="")
    pieces = [piece for _, piece in _text_file_pieces(path)]
    assert len(pieces) >= 3 and max(len(piece) for piece in pieces) <= 2 * CHUNK_BYTES  # LONGEST_PIECE + a chunk
    assert "".join(pieces) == text and all(piece.startswith(" ") for piece in pieces[1:])


@pytest.mark.parametrize("kind", ["dictionary", "string_view"])
def test_parquet_text_in_a_category_or_view_column_is_read(tmp_path, kind):
    """pandas' category columns are dictionary-encoded, newer writers use string_view: both hold text,
    and both were refused as 'not text'."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"the {word} river runs by the stone harbour\n" * 20 for word in ("cold", "quiet", "bright")] * 40
    column = pa.array(texts).dictionary_encode() if kind == "dictionary" else pa.array(texts, type=pa.string_view())
    pq.write_table(pa.table({"text": column}), tmp_path / "texts.parquet")
    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(pa.table({"text": texts}), plain / "texts.parquet")
    ours = prepare(str(tmp_path / "texts.parquet"), tokenizer_kind="char", cache_dir=tmp_path / "cache", progress=False)
    reference = prepare(str(plain / "texts.parquet"), tokenizer_kind="char", cache_dir=tmp_path / "c2", progress=False)
    assert (ours.tokens("train") == reference.tokens("train")).all() and len(ours.tokens("train")) > 1000


def test_rows_with_null_text_are_skipped_alike_by_every_reader(tmp_path):
    """A Parquet column's nulls were skipped, a .jsonl's null stopped the run, and a dataset with one
    null row could not be used at all ('field is not a string'): each now reads the rest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"the {word} river runs by the stone harbour\n" * 20 for word in ("cold", "quiet", "bright")] * 40
    with_nulls = [None if i % 7 == 3 else text for i, text in enumerate(texts)]
    kept = [text for text in with_nulls if text is not None]
    (tmp_path / "kept.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in kept))
    (tmp_path / "nulls.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in with_nulls))
    pq.write_table(pa.table({"text": with_nulls}), tmp_path / "nulls.parquet")
    dataset = tmp_path / "owner_data" / "data"
    dataset.mkdir(parents=True)
    (dataset / "train-00000-of-00001.jsonl").write_text((tmp_path / "nulls.jsonl").read_text())

    def tokens(spec):
        prepared = prepare(spec, tokenizer_kind="char", cache_dir=tmp_path / "cache", progress=False)
        return np.concatenate([prepared.tokens("train"), prepared.tokens("val")])

    reference = tokens(str(tmp_path / "kept.jsonl"))
    for spec in (tmp_path / "nulls.jsonl", tmp_path / "nulls.parquet"):
        assert np.array_equal(tokens(str(spec)), reference), spec
    separator = reference[0]  # each split starts with one; the dataset's are split another way (every 10th row)
    assert np.sum(tokens(str(dataset.parent)) != separator) == np.sum(reference != separator)
