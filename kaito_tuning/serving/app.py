"""The HTTP app (FastAPI, served by uvicorn): ``/chat``, ``/v1/chat/completions``, ``/v1/models``, ``/health``.

``/chat`` takes Kaito's payload (``prompt``, ``generate_kwargs``) and answers ``{"Result": ...}``; it
knows no ``model``, so it answers with the first adapter, as Kaito's server answers with its merged
adapter (``"model"`` in the payload picks another). ``/v1/chat/completions`` is OpenAI's. The OpenAPI
document is at ``/openapi.json`` (and ``/docs``).

Errors are JSON in OpenAI's shape, ``{"error": {"message": "FIELD: what to do", "type", "param":
FIELD, "code": STATUS}}``, and never carry exception text or a traceback:

* 400 for every malformed request -- invalid JSON, JSON nested deeper than pydantic-core's limit
  (200 levels), a wrong type, a value out of range, a missing field. FastAPI would say 422; we map
  its validation errors to 400, as OpenAI's API and Kaito's runtime do, naming the first field at
  fault (``messages[0].role``, ``generate_kwargs.max_length``).
* 404 an unknown route or model, 405 a wrong method, 413 a body over ``max_body_bytes`` (refused
  before it is read when Content-Length says so; a chunked body is counted as it comes), 408 a body
  that stalls for ``body_timeout`` seconds.
* 503 with ``Retry-After`` when ``max_queue`` requests are already generating or waiting to (the
  engine answers one at a time), rather than queueing without bound.
* 500 with a request id; the details are in the server log only.

Connections (uvicorn, see :func:`server_config`): one event loop, no thread per connection; a
connection that sends no complete request head within ``idle_timeout`` seconds -- an idle
keep-alive, a client that connects and says nothing, one that trickles its headers -- is closed;
at most ``max_connections`` at once (503 beyond); headers over 16 KiB or malformed are refused with
400 by h11.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import h11
import pydantic_core
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from kaito_tuning import __version__
from kaito_tuning.serving.engine import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_LENGTH,
    MAX_NEW_TOKENS,
    Completion,
    Engine,
    Generation,
    RequestError,
)

log = logging.getLogger(__name__)

#: requests larger than this are refused (413), before they are read when Content-Length says so
MAX_BODY_BYTES = 4 << 20
#: a prompt (or all messages together) may have at most this many characters (400)
MAX_PROMPT_CHARS = 32 << 10
#: requests generating or waiting to; one more gets 503
MAX_QUEUE = 8
#: the Retry-After of a 503 (seconds)
RETRY_AFTER_S = 5
#: seconds a body may stall (408), and a connection may go without a complete request head (closed)
BODY_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 15
#: open connections at most (uvicorn answers 503 beyond)
MAX_CONNECTIONS = 256
#: a request head (request line + headers) larger than this is refused (400)
MAX_HEAD_BYTES = 16 << 10
_HEAD_SLICE = 1 << 10  # h11 checks the bound after each slice: a head is refused within 1 KiB of it

ROUTES_HINT = "use POST /chat, POST /v1/chat/completions, GET /v1/models or GET /health"
_EXAMPLES = {"/chat": '{"prompt": "..."}', "/v1/chat/completions": '{"model": "...", "messages": [...]}'}
_HINTS = {"prompt": ': send {"prompt": "your question"}',
          "messages": ': a list like [{"role": "user", "content": "..."}]'}
#: Kaito's generate_kwargs that we honour in /chat
GENERATE_KWARGS = ("max_new_tokens", "max_length", "temperature", "top_p", "top_k", "do_sample",
                   "repetition_penalty")


# ---------------------------------------------------------------------------------------------
# request models: each field checked with a message that names what to send


def _invalid(message: str, field: str | None = None) -> PydanticCustomError:
    """A validation error whose text is ours (``field`` overrides the location pydantic reports)."""
    ctx: dict[str, Any] = {"message": message}
    if field:
        ctx["field"] = field
    return PydanticCustomError("invalid", "{message}", ctx)


def _show(value: Any) -> str:
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
            raise _invalid(f"must be {what} {bound}, got {_show(value)}")
        return value

    limits = {"gt": lo} if positive else {"ge": lo}
    return Annotated[kind, Field(le=hi, **limits), BeforeValidator(check)]


def _string(what: str):
    def check(value):
        if not isinstance(value, str):
            raise _invalid(f"must be a string: {what}, got {_show(value)}")
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
        raise _invalid(f"must be true or false, got {_show(value)}")
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
            raise _invalid("must be an object")
        unknown = sorted(str(k)[:40] for k in set(value) - set(GENERATE_KWARGS))
        if unknown:
            raise _invalid(f"{', '.join(unknown[:5])} not supported; use {', '.join(GENERATE_KWARGS)}")
        return value


def _prompt(value):
    if not isinstance(value, str) or not value.strip():
        raise _invalid(f"must be a non-empty string, got {_show(value)}")
    if len(value) > MAX_PROMPT_CHARS:
        raise _invalid(f"is {len(value)} characters; at most {MAX_PROMPT_CHARS} are accepted")
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
    raise _invalid(f"must be a string (or a list of text parts), got {_show(value)}")


def _role(value):
    if value not in ("system", "user", "assistant"):
        raise _invalid(f"must be system, user or assistant, got {_show(value)}")
    return value


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Annotated[Literal["system", "user", "assistant"], BeforeValidator(_role)]
    content: Annotated[str | list[TextPart], BeforeValidator(_content)]

    @model_validator(mode="before")
    @classmethod
    def _object(cls, value):
        if not isinstance(value, dict):
            raise _invalid("must be an object with role and content")
        return value


def _messages(value):
    if not isinstance(value, list) or not value:
        raise _invalid("must be a non-empty list of {role, content} objects")
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
            raise _invalid(f"is {total} characters; at most {MAX_PROMPT_CHARS} are accepted", "messages")
        if self.messages[-1].role == "assistant":
            raise _invalid("the last message must be from the user (or system), not the assistant",
                           f"messages[{len(self.messages) - 1}].role")
        if self.stream not in (None, False):
            raise _invalid("streaming is not supported; send stream: false", "stream")
        if self.n not in (None, 1):
            raise _invalid("only n=1 is supported", "n")
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


def _usage(c: Completion) -> Usage:
    return Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                 total_tokens=c.prompt_tokens + c.completion_tokens)


# ---------------------------------------------------------------------------------------------
# errors


def _error(status: int, message: str, *, field: str | None = None, code: str = "invalid_request_error",
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse(RequestError(status, message, field=field, code=code).to_dict(), status_code=status,
                        headers=headers)


def _path(loc: tuple) -> str:
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return (text or "body")[:100]


def describe(err: dict, route: str) -> tuple[str, str]:
    """A pydantic/FastAPI validation error as (field, message), in our words."""
    ctx = err.get("ctx") or {}
    field = ctx.get("field") or _path(tuple(err.get("loc") or ()))
    kind = err.get("type")
    if kind == "invalid":
        return field, str(ctx.get("message"))
    if kind == "json_invalid":
        reason = str(ctx.get("error", ""))[:200]
        if "recursion limit" in reason:
            return "body", f"is nested too deeply ({reason})"
        return "body", f"is not valid JSON ({reason})"
    if kind == "missing":
        if field == "body":
            return field, f"is required: send a JSON object like {_EXAMPLES.get(route, '{...}')}"
        return field, "is required" + _HINTS.get(field, "")
    if field == "body" and kind in ("model_type", "model_attributes_type", "dict_type"):
        return field, (f"must be a JSON object like {_EXAMPLES.get(route, '{...}')} "
                       "(with Content-Type: application/json)")
    msg = str(err.get("msg", "is invalid")).replace("Input should be", "must be")
    got = err.get("input")
    if isinstance(got, (str, int, float, bool)):
        msg += f", got {_show(got)}"
    return field, msg


class Busy(RequestError):
    pass


# ---------------------------------------------------------------------------------------------
# the app


class _Gate:
    """At most ``size`` requests admitted (one generating, the rest waiting for the engine); beyond, 503."""

    def __init__(self, size: int):
        self.size = size
        self.active = 0
        self._lock = threading.Lock()

    @contextmanager
    def admit(self):
        with self._lock:
            if self.active >= self.size:
                raise Busy(503, f"{self.active} requests are being answered or waiting; try again in "
                                f"{RETRY_AFTER_S} s", code="server_busy")
            self.active += 1
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1


class _JSONRequest(Request):
    """The body parsed by pydantic-core: fast, NaN refused, nesting bounded (200 levels), never RecursionError."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body, allow_inf_nan=False)
            except ValueError as e:  # FastAPI turns this into a validation error (json_invalid)
                raise json.JSONDecodeError(" ".join(str(e).split())[:200], "", 0) from None
        return self._json


