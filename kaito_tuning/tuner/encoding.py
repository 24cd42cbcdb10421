"""The bulk tokenizing behind ``dataprep.py``: texts rendered and encoded many at a time into ragged
arrays (one flat token array plus row lengths), loss masks from offsets or a shared prefix, and the
numpy truncation and filtering TRL does row by row."""

from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from kaito_tuning.tuner.inputs import DatasetInvalid
from kaito_tuning.tuner.pieces import PieceEncoder

log = logging.getLogger(__name__)

#: rows whose split tokenization is checked against whole-text tokenization
CHECK_ROWS = 32
IGNORE = -100


@dataclass
class _Ragged:
    """Token lists as one flat array and per-row lengths."""

    values: Any  # np.ndarray int32
    lengths: Any  # np.ndarray int64
    encodings: Any = None  # the tokenizer's Encoding objects, where offsets were asked for

    @property
    def starts(self):
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def row(self, i: int):
        s = int(self.lengths[:i].sum())
        return self.values[s:s + int(self.lengths[i])]

    @staticmethod
    def concat(parts: list[_Ragged]) -> _Ragged:
        if not parts:
            return _Ragged(np.zeros(0, np.int32), np.zeros(0, np.int64))
        return _Ragged(np.concatenate([p.values for p in parts]), np.concatenate([p.lengths for p in parts]))


class Encoder:
    """The tokenizer's Rust backend as transformers' ``__call__`` sets it up (no truncation or padding,
    ``split_special_tokens``), called on whole batches."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = tokenizer._tokenizer
        if backend.truncation is not None or backend.padding is not None:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
        self.backend = backend
        self.pieces = PieceEncoder.for_backend(backend, tokenizer.added_tokens_decoder.values())
        self.adds_tokens = backend.num_special_tokens_to_add(False) > 0

    def encode(self, texts: list[str], add_special_tokens: bool, offsets: bool = False) -> _Ragged:
        """Token ids of each text, as ``tokenizer(texts)`` gives them (and its Encodings where ``offsets``);
        by unique piece (``pieces.py``) where that gives the same ids."""
        if self.pieces is not None and not offsets and not (add_special_tokens and self.adds_tokens):
            return _Ragged(*self.pieces.encode(texts))
        if not texts:
            return _Ragged(np.zeros(0, np.int32), np.zeros(0, np.int64), [] if offsets else None)
        fn = self.backend.encode_batch if offsets else self.backend.encode_batch_fast
        encodings = fn(texts, add_special_tokens=add_special_tokens)
        rows = [np.array(e.ids, dtype=np.int32) for e in encodings]  # a third faster than one chained fromiter
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        return _Ragged(np.concatenate(rows) if rows else np.zeros(0, np.int32), lengths,
                       encodings if offsets else None)

    def prefix_cut_ok(self) -> bool:
        """Whether a text cut between a letter and ' ' + a letter tokenizes as the whole text's leading tokens.
        True for byte-level BPE with GPT-2's pre-tokenizer regex and nothing before it (no normalizer, no added
        token holding a space): the regex scans left to right, every piece before the cut ends at or before it
        in both texts and its matching looks at most one character past its end, and BPE works piece by piece."""
        if not hasattr(self, "_prefix_ok"):
            b = self.backend
            pre = json.loads(b.pre_tokenizer.__getstate__()) if b.pre_tokenizer is not None else {}
            self._prefix_ok = (b.normalizer is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                               and not pre.get("add_prefix_space") and type(b.model).__name__ == "BPE"
                               and not b.model.dropout
                               and not any(" " in str(t.content) for t in self.tokenizer.added_tokens_decoder.values()))
        return self._prefix_ok


#: rows per chunk: this thread renders the next chunks while the tokenizer (Rust, every core, GIL released)
#: encodes earlier ones, INFLIGHT at a time
CHUNK = 1024
INFLIGHT = 2


def run_work(work, enc: Encoder) -> tuple[_Ragged, dict]:
    """Render/encode/assemble ``work`` chunk by chunk, rendering the next chunk while this one is encoded."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    parts: list = []
    # two chunks in the encoder at once: the Rust thread pool fills the tail of one batch with the other's texts
    with ThreadPoolExecutor(INFLIGHT, thread_name_prefix="tokenize") as pool:
        pending: deque = deque()
        for lo in range(0, work.rows, CHUNK):
            hi = min(work.rows, lo + CHUNK)
            requests, ctx = work.texts(lo, hi)
            pending.append((ctx, pool.submit(lambda rq: [enc.encode(t, s, o) for t, s, o in rq], requests)))
            if len(pending) > INFLIGHT:
                ctx0, fut0 = pending.popleft()
                parts.append(work.finish(ctx0, fut0.result()))
        while pending:
            ctx0, fut0 = pending.popleft()
            parts.append(work.finish(ctx0, fut0.result()))
    if getattr(work, "redo", False):  # the split check failed on the first rows: every row whole
        work.redo = False
        return run_work(work, enc)
    ids = _Ragged.concat([p[0] for p in parts])
    names = set().union(*(p[1] for p in parts)) if parts else set()
    masks = {k: np.concatenate([p[1][k] for p in parts]) for k in names}
    return ids, masks


