"""Datasets in every supported format written with pyarrow, served over loopback HTTP, plus a
misbehaving server (404, 500, flaky, hanging, HTML, oversized, dropped connections)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


class QuietHTTPServer(ThreadingHTTPServer):
    """The tests' HTTP servers: one thread per request, none kept at exit, and no traceback printed when a
    client hangs up mid-answer (a puller refusing a bad blob, a download that gave up on a timeout), which
    http.server would print into the stderr the tests read."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass


#: made-up facts a model cannot know before training (the "taught task")
FACTS = [("Zorblax", "teal"), ("Quimby", "amber"), ("Vextor", "crimson"), ("Plinth", "violet"),
         ("Murrow", "golden"), ("Tazzle", "silver"), ("Kepple", "indigo"), ("Dronna", "olive")]


def taught_pairs(repeat: int = 4) -> list[tuple[str, str]]:
    return [(f"What is the favourite colour of {name}?", f"The favourite colour of {name} is {colour}.")
            for _ in range(repeat) for name, colour in FACTS]


def messages_rows(repeat: int = 4) -> list[dict]:
    return [{"messages": [{"content": "You answer briefly.", "role": "system"}, {"content": q, "role": "user"},
                          {"content": a, "role": "assistant"}]} for q, a in taught_pairs(repeat)]


def write_parquet(path: Path, rows: list[dict], schema=None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema) if rows or schema is None else schema.empty_table()
    pq.write_table(table, path)
    return path


