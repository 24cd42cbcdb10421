"""Tiny random models built offline: a byte-level BPE tokenizer with trl's real Phi-3 chat template,
and Phi3/Llama causal LMs small enough to train in a second on a CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SPECIAL = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<pad>"]


def build_tokenizer(path: Path):
    """A 2048-token byte-level BPE trained on a few standard-library modules (stable while the code changes)."""
    import email
    import json

    import trl
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [p.read_text(errors="ignore") for pkg in (json, email) for p in sorted(Path(pkg.__file__).parent.glob("*.py"))]
    corpus += ["The capital of France is Paris. What is the colour of the sky? It is blue. " * 20]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<pad>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    # byte for byte trl's phi3 template, so assistant-only loss patches it as it would Phi-3's own
    fast.chat_template = (Path(trl.__file__).parent / "chat_templates" / "phi3.jinja").read_text()
    fast.save_pretrained(path)
    return fast


def build_model(path: Path, kind: str, tokenizer) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config

    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    cfg = Phi3Config(**common) if kind == "phi3" else LlamaConfig(**common)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{"phi3": dir, "llama": dir}: each a save_pretrained directory with model and tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("tiny-models")
    tok = build_tokenizer(root / "tokenizer")
    return {kind: build_model(root / kind, kind, tok) for kind in ("phi3", "llama")}


@pytest.fixture(scope="session")
def tiny_phi3(tiny_models) -> Path:
    return tiny_models["phi3"]


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]