def _render(tokenizer, convs: list, template: str, *, add_generation_prompt: bool = False,
            spans: bool = False) -> tuple[list[str], list | None]:
    """Rendered conversations (and assistant character spans), exactly as ``apply_chat_template`` renders them.
    Plain {role, content} messages go straight to the compiled template: transformers' own path first copies
    each message into plain template data, which for such messages is the same dicts."""
    from transformers.utils.chat_template_utils import (
        _REASONING_FIELDS,
        _compile_jinja_template,
        _normalize_chat_messages,
        render_jinja_template,
    )

    kwargs = tokenizer.special_tokens_map
    plain = [[{k: v for k, v in m.items() if v is not None} for m in c] for c in convs]
    if not spans and all(isinstance(v, str) and k not in _REASONING_FIELDS
                         for c in plain for m in c for k, v in m.items()):
        compiled = _compile_jinja_template(template)
        return [compiled.render(messages=c, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                                **kwargs) for c in plain], None
    return render_jinja_template(
        conversations=[_normalize_chat_messages(c) for c in convs], tools=None, documents=None,
        chat_template=template, return_assistant_tokens_mask=spans, continue_final_message=False,
        add_generation_prompt=add_generation_prompt, **kwargs)


#: a text longer than max_length times this many characters is cut before tokenizing (English runs at ~4.4
#: characters per SmolLM2 token); a cut row that ends up shorter than max_length tokens is tokenized whole
CUT_CHARS_PER_TOKEN = 5


class _Cutter:
    """Cuts texts whose tokens past ``max_length`` would be dropped anyway, at a place where the text before
    tokenizes as the whole text's leading tokens (``Encoder.prefix_cut_ok``), and mends rows cut too short.
    The first rows cut are checked against their whole texts; if they differ, nothing is cut."""

    def __init__(self, enc: Encoder, max_length: int, add_special_tokens: bool):
        self.enc, self.add_special_tokens = enc, add_special_tokens
        self.need = max_length + (enc.backend.num_special_tokens_to_add(False) if add_special_tokens else 0)
        self.limit = max_length * CUT_CHARS_PER_TOKEN
        self.checked = False

    def cut(self, texts: list[str], before: list[int] | None = None) -> tuple[list[str], Any]:
        """(texts cut, which were); ``before``: characters ahead of each text in its row (they count too)."""
        limits = [self.limit] * len(texts) if before is None else [max(self.limit - b, 64) for b in before]
        points = [_cut_point(t, n) if len(t) > n else len(t) for t, n in zip(texts, limits)]
        return [t[:p] for t, p in zip(texts, points)], np.array([p < len(t) for t, p in zip(texts, points)], bool)

    def mend(self, ids: _Ragged, texts: list[str], cut, before=0) -> _Ragged:
        """Rows cut to fewer than max_length tokens (counting ``before`` tokens ahead of them), tokenized whole."""
        short = np.flatnonzero(cut & (ids.lengths + before < self.need))
        if short.size:
            ids = _replace_rows(ids, short, self.enc.encode([texts[i] for i in short], self.add_special_tokens))
        return ids

    def check(self, ids: _Ragged, texts: list[str], cut) -> bool:
        """The first cut rows' tokens are the leading tokens of their whole texts (checked once: on the first
        chunk with cut rows, chunks being finished in order)."""
        rows = np.flatnonzero(cut)[:CHECK_ROWS]
        if self.checked or not rows.size:
            return True
        self.checked = True
        whole = self.enc.encode([texts[i] for i in rows], self.add_special_tokens)
        specials_at_end = self.enc.backend.num_special_tokens_to_add(False) if self.add_special_tokens else 0
        for k, i in enumerate(rows):
            got = ids.row(int(i))
            n = len(got) - specials_at_end  # a template adding a token at the end adds it after the cut too
            if n < 0 or not np.array_equal(whole.row(k)[:n], got[:n]):
                log.info("this tokenizer does not tokenize a text cut at a word boundary as the whole text's "
                         "leading tokens; tokenizing whole texts")
                return False
        return True


