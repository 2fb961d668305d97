"""Text <-> token ids, and the special tokens every later stage relies on.

Design decisions:
- Every tokenizer is a `tiktoken.Encoding` underneath: tiktoken is fast (Rust, multi-threaded batch
  encoding) and its byte-level BPE means any byte sequence round-trips exactly. Three kinds differ
  only in their merge table ("ranks"):
  - `bpe` (default): byte-level BPE trained on the training text. Training uses Hugging Face
    `tokenizers` (seconds for megabytes; BPE training is not the point of this project), and the
    learned merges are converted into tiktoken ranks.
  - `char`: one token per character seen in the training text (nanoGPT's character model), with
    the 256 single bytes as a fallback so unseen characters still round-trip.
  - `gpt2`: tiktoken's GPT-2 encoding, when its files are cached or downloadable.
- The special tokens are fixed here, once, for every kind: a document separator and the turn
  markers a chat template needs, plus a few reserved slots so later features do not change ids.
  They sit right after the ordinary tokens. Text typed by a user is always encoded as plain text
  (`encode` never produces a special id), so typing "<|end|>" cannot forge a control token.
- A tokenizer saves itself as two small files (`tokenizer.json` + `tokenizer.tiktoken`), so a
  checkpoint carries its tokenizer and sampling never needs the network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tiktoken

from model.errors import UserError

# Pre-tokenization split (GPT-4's pattern, numbers in groups of at most two as in nanochat: a small
# vocabulary should not spend merges on three-digit numbers).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# BPE training sees no run of whitespace, or of other characters, longer than this. The
# `tokenizers` trainer slows down with the square of a piece's length (200,000 letters without a
# space: 23 s; 3 MB: no end in 5 minutes), and text without whitespace (minified code, base64, a
# long run of one symbol) makes such pieces. The cap only rules out tokens longer than itself, which
# ordinary text never learns (Tiny Shakespeare gives the same merges with and without it).
TRAINING_PIECE_CHARS = 256
# Encoding keeps whole pieces (tiktoken 0.14 encodes 200,000 letters in 0.06 s), except that its
# regex overflows its stack (a Rust panic) on a run of about a million whitespace characters: runs
# of whitespace longer than this are cut, the only case where ids depend on a cut.
ENCODING_SPACE_CHARS = 100_000
CHAR_PATTERN = r"[\s\S]"  # one piece per character (spelled so tiktoken and Oniguruma both read it)

DOC_SEPARATOR = "<|endoftext|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = (
    DOC_SEPARATOR,
    SYSTEM,
    USER,
    ASSISTANT,
    END_OF_TURN,
    "<|reserved_0|>",
    "<|reserved_1|>",
    "<|reserved_2|>",
)
KINDS = ("bpe", "char", "gpt2")
FORMAT_VERSION = 1
_SURROGATE_RUN = re.compile("([\udc80-\udcff]+)")
# Whitespace as tiktoken and `tokenizers` see it: Python's \s also takes \x1c-\x1f.
_SPACE, _NOT_SPACE = r"[^\S\x1c-\x1f]", r"[\S\x1c-\x1f]"
_LONG_RUN = re.compile(rf"{_NOT_SPACE}{{{TRAINING_PIECE_CHARS + 1},}}|{_SPACE}{{{TRAINING_PIECE_CHARS + 1},}}")
_HUGE_SPACE_RUN = re.compile(rf"{_SPACE}{{{ENCODING_SPACE_CHARS + 1},}}")
_SPACES = re.compile(r"\s*")
_ASCII_SPACE = np.zeros(256, dtype=bool)
_ASCII_SPACE[list(b" \t\n\r\x0b\x0c")] = True
_MAY_BE_SPACE = _ASCII_SPACE | (np.arange(256) >= 128)  # a byte of a non-ASCII character may be one


class Tokenizer:
    """A tiktoken encoding plus our special tokens; `kind` says how its ranks were made."""

    def __init__(self, kind: str, pattern: str, ranks: dict[bytes, int]):
        self.kind = kind
        self.pattern = pattern
        self.ranks = ranks
        self.special_ids = {token: len(ranks) + i for i, token in enumerate(SPECIAL_TOKENS)}
        self._encoding = tiktoken.Encoding(
            name=f"pocketgpt-{kind}",
            pat_str=pattern,
            mergeable_ranks=ranks,
            special_tokens=self.special_ids,
        )
        self._byte_ids = [ranks[bytes([b])] for b in range(256)]

    @property
    def n_vocab(self) -> int:
        return len(self.ranks) + len(SPECIAL_TOKENS)

    @property
    def doc_separator(self) -> int:
        return self.special_ids[DOC_SEPARATOR]

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; special-token strings in `text` are encoded as ordinary text."""
        if _has_huge_space_run(text):
            parts = _cut_runs(text, _HUGE_SPACE_RUN, ENCODING_SPACE_CHARS)
            return [i for part in parts for i in self._encoding.encode_ordinary(part)]
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if any(map(_has_huge_space_run, texts)):
            return [self.encode(text) for text in texts]
        return self._encoding.encode_ordinary_batch(texts, num_threads=4)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Any bytes to ids, including bytes that are not valid UTF-8 (one byte token each)."""
        ids: list[int] = []
        for piece in _SURROGATE_RUN.split(data.decode("utf-8", errors="surrogateescape")):
            if piece and "\udc80" <= piece[0] <= "\udcff":
                ids.extend(self._byte_ids[ord(c) - 0xDC00] for c in piece)
            elif piece:
                ids.extend(self.encode(piece))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._encoding.decode_bytes(list(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; an incomplete UTF-8 sequence becomes U+FFFD (streaming uses decode_bytes)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        return token_id >= len(self.ranks)

    def token_byte_lengths(self) -> list[int]:
        """Bytes each id stands for; special tokens count 0, so bits per byte excludes them."""
        lengths = [0] * self.n_vocab
        for token, rank in self.ranks.items():
            lengths[rank] = len(token)
        return lengths

    @property
    def fingerprint(self) -> str:
        """A short hash that changes whenever encoding would change (used as a cache key)."""
        digest = hashlib.sha256(self.pattern.encode())
        for token, rank in sorted(self.ranks.items(), key=lambda item: item[1]):
            digest.update(token + b"\0" + str(rank).encode())
        digest.update("\0".join(SPECIAL_TOKENS).encode())
        return digest.hexdigest()[:16]

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "pattern": self.pattern,
            "special_tokens": self.special_ids,
            "n_vocab": self.n_vocab,
        }
        (folder / "tokenizer.json").write_text(json.dumps(meta, indent=2) + "\n")
        lines = (f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(self.ranks.items(), key=lambda i: i[1]))
        (folder / "tokenizer.tiktoken").write_text("\n".join(lines) + "\n")

    @classmethod
    def load(cls, folder: Path) -> Tokenizer:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "tokenizer.json").read_text())
            ranks = {}
            for line in (folder / "tokenizer.tiktoken").read_text().splitlines():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read the tokenizer in {folder}: {error}") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{folder}/tokenizer.json has format {meta.get('format_version')}, expected {FORMAT_VERSION}"
            )
        tokenizer = cls(meta["kind"], meta["pattern"], ranks)
        if meta["special_tokens"] != tokenizer.special_ids:
            raise UserError(f"{folder}/tokenizer.json has other special tokens than this version of the code")
        return tokenizer


def check_bpe_size(vocab_size: int) -> None:
    """A byte-level BPE holds the 256 bytes and the special tokens before any merge."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} for a byte-level BPE")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Learn a byte-level BPE of `vocab_size` ids (special tokens included) from `texts`."""
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    check_bpe_size(vocab_size)
    n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
    learner = HFTokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=256 + n_merges,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    learner.train_from_iterator(_cut_long_runs(texts), trainer)
    unmap = {char: byte for byte, char in _bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for merge in json.loads(learner.to_str())["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(unmap[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    return Tokenizer("bpe", SPLIT_PATTERN, ranks)


def _cut_long_runs(texts: Iterable[str]) -> Iterator[str]:
    """Each text, cut into separate texts every TRAINING_PIECE_CHARS characters of any longer run of
    whitespace or of other characters. Pieces never cross texts, and a piece spans at most a run of
    each kind (punctuation then line ends) plus a space: about twice the cap at most.

    Finding runs with the regex costs a quarter of training's time, so numpy first rules them out on
    the bytes (about 12 ms a megabyte), counting a byte of a non-ASCII character as either kind.
    """
    for text in texts:
        data = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)
        longest = max(_longest_run(~_ASCII_SPACE[data]), _longest_run(_MAY_BE_SPACE[data]))
        if longest <= TRAINING_PIECE_CHARS:
            yield text
        else:
            yield from _cut_runs(text, _LONG_RUN, TRAINING_PIECE_CHARS)


def _has_huge_space_run(text: str) -> bool:
    """Whether `text` has a run of more than ENCODING_SPACE_CHARS whitespace characters.

    Such a run covers a multiple of ENCODING_SPACE_CHARS, so only the characters there are looked
    at, and the run around each that is whitespace measured: microseconds a megabyte, where any
    pass over every character would add a quarter to encoding's time. This uses Python's whitespace,
    which adds \x1c-\x1f to tiktoken's; a run it finds for them alone is a false alarm, which costs
    only a regex pass (the cut itself uses tiktoken's whitespace).
    """
    step = ENCODING_SPACE_CHARS
    for i in range(0, len(text), step):
        if text[i].isspace():
            before = text[max(0, i - step) : i]
            if len(before) - len(before.rstrip()) + _SPACES.match(text, i).end() - i > step:
                return True
    return False


def _cut_runs(text: str, runs: re.Pattern, length: int) -> Iterator[str]:
    """`text` in parts, cut every `length` characters of each match of `runs`."""
    start = 0
    for run in runs.finditer(text):
        for cut in range(run.start() + length, run.end(), length):
            yield text[start:cut]
            start = cut
    yield text[start:]


def _longest_run(mask: np.ndarray) -> int:
    """The length of the longest run of True in `mask`."""
    breaks = np.flatnonzero(~mask)
    return int(np.diff(breaks, prepend=-1, append=len(mask)).max()) - 1


def build_char(texts: Iterable[str]) -> Tokenizer:
    """One token per character seen in `texts`; the 256 bytes cover everything else."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    ranks = {bytes([b]): b for b in range(256)}
    for char in sorted(chars):
        encoded = char.encode("utf-8")
        # tiktoken merges pairwise, so a multi-byte character needs its prefixes as tokens too.
        for end in range(2, len(encoded) + 1):
            ranks.setdefault(encoded[:end], len(ranks))
    return Tokenizer("char", CHAR_PATTERN, ranks)


def load_gpt2() -> Tokenizer:
    """tiktoken's GPT-2 merges (cached by tiktoken, downloaded on first use)."""
    from tiktoken_ext import openai_public

    try:
        spec = openai_public.gpt2()
    except Exception as error:  # tiktoken raises requests/OS errors of many kinds when offline
        raise UserError(
            "the gpt2 tokenizer files are neither cached nor downloadable "
            f"({type(error).__name__}); go online once, point TIKTOKEN_CACHE_DIR at a cache, "
            "or use --tokenizer bpe"
        ) from None
    return Tokenizer("gpt2", spec["pat_str"], spec["mergeable_ranks"])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (how `tokenizers` spells bytes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def has_lone_surrogate(text: str) -> bool:
    """Whether `text` holds half of a surrogate pair on its own, which no UTF-8 (and so no tokenizer)
    can hold: JSON can escape one (\\ud800), and Python keeps command-line bytes that are not UTF-8 as
    such halves. Corpora, conversations and typed prompts are checked with this one test."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
