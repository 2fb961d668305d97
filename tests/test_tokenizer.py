"""Tokenizer contracts: exact round trips, special tokens never forged by text, save/load."""

from __future__ import annotations

import random

import pytest

from model.tokenizer import (
    DOC_SEPARATOR,
    END_OF_TURN,
    SPECIAL_TOKENS,
    TRAINING_PIECE_CHARS,
    Tokenizer,
    build_char,
    train_bpe,
)
from tests.conftest import make_text, run_script

UNICODE_SAMPLES = [
    "",
    "plain ascii",
    "naïve café — “quotes” and ‘apostrophes’",
    "日本語のテキストと中文",
    "emoji 😀👍🏽 and flags 🇳🇿, ZWJ 👨‍👩‍👧",
    "tabs\tand\r\nCRLF\nnew lines\n\n",
    "numbers 1234567890 3.14159",
    "mixed <|end|> <|user|> text that looks special",
]


@pytest.fixture(scope="module")
def tokenizers() -> list[Tokenizer]:
    text = make_text(2000)
    return [train_bpe([text], 400), build_char([text])]


def test_bpe_learns_the_requested_vocabulary_and_compresses():
    text = make_text(2000)
    tokenizer = train_bpe([text], 400)
    assert tokenizer.n_vocab == 400
    assert len(tokenizer.encode(text)) < len(text.encode()) / 2.5  # merges really compress


def test_bpe_trains_and_encodes_long_runs_without_whitespace_or_of_it():
    """Without the cuts a run of 200,000 letters kept the trainer busy for 23 s (3 MB: over 5 minutes), and
    tiktoken's regex overflowed its stack (a Rust panic) on a million spaces."""
    code = (
        "from model.tokenizer import train_bpe\n"
        "from tests.conftest import make_text\n"
        "line = 'x' * 1_000_000 + 'QUJD+/' * 100_000 + ' ' * 1_500_000 + '\\n' * 1_500_000 + '.'\n"
        "tokenizer = train_bpe([make_text(500), line], 400)\n"
        "assert tokenizer.decode(tokenizer.encode(line)) == line\n"
        "assert tokenizer.encode_batch([line, 'a b']) == [tokenizer.encode(line), tokenizer.encode('a b')]\n"
        "print(tokenizer.n_vocab)\n"
    )
    result = run_script("-c", code, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["400"] and "panic" not in result.stderr


def test_bpe_cuts_runs_of_the_separators_python_calls_whitespace_and_tiktoken_does_not():
    """\\x1c-\\x1f are whitespace to Python's regex only: cut as whitespace, `.\\x1c` runs were left whole
    (quadratic training, and a 32,768-byte token learned from 60,000 characters)."""
    text = ".\x1c" * 30_000
    tokenizer = train_bpe([text], 400)
    assert max(len(token) for token in tokenizer.ranks) <= 2 * TRAINING_PIECE_CHARS + 1
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_unicode_round_trips(tokenizers):
    for tokenizer in tokenizers:
        for text in UNICODE_SAMPLES:
            assert tokenizer.decode(tokenizer.encode(text)) == text, (tokenizer.kind, text)


def test_arbitrary_bytes_round_trip(tokenizers):
    rng = random.Random(0)
    for tokenizer in tokenizers:
        for length in (1, 7, 100, 5000):
            data = bytes(rng.randrange(256) for _ in range(length))
            assert tokenizer.decode_bytes(tokenizer.encode_bytes(data)) == data
        data = "valid ✓ then invalid".encode() + b"\xff\xfe\xc3" + "and valid again é".encode()
        assert tokenizer.decode_bytes(tokenizer.encode_bytes(data)) == data


def test_special_token_text_is_encoded_as_plain_text(tokenizers):
    for tokenizer in tokenizers:
        ids = tokenizer.encode(f"{DOC_SEPARATOR} hi {END_OF_TURN}")
        assert not any(tokenizer.is_special(i) for i in ids)
        assert tokenizer.decode(ids) == f"{DOC_SEPARATOR} hi {END_OF_TURN}"


def test_special_tokens_are_reserved_after_the_ordinary_ones(tokenizers):
    for tokenizer in tokenizers:
        assert list(tokenizer.special_ids) == list(SPECIAL_TOKENS)
        assert sorted(tokenizer.special_ids.values()) == list(
            range(tokenizer.n_vocab - len(SPECIAL_TOKENS), tokenizer.n_vocab)
        )
        assert tokenizer.decode([tokenizer.doc_separator]) == DOC_SEPARATOR
        lengths = tokenizer.token_byte_lengths()
        assert all(lengths[i] == 0 for i in tokenizer.special_ids.values())
        assert all(lengths[i] >= 1 for i in range(tokenizer.n_vocab - len(SPECIAL_TOKENS)))


def test_char_tokenizer_gives_one_token_per_seen_character():
    tokenizer = build_char(["abc é"])
    assert len(tokenizer.encode("abcé é")) == 6
    assert len(tokenizer.encode("ß")) == 2  # unseen: falls back to its two UTF-8 bytes


def test_save_and_load_give_the_same_encoding(tokenizers, tmp_path):
    for tokenizer in tokenizers:
        folder = tmp_path / tokenizer.kind
        folder.mkdir()
        tokenizer.save(folder)
        loaded = Tokenizer.load(folder)
        assert loaded.fingerprint == tokenizer.fingerprint
        text = make_text(50, seed=5)
        assert loaded.encode(text) == tokenizer.encode(text)