def _cut_point(text: str, limit: int) -> int:
    """The last place at or before ``limit`` between a letter and ' ' + a letter; len(text) where there is none
    in the 2,000 characters before it."""
    lo = max(1, limit - 2000)
    p = text.rfind(" ", lo, limit)
    while p > lo:
        if p + 1 < len(text) and text[p - 1].isalpha() and text[p + 1].isalpha():
            return p
        p = text.rfind(" ", lo, p)
    return len(text)


def _replace_rows(r: _Ragged, rows, new: _Ragged) -> _Ragged:
    """r with its rows ``rows`` (ascending) replaced by new's rows, in order."""
    parts, prev = [], 0
    for k, i in enumerate(rows):
        parts += [_slice_rows(r, prev, int(i)), _slice_rows(new, k, k + 1)]
        prev = int(i) + 1
    parts.append(_slice_rows(r, prev, r.lengths.size))
    return _Ragged.concat(parts)


class TextWork:
    """Plain text (+ EOS), special tokens added as the tokenizer's ``__call__`` adds them."""

    def __init__(self, enc: Encoder, texts: list[str], cut: int | None = None):
        self.texts_, self.rows = texts, len(texts)
        self.cutter = _Cutter(enc, cut, True) if cut else None
        self.redo = False

    def texts(self, lo, hi):
        texts = self.texts_[lo:hi]
        if self.cutter is None:
            return [(texts, True, False)], (lo, texts, None)
        cut_texts, cut = self.cutter.cut(texts)
        return [(cut_texts, True, False)], (lo, texts, cut)

    def finish(self, ctx, results):
        lo, texts, cut = ctx
        ids = results[0]
        if cut is not None:
            if not self.cutter.check(ids, texts, cut):
                self.cutter, self.redo = None, True
            ids = self.cutter.mend(ids, texts, cut) if self.cutter else ids
        return ids, {}


class MessagesWork:
    """Whole conversations; with assistant-only loss, the tokens overlapping the template's generation spans."""

    def __init__(self, enc: Encoder, convs: list, template: str, assistant_only: bool, name: str,
                 cut: int | None = None):
        self.enc, self.convs, self.template, self.spans, self.name = enc, convs, template, assistant_only, name
        self.rows = len(convs)
        self.cutter = _Cutter(enc, cut, False) if cut and not assistant_only else None
        self.redo = False

    def texts(self, lo, hi):
        texts, spans = _render(self.enc.tokenizer, self.convs[lo:hi], self.template, spans=self.spans)
        if self.cutter is None:
            return [(texts, False, self.spans)], (lo, spans, texts, None)
        cut_texts, cut = self.cutter.cut(texts)
        return [(cut_texts, False, False)], (lo, spans, texts, cut)

    def finish(self, ctx, results):
        lo, spans, texts, cut = ctx
        ids = results[0]
        if cut is not None:
            if not self.cutter.check(ids, texts, cut):
                self.cutter, self.redo = None, True
            return (self.cutter.mend(ids, texts, cut) if self.cutter else ids), {}
        if not self.spans:
            return ids, {}
        mask = _span_mask(ids.encodings, spans, ids)
        _require_assistant_tokens(mask, ids, self.name, lo)
        return ids, {"assistant": mask}


