"""Byte-level BPE by unique piece: the tokenizer's own pre-tokenizer split, done once per distinct piece.

A byte-level BPE tokenizer (GPT-2's regex: SmolLM2, GPT-2; Llama-3's and Qwen2's: Llama-3.x, DeepSeek-R1
distills, Qwen2.5, Phi-4) first splits a text at its added tokens, then splits each stretch between them
with one regex, and runs BPE on each piece alone. Natural text repeats a few hundred thousand distinct pieces millions of times, and the
Rust tokenizer spends most of its time re-splitting and re-mapping them (about 1.3 us a token here). For
ASCII text the regex's classes are plain ASCII ranges, so Python's own ``re`` splits it the same way at a
fifth of that cost; each distinct piece is then encoded once by the tokenizer itself, and every row is
gathered from those with numpy. Rows with any non-ASCII character, and tokenizers this module cannot
show equal, go to the tokenizer unchanged; the first rows are checked against it, and on any difference
the tokenizer is used for everything.
"""

from __future__ import annotations

import json
import logging
import re
import threading

import numpy as np

log = logging.getLogger(__name__)

#: GPT-2's pre-tokenizer pattern (tokenizers' ByteLevel with use_regex) with its Unicode classes written for
#: ASCII text: \p{L} is [A-Za-z], \p{N} is [0-9], and \s (Oniguruma: 9-13, 0x85, Zs, Zl, Zp) is re.ASCII's \s
GPT2_ASCII = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+", re.ASCII)
#: the ``Split`` patterns of tokenizer.json files this module knows (Llama-3 and tiktoken's cl100k; Qwen2),
#: written for ASCII text the same way; each covers every character, so its matches are all the pieces
SPLIT_ASCII = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{1,3}| ?[^\sA-Za-z0-9]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]| ?[^\sA-Za-z0-9]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
#: normalizers that leave ASCII text as it is
ASCII_NEUTRAL = {None, "NFC", "NFKC", "NFD", "NFKD"}
#: new pieces encoded in one text
FRESH_GROUP = 2000
#: rows checked against the tokenizer on the first call
CHECK_ROWS = 64


