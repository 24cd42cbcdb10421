"""The HTTP app (FastAPI, served by uvicorn): ``/chat``, ``/v1/chat/completions``, ``/v1/models``, ``/health``.

``/chat`` takes Kaito's payload (``prompt``, ``generate_kwargs``) and answers ``{"Result": ...}``; it
knows no ``model``, so it answers with the first adapter, as Kaito's server answers with its merged
adapter (``"model"`` in the payload picks another). ``/v1/chat/completions`` is OpenAI's. The OpenAPI
document is at ``/openapi.json`` (and ``/docs``).

Errors are JSON in OpenAI's shape, ``{"error": {"message": "FIELD: what to do", "type", "param":
FIELD, "code": STATUS}}``, and never carry exception text or a traceback:

* 400 for every malformed request -- invalid JSON, JSON nested deeper than pydantic-core's limit
  (200 levels), a wrong type, a value out of range, a missing field. FastAPI would say 422; we map
  its validation errors to 400 (OpenAI's API does, and clients treat 400 as "fix the request"),
  naming the first field at fault (``messages[0].role``, ``generate_kwargs.max_length``).
* 404 an unknown route or model, 405 a wrong method, 413 a body over ``max_body_bytes`` (refused
  before it is read when Content-Length says so; a chunked body is counted as it comes), 408 a body
  that stalls for ``body_timeout`` seconds.
* 503 with ``Retry-After`` when ``max_queue`` requests are already generating or waiting to (the
  engine answers one at a time), rather than queueing without bound.
* 500 with a request id; the details are in the server log only.

Connections (uvicorn, see :func:`server_config`): one event loop, no thread per connection; a
connection that sends no complete request head within ``idle_timeout`` seconds -- an idle
keep-alive, a client that connects and says nothing, one that trickles its headers -- is closed;
at most ``max_connections`` at once (503 beyond); a request head over 16 KiB, or malformed, is
refused with 400 (h11).
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
from typing import Any

import h11
import pydantic_core
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from kaito_tuning import __version__
from kaito_tuning.serving.engine import Completion, Engine, Generation, RequestError
from kaito_tuning.serving.schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    ChatRequest,
    ChatResponse,
    Choice,
    Health,
    ModelCard,
    ModelList,
    show,
    usage,
)

log = logging.getLogger(__name__)

#: requests larger than this are refused (413), before they are read when Content-Length says so
MAX_BODY_BYTES = 4 << 20
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
        msg += f", got {show(got)}"
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
                raise Busy(503, f"the server is busy ({self.active} requests generating or waiting); try again "
                                f"in {RETRY_AFTER_S} s", code="server_busy")
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
        return ChatResponse(Result=c.text, model=c.model, usage=usage(c))

    @app.post("/v1/chat/completions", response_model=ChatCompletion, summary="OpenAI's chat completions")
    async def chat_completions(body: ChatCompletionRequest):
        c = await generate(body.generation())
        return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=c.model,
                              choices=[Choice(index=0, message=AssistantMessage(content=c.text),
                                              finish_reason=c.finish_reason)],
                              usage=usage(c))

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
