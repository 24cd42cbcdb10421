"""The HTTP API's request and response models (pydantic), as ``/openapi.json`` documents them.

Every field is checked with a message in our words (``must be an integer from 1 to 2048, got "10"``):
strings, booleans and NaN are refused where a number is expected, not coerced. A validator raises
:func:`invalid`, whose message the app reports as is (and whose ``field``, when given, names the
field at fault instead of the location pydantic reports).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from kaito_tuning.serving.engine import DEFAULT_MAX_NEW_TOKENS, MAX_LENGTH, MAX_NEW_TOKENS, Completion, Generation

#: a prompt (or all messages together) may have at most this many characters (400)
MAX_PROMPT_CHARS = 32 << 10
#: Kaito's generate_kwargs that we honour in /chat
GENERATE_KWARGS = ("max_new_tokens", "max_length", "temperature", "top_p", "top_k", "do_sample",
                   "repetition_penalty")


def invalid(message: str, field: str | None = None) -> PydanticCustomError:
    """A validation error whose text is ours (``field`` overrides the location pydantic reports)."""
    ctx: dict[str, Any] = {"message": message}
    if field:
        ctx["field"] = field
    return PydanticCustomError("invalid", "{message}", ctx)


def show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _number(kind: type, lo: float, hi: float, *, positive: bool = False):
    """An int or float field from ``lo`` to ``hi``; strings, booleans and NaN are refused, not coerced."""
    integer = kind is int
    what = "an integer" if integer else "a number"

    def check(value):
        if value is None:
            return value
        ok = (not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
              and lo <= value <= hi and not (positive and value == 0))
        if not ok:
            bound = f"greater than {_num(lo)} and at most {_num(hi)}" if positive else f"from {_num(lo)} to {_num(hi)}"
            raise invalid(f"must be {what} {bound}, got {show(value)}")
        return value

    limits = {"gt": lo} if positive else {"ge": lo}
    return Annotated[kind, Field(le=hi, **limits), BeforeValidator(check)]


def _string(what: str):
    def check(value):
        if not isinstance(value, str):
            raise invalid(f"must be a string: {what}, got {show(value)}")
        return value
    return Annotated[str, BeforeValidator(check)]


Tokens = _number(int, 1, MAX_NEW_TOKENS)
MaxLength = _number(int, 1, MAX_LENGTH)
Temperature = _number(float, 0, 2)
TopP = _number(float, 0, 1, positive=True)
TopK = _number(int, 1, 1_000_000)
Penalty = _number(float, 0.01, 10)
ModelName = _string("a name from GET /v1/models")


def _strict_bool(value):
    if not isinstance(value, bool):
        raise invalid(f"must be true or false, got {show(value)}")
    return value


class _Sampling(BaseModel):
    """What both chat routes accept besides the conversation (unknown fields are ignored, as OpenAI clients
    send many)."""

    model_config = ConfigDict(extra="ignore")

    model: ModelName | None = Field(None, description="a model from GET /v1/models; default: the first adapter")
    max_tokens: Tokens | None = Field(None, description=f"new tokens at most (1..{MAX_NEW_TOKENS}, "
                                                        f"default {DEFAULT_MAX_NEW_TOKENS})")
    max_new_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None
    temperature: Temperature | None = Field(None, description="0 (default): greedy, the same answer every time")
    top_p: TopP | None = None
    top_k: TopK | None = None
    repetition_penalty: Penalty | None = None

    def _generation(self, messages: list[dict]) -> Generation:
        gen = Generation(messages=messages, model=self.model)
        self._apply(gen, self)
        return gen

    @staticmethod
    def _apply(gen: Generation, src) -> None:
        for key in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
            if getattr(src, key, None) is not None:
                gen.max_new_tokens = getattr(src, key)
        for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
            if getattr(src, key, None) is not None:
                setattr(gen, key, getattr(src, key))


class GenerateKwargs(BaseModel):
    """Kaito's ``generate_kwargs`` (the ones we honour; any other is refused by name)."""

    max_new_tokens: Tokens | None = None
    max_length: MaxLength | None = Field(None, description="prompt + answer in tokens; clamped to "
                                                           f"{MAX_NEW_TOKENS} new tokens and the model's context")
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    do_sample: Annotated[bool, BeforeValidator(_strict_bool)] | None = None
    repetition_penalty: Penalty | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, value):
        if not isinstance(value, dict):
            raise invalid("must be an object")
        unknown = sorted(str(k)[:40] for k in set(value) - set(GENERATE_KWARGS))
        if unknown:
            raise invalid(f"{', '.join(unknown[:5])} not supported; use {', '.join(GENERATE_KWARGS)}")
        return value


