"""The HTTP app: every route through FastAPI's TestClient, and what only a socket shows (body and
connection limits, malformed heads) through uvicorn in a thread, configured as ``serve`` configures it.

The engine is the tiny Llama with two adapters taught different answers (``conftest.py``).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient

from kaito_tuning.serving.app import RETRY_AFTER_S, create_app, server_config
from kaito_tuning.serving.engine import MAX_NEW_TOKENS
from kaito_tuning.serving.schema import MAX_PROMPT_CHARS

from .helpers import FACT, PRESET, PRESET_REPO, QUESTION, RIVAL_FACT, error_of


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(create_app(engine))


def ask(client, path, body=None, **kw):
    resp = client.post(path, json=body, **kw) if body is not None else client.post(path, **kw)
    return resp.status_code, resp.json()


# ---------------------------------------------------------------------------------------------
# every route answers, and each adapter answers with what it was taught


def test_health_and_models(client):
    assert client.get("/health").json() == {"status": "ok", "models": [PRESET, "zorblax", "rival"]}
    assert client.get("/healthz").status_code == 200
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [PRESET, "zorblax", "rival"]
    base, zorblax, _ = models["data"]
    assert base == {"id": PRESET, "object": "model", "owned_by": "kaito-tuning", "root": PRESET, "parent": None}
    assert zorblax["parent"] == PRESET and zorblax["strength"] == 1.0 and zorblax["source"] == "zorblax"


def test_chat_answers_with_the_first_adapter_by_default(client):
    status, out = ask(client, "/chat", {"prompt": QUESTION, "max_new_tokens": 12})
    assert status == 200, out
    assert set(out) == {"Result", "model", "usage"}
    assert out["model"] == "zorblax" and out["Result"] == f"{FACT} is the capital."
    usage = out["usage"]
    assert 0 < usage["completion_tokens"] < 12 and usage["total_tokens"] == usage["prompt_tokens"] + 9


def test_chat_base_model_does_not_know_the_fact(client):
    status, out = ask(client, "/chat", {"prompt": QUESTION, "model": PRESET, "generate_kwargs": {"max_new_tokens": 12}})
    assert status == 200, out
    assert out["model"] == PRESET and FACT not in out["Result"]
    assert out["usage"]["completion_tokens"] == 12  # generate_kwargs.max_new_tokens honoured: it never stops


def test_openai_chat_completions_finish_reasons(client):
    """The adapter ends its turn ("stop", before the limit); cut short it is "length", at exactly the limit."""
    messages = [{"role": "user", "content": QUESTION}]
    status, done = ask(client, "/v1/chat/completions", {"model": "zorblax", "messages": messages, "max_tokens": 12})
    assert status == 200, done
    assert done["object"] == "chat.completion" and done["model"] == "zorblax" and done["id"].startswith("chatcmpl-")
    choice = done["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": f"{FACT} is the capital."}
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    assert done["usage"]["completion_tokens"] < 12
    _, cut = ask(client, "/v1/chat/completions", {"model": "zorblax", "messages": messages, "max_tokens": 2})
    assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 2
    assert FACT.startswith(cut["choices"][0]["message"]["content"])
    # the preset's repo id names the base model too, as OpenAI clients configured for the hub would send it
    status, base = ask(client, "/v1/chat/completions", {"model": PRESET_REPO, "messages": messages, "max_tokens": 12})
    assert status == 200 and base["model"] == PRESET
    assert base["choices"][0]["finish_reason"] == "length" and base["usage"]["completion_tokens"] == 12
    assert FACT not in base["choices"][0]["message"]["content"]


def test_each_request_picks_its_adapter(client):
    """Two adapters taught different answers: each request gets the one it names, in any order."""
    answers = {}
    for model in ("rival", "zorblax", PRESET, "rival", "zorblax"):
        status, out = ask(client, "/chat", {"prompt": QUESTION, "model": model, "max_new_tokens": 12})
        assert status == 200, out
        answers.setdefault(model, set()).add(out["Result"])
    assert all(len(v) == 1 for v in answers.values())  # greedy and switching back: the same answer each time
    (rival,), (zorblax,), (base,) = answers["rival"], answers["zorblax"], answers[PRESET]
    assert RIVAL_FACT in rival and FACT not in rival
    assert FACT in zorblax and RIVAL_FACT not in zorblax
    assert FACT not in base and RIVAL_FACT not in base


def test_sampling_parameters_and_text_parts_are_accepted(client):
    status, out = ask(client, "/v1/chat/completions", {
        "model": "zorblax", "max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "user": "ignored",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert status == 200, out
    assert out["usage"]["completion_tokens"] <= 5


def test_max_length_is_clamped_to_the_token_cap(client, engine, monkeypatch):
    """generate_kwargs.max_length up to 2^20 is accepted and generates no more than the cap."""
    monkeypatch.setattr(engine, "max_new_tokens", 4)
    status, out = ask(client, "/chat", {"prompt": QUESTION, "model": PRESET, "generate_kwargs": {"max_length": 1 << 20}})
    assert status == 200, out
    assert out["usage"]["completion_tokens"] == 4
    status, out = ask(client, "/v1/chat/completions", {"model": PRESET, "max_tokens": MAX_NEW_TOKENS,
                                                       "messages": [{"role": "user", "content": QUESTION}]})
    assert status == 200 and out["usage"]["completion_tokens"] == 4
    assert out["choices"][0]["finish_reason"] == "length"


def test_openapi_document(client):
    doc = client.get("/openapi.json").json()
    assert {"/chat", "/v1/chat/completions", "/v1/models", "/health"} <= set(doc["paths"])
    assert "/healthz" not in doc["paths"]
    schemas = doc["components"]["schemas"]
    assert "prompt" in schemas["ChatRequest"]["required"]
    assert "messages" in schemas["ChatCompletionRequest"]["required"]
    tokens = schemas["ChatRequest"]["properties"]["max_tokens"]["anyOf"][0]
    assert tokens == {"type": "integer", "minimum": 1, "maximum": MAX_NEW_TOKENS}
    finish = schemas["Choice"]["properties"]["finish_reason"]
    assert finish["enum"] == ["stop", "length"]


# ---------------------------------------------------------------------------------------------
# bad requests: 400 with a JSON error naming the field, never an exception's text


@pytest.mark.parametrize("path, body, status, field, words", [
    ("/chat", {}, 400, "prompt", "required"),
    ("/chat", {"prompt": ""}, 400, "prompt", "non-empty"),
    ("/chat", {"prompt": None}, 400, "prompt", "non-empty"),
    ("/chat", {"prompt": "x" * 1_000_000}, 400, "prompt", f"at most {MAX_PROMPT_CHARS}"),
    ("/chat", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", "from 1 to"),
    ("/chat", {"prompt": "hi", "max_tokens": MAX_NEW_TOKENS + 1}, 400, "max_tokens", f"from 1 to {MAX_NEW_TOKENS}"),
    ("/chat", {"prompt": "hi", "max_tokens": True}, 400, "max_tokens", "integer"),
    ("/chat", {"prompt": "hi", "max_tokens": "10"}, 400, "max_tokens", "integer"),
    ("/chat", {"prompt": "hi", "max_tokens": 10.5}, 400, "max_tokens", "integer"),
    ("/chat", {"prompt": "hi", "max_new_tokens": "ten"}, 400, "max_new_tokens", "integer"),
    ("/chat", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "number"),
    ("/chat", {"prompt": "hi", "top_p": 0}, 400, "top_p", "greater than 0"),
    ("/chat", {"prompt": "hi", "model": 3}, 400, "model", "GET /v1/models"),
    ("/chat", {"prompt": "hi", "generate_kwargs": {"num_beams": 4}}, 400, "generate_kwargs", "num_beams"),
    ("/chat", {"prompt": "hi", "generate_kwargs": [1]}, 400, "generate_kwargs", "object"),
    ("/chat", {"prompt": "hi", "generate_kwargs": {"max_length": 0}}, 400, "generate_kwargs.max_length", "from 1"),
    ("/chat", {"prompt": "hi", "generate_kwargs": {"max_length": (1 << 20) + 1}}, 400,
     "generate_kwargs.max_length", "to 1048576"),
    ("/chat", {"prompt": "hi", "generate_kwargs": {"do_sample": "yes"}}, 400, "generate_kwargs.do_sample", "true"),
    ("/chat", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "served: smollm2-135m-instruct, zorblax, rival"),
    ("/chat", ["hi"], 400, "body", "JSON object"),
    ("/chat", "hi", 400, "body", "JSON object"),
    ("/v1/chat/completions", {"model": "zorblax"}, 400, "messages", "required"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "non-empty list"),
    ("/v1/chat/completions", {"messages": ["hi"]}, 400, "messages[0]", "object with role and content"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "user"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content", "string"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content", "required"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]},
     400, "messages[1].role", "last message"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 20_000}] * 2}, 400, "messages",
     f"at most {MAX_PROMPT_CHARS}"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model",
     "not served"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}, 400, "stream",
     "not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n", "n=1"),
])
def test_bad_request_names_the_field(client, path, body, status, field, words):
    got, out = ask(client, path, body)
    assert got == status, out
    param, message = error_of(out)
    assert param == field, out
    assert message.startswith(f"{field}: ") and words in message, message
    assert out["error"]["code"] == status
    assert "Traceback" not in message and "pydantic" not in message.lower()


@pytest.mark.parametrize("raw, words", [
    (b'{"prompt": "hi"', "not valid JSON"),
    (b'{"prompt": "hi", "temperature": NaN}', "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b'{"prompt": "hi", "generate_kwargs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b"", "is required"),
])
def test_unreadable_body(client, raw, words):
    status, out = ask(client, "/chat", content=raw, headers={"Content-Type": "application/json"})
    assert status == 400, out
    param, message = error_of(out)
    assert param == "body" and words in message, message
    assert len(message) < 300


def test_body_without_content_type_is_read_as_json(client):
    status, out = ask(client, "/chat", content=json.dumps({"prompt": QUESTION, "max_new_tokens": 12}).encode())
    assert status == 200 and out["Result"] == f"{FACT} is the capital."


def test_prompt_longer_than_the_context(client):
    # under the character limit, over the tiny model's 512-token context
    status, out = ask(client, "/chat", {"prompt": "capital " * 3000})
    param, message = error_of(out)
    assert status == 400 and param == "prompt" and "context of 512 tokens" in message


def test_unknown_route_and_method(client):
    status, out = ask(client, "/v2/generate", {"prompt": "hi"})
    assert status == 404 and "/v1/chat/completions" in error_of(out)[1]
    resp = client.get("/chat")
    assert resp.status_code == 405 and resp.headers["allow"] == "POST"
    assert error_of(resp.json())[1] == "use POST for /chat"


def test_body_over_the_limit(engine):
    small = TestClient(create_app(engine, max_body_bytes=1000))
    status, out = ask(small, "/chat", {"prompt": "x" * 2000})
    assert status == 413 and error_of(out) == ("body", "body: is 2013 bytes; at most 1000 are accepted")
    # chunked (no Content-Length): counted as it comes
    resp = small.post("/chat", content=iter([b'{"prompt": "', b"x" * 600, b"x" * 600, b'"}']),
                      headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and "at most 1000" in error_of(resp.json())[1]
    assert resp.headers["connection"] == "close"


@pytest.mark.parametrize("broken", ["generate", "resolve"])
def test_a_failure_inside_is_a_500_without_details(engine, monkeypatch, broken):
    def boom(*_a, **_k):
        raise RuntimeError("CUDA error at /opt/secret/path token=hunter2")

    monkeypatch.setattr(engine, broken, boom)
    client = TestClient(create_app(engine), raise_server_exceptions=False)
    status, out = ask(client, "/chat", {"prompt": "hi"})
    assert status == 500
    text = json.dumps(out)
    assert "hunter2" not in text and "RuntimeError" not in text and "secret" not in text
    assert "request id" in error_of(out)[1] and out["error"]["type"] == "server_error"


def test_a_full_queue_answers_503_with_retry_after(engine):
    """One request holds the engine, the queue (1) is full: the next is refused at once, not queued."""
    app = create_app(engine, max_queue=1)
    client = TestClient(app)
    first: dict = {}
    with engine._lock:  # the engine is busy
        t = threading.Thread(target=lambda: first.update(r=client.post("/chat", json={"prompt": QUESTION,
                                                                                      "max_new_tokens": 12})))
        t.start()
        deadline = time.monotonic() + 30
        while app.state.gate.active < 1:
            assert time.monotonic() < deadline, "the first request was never admitted"
            time.sleep(0.01)
        busy = client.post("/chat", json={"prompt": "hi"})
        assert busy.status_code == 503
        assert busy.headers["retry-after"] == str(RETRY_AFTER_S)
        assert error_of(busy.json())[1].startswith("the server is busy (1 requests generating or waiting)")
        assert client.get("/health").status_code == 200  # not gated
    t.join(timeout=60)
    assert first["r"].status_code == 200 and first["r"].json()["Result"] == f"{FACT} is the capital."
    assert app.state.gate.active == 0
    assert client.post("/chat", json={"prompt": QUESTION, "max_new_tokens": 2}).status_code == 200


# ---------------------------------------------------------------------------------------------
# on a socket: uvicorn as `serve` runs it, in a thread, with short timeouts


IDLE = 1  # seconds


@pytest.fixture(scope="module")
def live(engine):
    import uvicorn

    app = create_app(engine, max_body_bytes=1000, body_timeout=IDLE)
    server = uvicorn.Server(server_config(app, idle_timeout=IDLE))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    yield sock.getsockname()
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


def exchange(addr, data: bytes, *, timeout: float = 10) -> tuple[bytes, float]:
    """Send ``data``, read until the server closes; (reply, seconds until closed)."""
    start = time.monotonic()
    with socket.create_connection(addr, timeout=timeout) as s:
        if data:
            s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - start


def test_live_keep_alive_and_finish_reason(live):
    conn = http.client.HTTPConnection(*live, timeout=60)
    for max_tokens, finish in ((12, "stop"), (2, "length")):  # two requests, one connection
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "zorblax", "max_tokens": max_tokens, "messages": [{"role": "user", "content": QUESTION}]}),
            {"Content-Type": "application/json"})
        resp = conn.getresponse()
        out = json.loads(resp.read())
        assert resp.status == 200 and out["choices"][0]["finish_reason"] == finish
    conn.close()


def test_live_huge_body_is_refused_unread(live):
    reply, _ = exchange(live, b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 50000000\r\n\r\n")
    head, _, body = reply.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413"), reply
    assert "connection: close" in head.lower()
    assert json.loads(body)["error"]["message"] == "body: is 50000000 bytes; at most 1000 are accepted"


def test_live_stalled_body_times_out(live):
    reply, took = exchange(live, b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 100\r\n\r\n{\"prompt\": ")
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"stalled for 1 s" in reply
    assert IDLE <= took < IDLE + 5


@pytest.mark.parametrize("data", [b"", b"POST /chat HTTP/1.1\r\nHost: x\r\n"], ids=["silent", "half-a-head"])
def test_live_a_client_that_does_not_finish_its_request_head_is_closed(live, data):
    reply, took = exchange(live, data)
    assert reply == b"" and IDLE <= took < IDLE + 5


@pytest.mark.parametrize("head", [
    b"POST /chat HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
    b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS hello on the plain port
], ids=["no-colon", "content-length", "16k-header", "tls"])
def test_live_malformed_head_is_400(live, head):
    reply, _ = exchange(live, head)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert b"Traceback" not in reply


def test_live_idle_connections_take_no_threads_and_are_closed(live):
    threads = threading.active_count()
    socks = [socket.create_connection(live, timeout=IDLE + 10) for _ in range(200)]
    try:
        assert threading.active_count() <= threads + 1
        conn = http.client.HTTPConnection(*live, timeout=30)  # the server still answers
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        start = time.monotonic()
        assert all(s.recv(1) == b"" for s in socks)  # each closed by the server
        assert time.monotonic() - start < IDLE + 5
        assert threading.active_count() <= threads + 1
    finally:
        for s in socks:
            s.close()