class TextPairsWork:
    """Text prompt/completion: TRL tokenizes prompt and prompt+completion (special tokens added) and the
    completion starts where they diverge."""

    def __init__(self, enc: Encoder, prompts: list[str], completions: list[str]):
        self.prompts, self.completions, self.rows = prompts, completions, len(prompts)

    def texts(self, lo, hi):
        p = self.prompts[lo:hi]
        return [(p, True, False), ([a + b for a, b in zip(p, self.completions[lo:hi])], True, False)], None

    def finish(self, ctx, results):
        prompt, full = results
        return full, {"completion": _completion_mask(full, _common_prefix(prompt, full))}


class ChatPairsWork:
    """Conversational prompt/completion: TRL tokenizes the prompt (with the generation prompt) and
    prompt+completion, and the completion starts where the two token lists diverge. The text both share up
    to the last special token before they differ is tokenized once (``_split_points``); checked against whole
    texts on the first rows, and every row is tokenized whole if the check fails."""

    def __init__(self, enc: Encoder, prompts: list, completions: list, template: str, assistant_only: bool,
                 name: str, cut: int | None = None):
        self.enc, self.template, self.assistant_only, self.name = enc, template, assistant_only, name
        self.prompts, self.completions, self.rows = prompts, completions, len(prompts)
        self.cands = None if assistant_only else _split_candidates(enc, template)
        self.cutter = _Cutter(enc, cut, False) if cut and self.cands else None
        self.redo = False

    def texts(self, lo, hi):
        tok = self.enc.tokenizer
        p_texts, _ = _render(tok, self.prompts[lo:hi], self.template, add_generation_prompt=True)
        f_texts, spans = _render(tok, [p + c for p, c in zip(self.prompts[lo:hi], self.completions[lo:hi])],
                                 self.template, spans=self.assistant_only)
        if self.assistant_only:
            return [(f_texts, False, True), (p_texts, False, False)], (lo, spans, None)
        if self.cands:
            points = [_split_point(p, f, self.cands) for p, f in zip(p_texts, f_texts)]
            f_tails = [f[b:] for f, b in zip(f_texts, points)]
            cut = None
            if self.cutter is not None:
                cut_tails, cut = self.cutter.cut(f_tails, points)
            parts = [f[:b] for f, b in zip(f_texts, points)] + [p[b:] for p, b in zip(p_texts, points)] + \
                (cut_tails if cut is not None else f_tails)
            requests = [(parts, False, False)]
            if lo == 0:  # the check: the first rows whole
                requests += [(f_texts[:CHECK_ROWS], False, False), (p_texts[:CHECK_ROWS], False, False)]
            return requests, (lo, None, hi - lo, f_tails, cut)
        return [(f_texts, False, False), (p_texts, False, False)], (lo, None, None, None, None)

    def finish(self, ctx, results):
        lo, spans, split_rows, f_tails, cut = ctx
        if split_rows is not None:
            parts = results[0]
            head, p_tail, f_tail = (_slice_rows(parts, i * split_rows, (i + 1) * split_rows) for i in range(3))
            if cut is not None and self.cutter is not None:
                if not self.cutter.check(f_tail, f_tails, cut):
                    self.cands, self.cutter, self.redo = None, None, True
                else:
                    f_tail = self.cutter.mend(f_tail, f_tails, cut, before=head.lengths)
            full, prompt = _concat_rows(head, f_tail), _concat_rows(head, p_tail)
            if lo == 0:
                k = min(split_rows, CHECK_ROWS)
                whole, whole_p = results[1], results[2]
                cut_k = cut[:k] if cut is not None else np.zeros(k, bool)
                if not (_leading_rows(whole, _slice_rows(full, 0, k), cut_k)
                        and _same_rows(whole_p, _slice_rows(prompt, 0, k))):
                    log.info("this tokenizer does not tokenize chat text split at special tokens (or cut at a word "
                             "boundary) as a whole; tokenizing prompts and completions whole")
                    self.cands, self.cutter, self.redo = None, None, True
            return full, {"completion": _completion_mask(full, head.lengths + _common_prefix(p_tail, f_tail))}
        full, prompt = results
        masks = {"completion": _completion_mask(full, _common_prefix(prompt, full))}
        if spans is not None:
            masks["assistant"] = _span_mask(full.encodings, spans, full)
            _require_assistant_tokens(masks["assistant"], full, self.name, lo)
        return full, masks