class PieceEncoder:
    """``encode(texts)`` → (int32 token ids of all rows, int64 lengths per row), equal to the backend's
    ``encode_batch_fast(texts, add_special_tokens=False)``. Build with ``for_backend``. One thread at a time
    encodes (its work holds the GIL anyway: handing a second thread's texts to the Rust tokenizer meanwhile
    measured no faster)."""

    def __init__(self, backend, added: dict[str, int], pattern: re.Pattern = GPT2_ASCII):
        self.backend, self.pattern = backend, pattern
        ordered = sorted(added, key=len, reverse=True)  # at one position the longest token wins (leftmost-longest)
        self.special = re.compile("(" + "|".join(map(re.escape, ordered)) + ")") if ordered else None
        self.index = _Numbering()
        self.flat = np.zeros(0, np.int32)
        self.starts = np.zeros(0, np.int64)
        self.lengths = np.zeros(0, np.int64)
        for text in added:  # an added token is one piece of one known id
            self.index[text] = len(self.index)
        self._append(np.array(list(added.values()), np.int32), np.ones(len(added), np.int64))
        # new pieces are encoded joined by an added token: the tokenizer splits there before anything else,
        # so each piece is encoded alone, without a sequence (and its Encoding) per piece
        self.sep = next(iter(added.items()), None)
        self.lock = threading.Lock()
        self.checked = False
        self.disabled = False

    @classmethod
    def for_backend(cls, backend, added_tokens) -> PieceEncoder | None:
        """The piece encoder for this ``tokenizers.Tokenizer``, or None where its output could differ: a
        normalizer that changes ASCII text, a pre-tokenizer but byte-level with a known pattern (``_pattern``),
        a model but BPE without dropout, special tokens left in the text, or added tokens that strip or match
        only whole words or are matched in two passes."""
        state = (lambda part: json.loads(part.__getstate__()) if part is not None else {})  # noqa: E731
        pattern = _pattern(state(backend.pre_tokenizer))
        if pattern is None or state(backend.normalizer).get("type") not in ASCII_NEUTRAL \
                or type(backend.model).__name__ != "BPE" or backend.model.dropout or backend.encode_special_tokens:
            return None
        tokens = list(added_tokens)
        if any(t.lstrip or t.rstrip or t.single_word for t in tokens) or len({t.normalized for t in tokens}) > 1:
            return None
        added = {str(t.content): backend.token_to_id(str(t.content)) for t in tokens if str(t.content)}
        if any(v is None for v in added.values()):
            return None
        return cls(backend, added, pattern)

    def _append(self, values, lengths) -> None:
        """The tokens of the pieces numbered next: all in order, and how many each has."""
        self.starts = np.concatenate([self.starts, self.flat.size + np.cumsum(lengths) - lengths])
        self.lengths = np.concatenate([self.lengths, lengths])
        self.flat = np.concatenate([self.flat, values])

    def _fresh(self, pieces: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of pieces not seen before (see ``sep``), as ``_backend`` gives them."""
        if self.sep is None:
            return self._backend(pieces)
        text, sep = self.sep
        groups = [pieces[i:i + FRESH_GROUP] for i in range(0, len(pieces), FRESH_GROUP)]
        values, lengths = [], []
        for group, enc in zip(groups, self.backend.encode_batch_fast([text.join(g) for g in groups],
                                                                     add_special_tokens=False)):
            ids = np.array(enc.ids, np.int32)
            at = np.flatnonzero(ids == sep)
            if at.size != len(group) - 1:  # cannot happen: a piece never holds the token's text
                return self._backend(pieces)
            lengths.append(np.diff(np.concatenate([[-1], at, [ids.size]])) - 1)
            values.append(np.delete(ids, at))
        return np.concatenate(values), np.concatenate(lengths).astype(np.int64)

    def _backend(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.backend.encode_batch_fast(texts, add_special_tokens=False) if texts else []
        rows = [np.array(e.ids, dtype=np.int32) for e in enc]
        lengths = np.fromiter(map(len, rows), np.int64, count=len(rows))
        return (np.concatenate(rows) if rows else np.zeros(0, np.int32)), lengths

    def _pieces(self, texts: list[str]) -> tuple[list[str], list[int]]:
        """Every row's pieces in order (added tokens included), and how many each row has."""
        pieces: list[str] = []
        counts: list[int] = []
        findall, split = self.pattern.findall, self.special.split if self.special else None
        for text in texts:
            n0 = len(pieces)
            if split is None:
                pieces += findall(text)
            else:
                for k, part in enumerate(split(text)):
                    if k & 1:
                        pieces.append(part)
                    elif part:
                        pieces += findall(part)
            counts.append(len(pieces) - n0)
        return pieces, counts

    def _ascii(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        pieces, counts = self._pieces(texts)
        self.index.fresh = []
        idx = np.fromiter(map(self.index.__getitem__, pieces), np.int64, count=len(pieces))
        if self.index.fresh:
            self._append(*self._fresh(self.index.fresh))
        n = self.lengths[idx]
        first = self.starts[idx]
        ends = np.cumsum(n)
        values = self.flat[np.repeat(first - (ends - n), n) + np.arange(int(ends[-1]) if n.size else 0)]
        counts = np.asarray(counts, np.int64)
        piece_ends = np.cumsum(counts)
        token_ends = np.concatenate([[0], ends]).astype(np.int64)
        lengths = token_ends[piece_ends] - token_ends[piece_ends - counts]
        return values, lengths

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            return self._encode(texts)

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.disabled:
            return self._backend(texts)
        plain = np.fromiter(map(str.isascii, texts), bool, count=len(texts))
        if plain.all():
            values, lengths = self._ascii(texts)
        else:
            rows = np.flatnonzero(plain)
            a = self._ascii([texts[i] for i in rows])
            b = self._backend([texts[i] for i in np.flatnonzero(~plain)])
            values, lengths = _interleave(plain, a, b)
        if not self.checked:
            self.checked = True
            k = min(CHECK_ROWS, len(texts))
            want = self._backend(texts[:k])
            if not (np.array_equal(want[1], lengths[:k]) and np.array_equal(want[0], values[:int(want[1].sum())])):
                log.info("splitting ASCII text into pieces does not reproduce this tokenizer's tokens; "
                         "tokenizing with the tokenizer alone")
                self.disabled = True
                return self._backend(texts)
        return values, lengths


def _pattern(pre: dict) -> re.Pattern | None:
    """The ASCII pattern that splits text as this pre-tokenizer does: ByteLevel with GPT-2's regex, or a
    known ``Split`` (isolated) followed by ByteLevel without its regex; None for anything else."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return GPT2_ASCII
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, level = steps
    regex = (split.get("pattern") or {}).get("Regex")
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert") \
            or regex not in SPLIT_ASCII or level.get("type") != "ByteLevel" or level.get("use_regex", True) \
            or level.get("add_prefix_space"):
        return None
    return re.compile(SPLIT_ASCII[regex], re.ASCII)


class _Numbering(dict):
    """Piece → its number; a piece not seen before gets the next number and is listed in ``fresh``."""

    fresh: list[str]

    def __missing__(self, piece: str) -> int:
        i = self[piece] = len(self)
        self.fresh.append(piece)
        return i


def _interleave(first_rows, a, b) -> tuple[np.ndarray, np.ndarray]:
    """Rows where ``first_rows`` is True from a, the others from b, in order."""
    lengths = np.empty(first_rows.size, np.int64)
    lengths[first_rows], lengths[~first_rows] = a[1], b[1]
    starts = np.cumsum(lengths) - lengths
    out = np.empty(int(lengths.sum()), np.int32)
    for (values, lens), rows in ((a, first_rows), (b, ~first_rows)):
        own = np.cumsum(lens) - lens
        out[np.repeat(starts[rows] - own, lens) + np.arange(values.size)] = values
    return out, lengths