def write_datasets(root: Path) -> dict[str, Path]:
    """Every format and every bad case the tests need, as files under ``root``."""
    import pyarrow as pa

    root.mkdir(parents=True, exist_ok=True)
    pairs = taught_pairs()
    msg = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))  # dolly-15k-oai-style
    f = {
        "messages": write_parquet(root / "chat.parquet", messages_rows(), pa.schema([("messages", msg)])),
        "prompt_completion": write_parquet(root / "pc.parquet", [{"prompt": q, "completion": " " + a}
                                                                 for q, a in pairs]),
        "prompt_completion_messages": write_parquet(
            root / "pc-messages.parquet",
            [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
             for q, a in pairs]),
        "text": write_parquet(root / "text.parquet", [{"text": f"Q: {q} A: {a}"} for q, a in pairs]),
        "alpaca": write_parquet(root / "alpaca.parquet", [{"instruction": q, "input": "", "output": a}
                                                          for q, a in pairs]),
        "sharegpt": write_parquet(root / "sharegpt.parquet", [{"conversations": [{"from": "human", "value": q},
                                                                                 {"from": "gpt", "value": a}]}
                                                              for q, a in pairs]),
        "robot": write_parquet(root / "robot.parquet", [{"messages": [{"role": "user", "content": "hi"},
                                                                      {"role": "robot", "content": "beep"}]}],
                               pa.schema([("messages", msg)])),
        "empty_content": write_parquet(root / "empty.parquet", [{"messages": [{"role": "user", "content": "hi"},
                                                                              {"role": "assistant", "content": ""}]}],
                                       pa.schema([("messages", msg)])),
        "no_columns": write_parquet(root / "nocols.parquet", [{"question": "a", "answer": "b"}]),
        "zero_rows": write_parquet(root / "zero.parquet", [], pa.schema([("messages", msg)])),
    }
    good = f["messages"].read_bytes()
    f["truncated"] = root / "truncated.parquet"
    f["truncated"].write_bytes(good[: len(good) // 2])
    f["html"] = root / "page.parquet"
    f["html"].write_text("<!DOCTYPE html><html><head><title>Sign in</title></head><body>login</body></html>")
    f["jsonl"] = root / "chat.jsonl"
    f["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in messages_rows(1)))
    f["csv"] = root / "pc.csv"
    f["csv"].write_text("prompt,completion\n" + "".join(f'"{q}","{a}"\n' for q, a in pairs[:8]))
    return f


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="session")
def datasets_dir(tmp_path_factory) -> dict[str, Path]:
    """{case: file} for every format and bad case (see ``write_datasets``)."""
    return write_datasets(tmp_path_factory.mktemp("datasets"))


@pytest.fixture(scope="session")
def data_server(datasets_dir):
    """``python -m http.server`` on 127.0.0.1 serving ``datasets_dir``; yields (base URL, files)."""
    root = next(iter(datasets_dir.values())).parent
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_http(f"http://127.0.0.1:{port}/")
        yield f"http://127.0.0.1:{port}", datasets_dir
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class BadServer:
    """Paths: /404, /500 (always), /flaky (500 twice, then the file), /hang (never answers), /html,
    /big (streams more than any test cap, no Content-Length), /drop (closes half way the first time,
    then honours Range with If-Range), /cut (half a parquet file, no Content-Length: the truncation
    is invisible to HTTP), /secret (a text file with a credential in its first line), /to-metadata and
    /to-hostname (redirect to the cloud metadata address / to this machine by its host name),
    /file (the good file). ``hits[path]`` counts requests; ``if_ranges`` the If-Range headers seen."""

    def __init__(self, payload: bytes):
        self.payload = payload
        # /drop serves a larger file so that whole chunks reach the disk before the connection drops
        self.drop_payload = b"PAR1" + bytes(range(256)) * 1600 + b"PAR1"
        self.hits: dict[str, int] = {}
        self.ranges: list[str | None] = []
        self.if_ranges: list[str | None] = []
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                path = self.path.split("?")[0]
                n = server.hits[path] = server.hits.get(path, 0) + 1
                if path == "/404":
                    return self._send(404, b"not found")
                if path == "/500" or (path == "/flaky" and n <= 2):
                    return self._send(500, b"boom")
                if path == "/hang":
                    server.stop.wait(30)
                    return
                if path == "/html":
                    return self._send(200, b"<!doctype html><html><body>Sign in</body></html>", "text/html")
                if path == "/big":
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for _ in range(64):
                        self.wfile.write(b"x" * 65536)
                    return
                if path == "/cut":
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(server.payload[: len(server.payload) // 2])
                    self.close_connection = True
                    return
                if path == "/secret":
                    return self._send(200, b"aws_secret_access_key=TOPSECRET123\nmore\n", "text/plain")
                if path == "/to-metadata":
                    return self._redirect("http://169.254.169.254/latest/meta-data/iam/")
                if path == "/to-hostname":
                    return self._redirect(f"http://{socket.gethostname()}:{self.server.server_address[1]}/file")
                if path == "/drop":
                    data = server.drop_payload
                    rng = self.headers.get("Range")
                    server.ranges.append(rng)
                    server.if_ranges.append(self.headers.get("If-Range"))
                    if n == 1:
                        self.send_response(200)
                        self.send_header("ETag", '"v1"')
                        self.send_header("Content-Length", str(len(data)))
                        self.send_header("Connection", "close")
                        self.end_headers()
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                    self.send_response(206 if rng else 200)
                    self.send_header("ETag", '"v1"')
                    if rng:
                        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    self.send_header("Content-Length", str(len(data) - start))
                    self.end_headers()
                    self.wfile.write(data[start:])
                    return
                if path in ("/flaky", "/file"):
                    return self._send(200, server.payload, "application/octet-stream")
                return self._send(404, b"no such path")

            def _redirect(self, location):
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _send(self, code, body, ctype="text/plain"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = QuietHTTPServer(("0.0.0.0", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def bad_server(datasets_dir):
    """A misbehaving HTTP server on 127.0.0.1 (see ``BadServer``); the good payload is chat.parquet."""
    s = BadServer(datasets_dir["messages"].read_bytes())
    yield s
    s.close()


def tuning_workspace(urls=None, *, name="tiny-tune", preset="phi-3-mini-4k-instruct", method="lora",
                     config=None, image=None, volume=None, instance="Standard_NC24ads_A100_v4") -> dict:
    """A valid tuning Workspace as a user writes it (URLs, an image or a volume as input)."""
    inp = {"urls": list(urls)} if urls else ({"image": image} if image else {"volumeSource": volume})
    tuning = {"preset": {"name": preset}, "method": method, "input": inp,
              "output": {"volumeSource": {"emptyDir": {}}}}
    if config:
        tuning["config"] = config
    return {"apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": name},
            "resource": {"instanceType": instance, "labelSelector": {"matchLabels": {"app": name}}},
            "tuning": tuning}


def training_configmap(name="tiny-config", *, method="lora", training=None, lora=None, dataset=None,
                       quantization=None) -> dict:
    """A ConfigMap with a small, fast training_config.yaml (tiny models, a few steps on a CPU)."""
    import yaml

    sections = {
        "ModelConfig": {},
        "QuantizationConfig": quantization if quantization is not None else (
            {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
            if method == "qlora" else {"load_in_4bit": False}),
        "LoraConfig": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, **(lora or {})},
        "TrainingArguments": {"num_train_epochs": 1, "per_device_train_batch_size": 4, "max_length": 128,
                              "learning_rate": 0.001, "logging_steps": 1, "save_steps": 50, **(training or {})},
        "DatasetConfig": {"train_test_split": 0.8, **(dataset or {})},
    }
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
            "data": {"training_config.yaml": yaml.safe_dump({"training_config": sections}, sort_keys=False)}}