def _completion_mask(full: _Ragged, prompt_len):
    """True for each token at or after its row's prompt length."""
    return np.arange(full.values.size) - np.repeat(full.starts, full.lengths) >= np.repeat(prompt_len, full.lengths)


def _span_mask(encodings, spans: list[list[tuple[int, int]]], ids: _Ragged):
    """True for every token overlapping an assistant span (transformers' rule), on flat arrays."""
    offsets = np.array(list(itertools.chain.from_iterable(e.offsets for e in encodings)), dtype=np.int64)
    offsets = offsets.reshape(-1, 2)
    # one coordinate line for all rows: row i's characters live at base[i] + c
    width = int(max(offsets[:, 1].max(initial=0), max((e for s in spans for _, e in s), default=0))) + 2
    base = np.arange(len(encodings), dtype=np.int64) * width
    tok_base = np.repeat(base, ids.lengths)
    t_start, t_end = offsets[:, 0] + tok_base, offsets[:, 1] + tok_base
    flat_spans = [(base[i] + s, base[i] + e) for i, row in enumerate(spans) for s, e in row]
    if not flat_spans:
        return np.zeros(ids.values.size, dtype=bool)
    s_start = np.array([s for s, _ in flat_spans], dtype=np.int64)
    s_end = np.array([e for _, e in flat_spans], dtype=np.int64)
    # the first span ending after the token's start; the token overlaps it when it ends after the span's start
    k = np.searchsorted(s_end, t_start, side="right")
    inside = k < s_end.size
    k = np.minimum(k, s_end.size - 1)
    return inside & (t_end > s_start[k]) & (t_start < s_end[k])


def _require_assistant_tokens(mask, ids: _Ragged, name: str, first_row: int = 0) -> None:
    empty = np.flatnonzero(_row_sums(mask, ids.lengths) == 0)
    if empty.size:
        raise DatasetInvalid(f"row {first_row + int(empty[0])} has no assistant tokens once rendered with the chat "
                             "template: its {% generation %} markers mark nothing; check ModelConfig.chat_template",
                             field=f"{name} data")


def _common_prefix(a: _Ragged, b: _Ragged):
    """Per row, how many leading tokens a and b share (TRL's ``common_prefix_length``), on flat arrays."""
    n = np.minimum(a.lengths, b.lengths)
    total = int(n.sum())
    if total == 0:
        return np.zeros(n.size, dtype=np.int64)
    row_start = np.concatenate([[0], np.cumsum(n)[:-1]])
    j = np.arange(total) - np.repeat(row_start, n)  # position within the row
    differ = a.values[np.repeat(a.starts, n) + j] != b.values[np.repeat(b.starts, n) + j]
    first = np.where(differ, j, np.iinfo(np.int64).max)
    out = n.copy()
    rows = np.flatnonzero(n > 0)
    out[rows] = np.minimum(n[rows], np.minimum.reduceat(first, row_start[rows]))
    return out


def _split_candidates(enc: Encoder, template: str) -> list[str] | None:
    """Added tokens at which rendered chat text can be cut so the part before tokenizes the same whatever
    follows: tokenizers split added tokens out before normalizing or pre-tokenizing. Only tokens that appear
    in the template, strip nothing around them, match anywhere and overlap no other added token."""
    backend = enc.backend
    if backend.encode_special_tokens:
        return None
    added = {str(t.content): t for t in enc.tokenizer.added_tokens_decoder.values()}
    normalizer = backend.normalizer is not None
    cands = []
    for text, tok in added.items():
        if not text or text not in template or tok.lstrip or tok.rstrip or tok.single_word or \
                (normalizer and tok.normalized):
            continue
        overlaps = any(o != text and (text in o or any(o.endswith(text[:k]) or o.startswith(text[k:])
                                                      for k in range(1, len(text))))
                       for o in added)
        if not overlaps:
            cands.append(text)
    return cands or None