def _prompt(value):
    if not isinstance(value, str) or not value.strip():
        raise invalid(f"must be a non-empty string, got {show(value)}")
    if len(value) > MAX_PROMPT_CHARS:
        raise invalid(f"is {len(value)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    return value


class ChatRequest(_Sampling):
    """Kaito's ``/chat``: ``{"prompt": "...", "max_new_tokens": 64, "generate_kwargs": {...}}``."""

    prompt: Annotated[str, BeforeValidator(_prompt)] = Field(..., description="what to ask")
    generate_kwargs: GenerateKwargs | None = None

    def generation(self) -> Generation:
        gen = self._generation([{"role": "user", "content": self.prompt}])
        kw = self.generate_kwargs
        if kw is not None:
            self._apply(gen, kw)
            gen.max_length = kw.max_length
            if kw.do_sample is False:
                gen.temperature = 0.0
            elif kw.do_sample is True and gen.temperature == 0:
                gen.temperature = 1.0
        return gen


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


def _content(value):
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise invalid(f"must be a string (or a list of text parts), got {show(value)}")


def _role(value):
    if value not in ("system", "user", "assistant"):
        raise invalid(f"must be system, user or assistant, got {show(value)}")
    return value


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Annotated[Literal["system", "user", "assistant"], BeforeValidator(_role)]
    content: Annotated[str | list[TextPart], BeforeValidator(_content)]

    @model_validator(mode="before")
    @classmethod
    def _object(cls, value):
        if not isinstance(value, dict):
            raise invalid("must be an object with role and content")
        return value


def _messages(value):
    if not isinstance(value, list) or not value:
        raise invalid("must be a non-empty list of {role, content} objects")
    return value


class ChatCompletionRequest(_Sampling):
    """OpenAI's chat completions request: messages, model, max_tokens, temperature, top_p."""

    messages: Annotated[list[Message], BeforeValidator(_messages)] = Field(..., description="the conversation")
    stream: Any = Field(None, description="not supported: false or absent")
    n: Any = Field(None, description="not supported beyond 1")

    @model_validator(mode="after")
    def _whole(self):
        total = sum(len(m.content) for m in self.messages)
        if total > MAX_PROMPT_CHARS:
            raise invalid(f"is {total} characters; at most {MAX_PROMPT_CHARS} are accepted", "messages")
        if self.messages[-1].role == "assistant":
            raise invalid("the last message must be from the user (or system), not the assistant",
                           f"messages[{len(self.messages) - 1}].role")
        if self.stream not in (None, False):
            raise invalid("streaming is not supported; send stream: false", "stream")
        if self.n not in (None, 1):
            raise invalid("only n=1 is supported", "n")
        return self

    def generation(self) -> Generation:
        return self._generation([{"role": m.role, "content": m.content} for m in self.messages])


# ---- responses (documented in /openapi.json; the shapes Kaito's and OpenAI's clients read)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponse(BaseModel):
    Result: str
    model: str
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "kaito-tuning"
    root: str
    parent: str | None
    strength: float | None = None
    source: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    models: list[str]


def usage(c: Completion) -> Usage:
    return Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                 total_tokens=c.prompt_tokens + c.completion_tokens)
