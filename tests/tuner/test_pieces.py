"""Tokenizing by unique piece (tuner/pieces.py) gives exactly the Rust tokenizer's ids, on any text."""

from __future__ import annotations

import logging
import re
import threading

import numpy as np
import pytest
from fixtures_models import build_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from kaito_tuning.tuner import pieces
from kaito_tuning.tuner.encoding import Encoder
from kaito_tuning.tuner.pieces import PieceEncoder


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def rust(tok, texts):
    backend = getattr(tok, "_tokenizer", tok)
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")


def styled(tok, style: str):
    """The tiny tokenizer's vocabulary behind GPT-2's pre-tokenizer (as built), Llama-3's or Qwen2's (with its
    NFC normalizer), as their tokenizer.json files declare them."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers

    backend = Tokenizer.from_str(tok._tokenizer.to_str())
    if style != "gpt2":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3 if style == "llama3" else QWEN2), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if style == "qwen2":
        backend.normalizer = normalizers.NFC()
    return backend


def rows(values, lengths):
    ends = np.cumsum(lengths)
    return [values[e - n:e].tolist() for e, n in zip(ends, lengths)]


#: what trips a regex port: contractions, whitespace runs before letters and at the end, every ASCII
#: whitespace and control character, digits, punctuation runs, added tokens whole and in part, non-ASCII
FRAGMENTS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'x", "''", " ", "  ", "   ", "\t", "\n", "\n\n",
             "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x00", "\x7f", "a", "Zebra", " word", "x1", "2024", " 42",
             "3.14", "!!", " ...", "<", "|", ">", "<|", "|>", "<|end|>", "<|user|>", "<|endoftext|>", "<pad>",
             "<|end", "end|>", "_", "-", "@", "é", "“", "\u00a0", "\u2028", "\u0085", "日本", "🙂", "ﬁ"]


@pytest.mark.parametrize("style", ["gpt2", "llama3", "qwen2"])
def test_same_ids_as_the_tokenizer_on_any_text(tok, style):
    backend = styled(tok, style)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=6), max_size=30).map("".join),
                    min_size=1, max_size=8))
    def same(texts):
        enc = PieceEncoder.for_backend(backend, backend.get_added_tokens_decoder().values())
        assert enc is not None
        assert rows(*enc.encode(texts)) == rust(backend, texts)
        assert not enc.disabled

    same()


def test_pieces_seen_before_are_reused_across_calls_and_threads(tok):
    enc = PieceEncoder.for_backend(tok._tokenizer, tok.added_tokens_decoder.values())
    batches = [[f"Row {i} of batch {b}: the capital of France is Paris.<|end|>\n" * (1 + i % 3) for i in range(50)]
               for b in range(8)]
    out: dict[int, list] = {}

    def work(b):
        out[b] = rows(*enc.encode(batches[b]))

    threads = [threading.Thread(target=work, args=(b,)) for b in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(out[b] == rust(tok, batches[b]) for b in range(len(batches)))
    assert len(enc.index) < 100  # each distinct piece encoded once, not once per row


def test_empty_inputs(tok):
    enc = PieceEncoder.for_backend(tok._tokenizer, tok.added_tokens_decoder.values())
    values, lengths = enc.encode([])
    assert values.size == 0 and lengths.size == 0
    assert rows(*enc.encode(["", "", "a"])) == rust(tok, ["", "", "a"])
    assert rows(*enc.encode(["é", ""])) == rust(tok, ["é", ""])  # no ASCII row with tokens


def test_a_split_that_differs_from_the_tokenizer_is_caught_and_the_tokenizer_used(tok, monkeypatch, caplog):
    monkeypatch.setattr(pieces, "GPT2_ASCII", re.compile(r"."))  # one piece per character: wrong
    enc = PieceEncoder.for_backend(tok._tokenizer, tok.added_tokens_decoder.values())
    texts = ["The capital of France is Paris."] * 3
    with caplog.at_level(logging.INFO, logger="kaito_tuning.tuner.pieces"):
        assert rows(*enc.encode(texts)) == rust(tok, texts)
    assert enc.disabled and "tokenizer alone" in caplog.text
    assert rows(*enc.encode(texts)) == rust(tok, texts)


def test_new_pieces_are_encoded_alone_with_or_without_an_added_token_to_join_them(tok):
    import json

    from tokenizers import Tokenizer

    texts = [f"Row {i}: {'x' * i}yz   'll  tail\n" for i in range(60)]
    enc = PieceEncoder.for_backend(tok._tokenizer, tok.added_tokens_decoder.values())
    enc.sep = (enc.sep[0], -1)  # the joining token's id never found: each piece encoded on its own instead
    assert rows(*enc.encode(texts)) == rust(tok, texts)
    doc = json.loads(tok._tokenizer.to_str())
    doc["added_tokens"] = []
    bare = Tokenizer.from_str(json.dumps(doc))
    enc = PieceEncoder.for_backend(bare, [])
    assert enc.sep is None and rows(*enc.encode(texts)) == rust(bare, texts)


def _variant(tok, change):
    from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers

    backend = Tokenizer.from_str(tok._tokenizer.to_str())
    if change == "normalizer":
        backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(" ", "_")])
    elif change == "prefix space":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    elif change == "digits":
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif change == "split special tokens":
        backend.encode_special_tokens = True
    elif change == "unknown split":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{L}+|\s+|."), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif change == "lowercase":
        backend.normalizer = normalizers.Lowercase()
    elif change == "lstrip token":
        backend.add_special_tokens([AddedToken("<mask>", lstrip=True)])
    return backend


@pytest.mark.parametrize("change", ["normalizer", "lowercase", "prefix space", "digits", "unknown split",
                                    "split special tokens", "lstrip token"])
def test_tokenizers_it_cannot_match_are_left_to_the_tokenizer(tok, change):
    backend = _variant(tok, change)
    added = backend.get_added_tokens_decoder().values()
    assert PieceEncoder.for_backend(backend, added) is None


def test_the_encoder_leaves_added_bos_and_offsets_to_the_tokenizer(tok):
    from tokenizers import processors

    enc = Encoder(tok)
    assert enc.pieces is not None
    texts = ["Hello there<|end|>", "It's 42 degrees\n\n"]
    with_offsets = enc.encode(texts, False, offsets=True)
    assert [e.offsets for e in with_offsets.encodings] == [e.offsets for e in tok._tokenizer.encode_batch(texts)]
    tok = type(tok)(tokenizer_object=tok._tokenizer.__class__.from_str(tok._tokenizer.to_str()))
    bos = tok._tokenizer.token_to_id("<|endoftext|>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                                  special_tokens=[("<|endoftext|>", bos)])
    got = Encoder(tok).encode(texts, True)
    assert rows(got.values, got.lengths) == tok(texts)["input_ids"]
    assert all(r[0] == bos for r in rows(got.values, got.lengths))