class _Route(APIRoute):
    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            return await handler(_JSONRequest(request.scope, request.receive))

        return route


class Limits:
    """Request bodies: at most ``max_bytes`` (413, before reading when Content-Length says so) and no stall
    longer than ``timeout`` seconds between chunks (408). Either answers itself, closes the connection and
    tells the app the client is gone."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES, timeout: float = BODY_TIMEOUT_S):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send, 413, f"is {int(length)} bytes; at most {self.max_bytes} are accepted")
        state = {"received": 0, "done": False, "answered": False, "started": False}

        async def limited_receive():
            if state["answered"]:
                return {"type": "http.disconnect"}
            if state["done"]:  # the body is read: wait for a disconnect as long as the app likes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                if not state["started"]:
                    await self._refuse(send, 408, f"stalled for {self.timeout:g} s; send the whole body at once")
                state["answered"] = True
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                state["done"] = not message.get("more_body", False)
                if state["received"] > self.max_bytes:
                    if not state["started"]:
                        await self._refuse(send, 413, f"is over {self.max_bytes} bytes; at most {self.max_bytes} "
                                                      "are accepted")
                    state["answered"] = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if state["answered"]:
                return  # we have answered; what the app says after "the client is gone" goes nowhere
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)

    @staticmethod
    async def _refuse(send, status: int, message: str) -> None:
        body = json.dumps(RequestError(status, message, field="body").to_dict()).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def create_app(engine: Engine, *, max_queue: int = MAX_QUEUE, max_body_bytes: int = MAX_BODY_BYTES,
               body_timeout: float = BODY_TIMEOUT_S) -> FastAPI:
    """The app for ``engine``. Serve it with ``uvicorn.Server(server_config(app, ...))``."""
    app = FastAPI(title="kaito-tuning inference", version=__version__, strict_content_type=False,
                  description="A preset model and its LoRA adapters, each served as a model of its own.")
    app.router.route_class = _Route
    app.add_middleware(Limits, max_bytes=max_body_bytes, timeout=body_timeout)
    gate = _Gate(max_queue)
    app.state.engine, app.state.gate = engine, gate

    async def generate(gen: Generation) -> Completion:
        engine.resolve(gen.model)  # an unknown model is a 404 at once, not after waiting in the queue
        with gate.admit():
            try:
                return await run_in_threadpool(engine.generate, gen)
            except RequestError:
                raise
            except Exception as e:  # a bug, or out of memory: the details go to the log, not to the client
                rid = uuid.uuid4().hex[:12]
                log.error("generation failed (request id %s)", rid, exc_info=e)
                raise RequestError(500, f"generation failed (request id {rid}; the details are in the server's "
                                        "log)", code="server_error") from None

    @app.post("/chat", response_model=ChatResponse, summary="Kaito's chat: a prompt, one answer")
    async def chat(body: ChatRequest):
        c = await generate(body.generation())
        return ChatResponse(Result=c.text, model=c.model, usage=_usage(c))

    @app.post("/v1/chat/completions", response_model=ChatCompletion, summary="OpenAI's chat completions")
    async def chat_completions(body: ChatCompletionRequest):
        c = await generate(body.generation())
        return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=c.model,
                              choices=[Choice(index=0, message=AssistantMessage(content=c.text),
                                              finish_reason=c.finish_reason)],
                              usage=_usage(c))

    @app.get("/v1/models", response_model=ModelList, response_model_exclude_unset=True,
             summary="the base model and each adapter")
    async def models():
        card = {"object": "model", "owned_by": "kaito-tuning", "root": engine.base_name}  # set: kept by exclude_unset
        data = [ModelCard(id=engine.base_name, parent=None, **card)]
        data += [ModelCard(id=a.name, parent=engine.base_name, strength=a.strength, source=a.image or a.name, **card)
                 for a in engine.adapters]
        return ModelList(object="list", data=data)

    @app.get("/health", response_model=Health, summary="ready: the model is loaded")
    async def health():
        return Health(models=engine.names)

    app.add_api_route("/healthz", health, methods=["GET"], include_in_schema=False)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        field, message = describe(errors[0] if errors else {}, request.url.path)
        return _error(400, message, field=field)

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(exc, Busy) else None
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        path = request.url.path[:100]
        if exc.status_code == 404:
            return _error(404, f"no route {path}; {ROUTES_HINT}", code="not_found")
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            return _error(405, f"use {allowed or 'another method'} for {path}", code="method_not_allowed",
                          headers={"Allow": allowed} if allowed else None)
        return _error(exc.status_code, str(exc.detail)[:200], code="invalid_request_error")

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        rid = uuid.uuid4().hex[:12]
        log.error("request %s %s failed (id %s)", request.method, request.url.path, rid, exc_info=exc)
        return _error(500, f"the server failed to answer (request id {rid}; the details are in its log)",
                      code="server_error")

    return app


# ---------------------------------------------------------------------------------------------
# uvicorn


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol, with one more timeout.

    uvicorn arms its keep-alive timer only after a response; a client that connects and says nothing,
    or trickles its headers, would hold the connection forever. Here a connection must deliver a
    complete request head within ``timeout_keep_alive`` seconds of opening or of its last response,
    or it is closed. And a head over ``h11_max_incomplete_event_size`` is refused however fast it comes.
    """

    _head_timer: asyncio.TimerHandle | None = None

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.timeout_keep_alive, self._head_timeout)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        # h11 bounds a head only while it is incomplete (h11_max_incomplete_event_size); a large head that
        # arrives in one read would pass. Fed in slices, every head is held to the bound (400 beyond it).
        while len(data) > _HEAD_SLICE and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            super().data_received(data[:_HEAD_SLICE])
            data = data[_HEAD_SLICE:]
        if data and not self.transport.is_closing():
            super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a request head arrived
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:  # waiting for the next request
            self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)


def server_config(app, *, idle_timeout: float = IDLE_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS,
                  graceful_timeout: int = 30) -> uvicorn.Config:
    """How uvicorn serves ``app``: h11 on asyncio, the timeouts and limits above, our logging."""
    return uvicorn.Config(app, http=_Protocol, ws="none", lifespan="off", loop="asyncio",
                          timeout_keep_alive=idle_timeout, limit_concurrency=max_connections,
                          h11_max_incomplete_event_size=MAX_HEAD_BYTES, timeout_graceful_shutdown=graceful_timeout,
                          log_config=None, server_header=False, proxy_headers=False)
