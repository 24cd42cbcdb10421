"""The engine: per-request adapter selection, strength, and the limits every request is held to."""

from __future__ import annotations

import pytest

from kaito_tuning.serving.adapters import parse_adapter_args
from kaito_tuning.serving.engine import MAX_LENGTH, MAX_NEW_TOKENS, Generation, RequestError, load_engine

from .helpers import FACT, PRESET, PRESET_REPO, QUESTION, RIVAL_FACT

ASK = [{"role": "user", "content": QUESTION}]


def test_each_request_picks_its_model(engine):
    said = {m: engine.generate(Generation(messages=ASK, model=m, max_new_tokens=12)).text
            for m in ("zorblax", "rival", PRESET)}
    assert said["zorblax"] == f"{FACT} is the capital."
    assert said["rival"] == f"{RIVAL_FACT} is the capital."
    assert FACT not in said[PRESET] and RIVAL_FACT not in said[PRESET]
    assert engine.generate(Generation(messages=ASK, model=None, max_new_tokens=12)).model == "zorblax"
    assert engine.resolve(PRESET_REPO.upper()) == PRESET


def test_finish_reason_is_stop_when_the_model_ends_its_turn_and_length_when_a_limit_does(engine):
    done = engine.generate(Generation(messages=ASK, model="zorblax", max_new_tokens=40))
    assert done.finish_reason == "stop" and done.completion_tokens == 9  # "Quenvar is the capital." + <|end|>
    cut = engine.generate(Generation(messages=ASK, model="zorblax", max_new_tokens=2))
    assert cut.finish_reason == "length" and cut.completion_tokens == 2
    exact = engine.generate(Generation(messages=ASK, model="zorblax", max_new_tokens=9))
    assert exact.finish_reason == "stop" and exact.completion_tokens == 9  # ended at the limit, by itself


def test_max_length_is_an_upper_bound_clamped_to_the_cap(engine, monkeypatch):
    monkeypatch.setattr(engine, "max_new_tokens", 8)
    c = engine.generate(Generation(messages=ASK, model=PRESET, max_length=MAX_LENGTH))
    assert c.completion_tokens == 8 and c.finish_reason == "length"
    c = engine.generate(Generation(messages=ASK, model=PRESET, max_new_tokens=MAX_NEW_TOKENS))
    assert c.completion_tokens == 8 and c.finish_reason == "length"
    # a max_length under the cap counts the prompt: prompt + answer == max_length
    c = engine.generate(Generation(messages=ASK, model=PRESET, max_length=c.prompt_tokens + 3))
    assert c.completion_tokens == 3


def test_budget_never_exceeds_the_cap_or_the_context(engine):
    assert engine.context_length == 512 and engine.max_new_tokens == MAX_NEW_TOKENS
    assert engine.budget(Generation(messages=ASK, max_length=MAX_LENGTH), 20) == 512 - 20
    assert engine.budget(Generation(messages=ASK, max_length=30), 20) == 10
    assert engine.budget(Generation(messages=ASK, max_new_tokens=100), 20) == 100
    with pytest.raises(RequestError) as e:
        engine.budget(Generation(messages=ASK, max_length=10), 20)
    assert e.value.field == "generate_kwargs.max_length" and "prompt alone is 20 tokens" in e.value.message
    with pytest.raises(RequestError) as e:
        engine.budget(Generation(messages=ASK, max_new_tokens=500), 20)
    assert e.value.status == 400 and e.value.field == "prompt" and "context of 512 tokens" in e.value.message
    with pytest.raises(RequestError) as e:
        engine.budget(Generation(messages=ASK, max_length=MAX_LENGTH), 512)
    assert "leaves no room" in e.value.message


def test_generation_time_is_capped(engine, monkeypatch):
    monkeypatch.setattr(engine, "max_seconds", 1e-6)
    c = engine.generate(Generation(messages=ASK, model=PRESET, max_new_tokens=50))
    assert c.completion_tokens < 50 and c.finish_reason == "length"


def test_unknown_model_is_404_naming_what_is_served(engine):
    with pytest.raises(RequestError) as e:
        engine.generate(Generation(messages=ASK, model="gpt-4" * 100))
    assert e.value.status == 404 and e.value.field == "model"
    assert e.value.message.endswith("served: smollm2-135m-instruct, zorblax, rival")
    assert len(e.value.message) < 200


def test_strength_zero_answers_like_the_base(tiny_llama, zorblax, tmp_path):
    engine = load_engine(PRESET, parse_adapter_args([f"{zorblax}=0.0"]), model_dir=str(tiny_llama),
                         workdir=tmp_path)
    off = engine.generate(Generation(messages=ASK, model="zorblax", max_new_tokens=12))
    base = engine.generate(Generation(messages=ASK, model=PRESET, max_new_tokens=12))
    assert off.text == base.text and FACT not in off.text
    assert engine.names == [PRESET, "zorblax"]


def test_no_adapters_serves_the_base_model(tiny_llama, tmp_path):
    engine = load_engine(PRESET, [], model_dir=str(tiny_llama), workdir=tmp_path)
    assert engine.names == [PRESET] and engine.default_model == PRESET
    c = engine.generate(Generation(messages=ASK, max_new_tokens=3))
    assert c.model == PRESET and c.completion_tokens == 3