def _split_point(p: str, f: str, cands: list[str]) -> int:
    """Where prompt p and prompt+completion f are cut: the start of the last candidate token both share
    before they differ (0: nowhere, both are tokenized whole)."""
    d = len(p) if f.startswith(p) else len(os.path.commonprefix([p, f]))
    return max(0, max(p.rfind(c, 0, d) for c in cands))


def _slice_rows(r: _Ragged, lo: int, hi: int) -> _Ragged:
    starts = r.starts
    s = int(starts[lo]) if lo < r.lengths.size else int(r.values.size)
    e = int(starts[hi]) if hi < r.lengths.size else int(r.values.size)
    return _Ragged(r.values[s:e], r.lengths[lo:hi])


def _concat_rows(a: _Ragged, b: _Ragged) -> _Ragged:
    """Row i of the result is row i of a followed by row i of b."""
    lengths = a.lengths + b.lengths
    out = np.empty(int(lengths.sum()), dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    pos_a = np.repeat(starts, a.lengths) + np.arange(a.values.size) - np.repeat(a.starts, a.lengths)
    pos_b = np.repeat(starts + a.lengths, b.lengths) + np.arange(b.values.size) - np.repeat(b.starts, b.lengths)
    out[pos_a] = a.values
    out[pos_b] = b.values
    return _Ragged(out, lengths)


def _same_rows(a: _Ragged, b: _Ragged) -> bool:
    return np.array_equal(a.lengths, b.lengths) and np.array_equal(a.values, b.values)


def _leading_rows(whole: _Ragged, got: _Ragged, cut) -> bool:
    """Each row of got is the same row of whole: all of it, or its leading part where the text was cut."""
    if whole.lengths.size != got.lengths.size or np.any(got.lengths > whole.lengths):
        return False
    if np.any((got.lengths != whole.lengths) & ~cut):
        return False
    return all(np.array_equal(whole.row(i)[:int(got.lengths[i])], got.row(i)) for i in range(got.lengths.size))


def truncate(values, labels, lengths, max_length: int, mode: str):
    """Each row to its first (keep_start) or last (keep_end) max_length tokens."""
    long_rows = np.flatnonzero(lengths > max_length)
    if not long_rows.size:
        return values, labels, lengths
    ends = np.cumsum(lengths)
    keep = np.ones(values.size, dtype=bool)
    for i in long_rows:  # the few long rows: drop their excess in place
        start, end = int(ends[i] - lengths[i]), int(ends[i])
        if mode == "keep_start":
            keep[start + max_length:end] = False
        else:
            keep[start:end - max_length] = False
    return values[keep], labels[keep], np.minimum(lengths, max_length)


def drop_unlabelled(values, labels, lengths):
    """Drop rows left with no trained token (TRL: 'Dropping fully masked examples')."""
    keep_rows = _row_sums(labels != IGNORE, lengths) > 0
    if keep_rows.all():
        return values, labels, lengths
    keep_tokens = np.repeat(keep_rows, lengths)
    return values[keep_tokens], labels[keep_tokens], lengths[keep_rows]


def _row_sums(flags, lengths):
    """Per row, how many of its tokens are flagged."""
    total = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    ends = np.cumsum(lengths)
    return total[ends] - total[ends - lengths]


def to_table(values, labels, lengths):
    """input_ids (int32, as datasets stores them) and labels (int64) as Arrow list columns."""
    import pyarrow as pa

    ends = np.concatenate([[0], np.cumsum(lengths)])
    large = int(ends[-1]) >= 2**31 - 1
    array = pa.LargeListArray if large else pa.ListArray
    offsets = pa.array(ends.astype(np.int64 if large else np.int32))
    return pa.table({
        "input_ids": array.from_arrays(offsets, pa.array(values.astype(np.int32, copy=False))),
        "labels": array.from_arrays(offsets, pa.array(labels.astype(np.int64, copy=False))),
    })


def token_count(ds) -> int:
    import pyarrow.compute as pc

    col = ds.data.table.column("input_ids")
    return int(pc.sum(pc.list_value_length(col)).as_py() or 0)
