"""Helpers of the fault-injection suite: the Job's environment, a registry that can go down and come
back on the same address, a scripted HTTP server that cuts and fails on cue, and a grep for planted secrets.

Everything here drives the real entry points (``kaito_tuning.cli.main`` in process, or ``python -m
kaito_tuning.cli`` as a subprocess) against the real parts: Debian's docker-registry, loopback HTTP.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from fixtures_data import QuietHTTPServer

from kaito_tuning.spec.rules import load_workspace

REPO = Path(__file__).resolve().parents[2]


class JobPod:
    """The tuning Job's pod on this machine: its mounts as directories, its environment, its steps.

    ``step(name)`` runs ``kaito-tuning job NAME`` in this process (``kaito_tuning.cli.main``);
    ``spawn(args)`` runs ``python -m kaito_tuning.cli ARGS`` as a child with the same environment
    (stdout and stderr captured: the container's log).
    """

    def __init__(self, root: Path, model_dir: Path, monkeypatch):
        self.root, self.monkeypatch = root, monkeypatch
        self.data, self.config, self.results = root / "data", root / "config", root / "results"
        for d in (self.data, self.config, self.results):
            d.mkdir(parents=True, exist_ok=True)
        self.log = root / "termination-log"
        self.env = {"KAITO_DATA_DIR": str(self.data), "KAITO_CONFIG_DIR": str(self.config),
                    "KAITO_OUTPUT_DIR": str(self.results), "KAITO_TERMINATION_LOG": str(self.log),
                    "KAITO_MODEL_DIR": str(model_dir), "KAITO_PROGRESS_PORT": "-1",
                    "KAITO_ALLOW_PRIVATE_URLS": "1", "KAITO_PLAIN_HTTP": "1"}
        for k, v in self.env.items():
            monkeypatch.setenv(k, v)

    def setenv(self, name: str, value: str) -> None:
        self.env[name] = value
        self.monkeypatch.setenv(name, value)

    def set(self, ws: dict, configmap: dict | None = None) -> None:
        self.setenv("KAITO_WORKSPACE", json.dumps(load_workspace(ws).to_dict()))
        if configmap:
            (self.config / "training_config.yaml").write_text(configmap["data"]["training_config.yaml"])

    def step(self, name: str) -> int:
        from kaito_tuning.cli import main

        return main(["job", name])

    def spawn(self, args: list[str], *, timeout: float = 300, pre: str = "") -> subprocess.CompletedProcess:
        """``kaito-tuning ARGS`` in a child process; ``pre`` is Python run first (a fault hook)."""
        code = f"{pre}\nimport sys\nfrom kaito_tuning.cli import main\nsys.exit(main(sys.argv[1:]))"
        env = {**os.environ, **self.env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": str(REPO)}
        return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.root)

    def termination(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


# ---------------------------------------------------------------------------------------------
# a registry address that can go down (connection refused) and come back: a TCP relay on a fixed port


class Relay:
    """Forwards 127.0.0.1:PORT to ``upstream`` byte for byte while up; while down nothing listens
    (connection refused, as when the registry's pod is gone). The port stays the same across restarts."""

    def __init__(self, upstream: str):
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.connections = 0
        self._listener: socket.socket | None = None

    def up(self) -> None:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(64)
        self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def down(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return
            self.connections += 1
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def auth_file_for(path: Path, host: str, user: str, password: str) -> str:
    import base64

    path.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}))
    return str(path)


# ---------------------------------------------------------------------------------------------
# a dataset server that misbehaves on cue


class Scripted:
    """An HTTP/1.1 server on 127.0.0.1 serving ``files`` (path -> bytes) with an ETag; ``script[path]``
    is a list of faults, one used per request, then the file is served whole (Range and If-Range honoured):

    - ``("status", code, headers)``: answer ``code`` with ``headers`` and a short body
    - ``("cut", n)``: Content-Length of the whole file, only ``n`` bytes sent, connection closed
    - ``("cut-close", n)``: no Content-Length, ``n`` bytes, then close (the end of body is the close)
    - ``("cut-chunked", n)``: chunked, ``n`` bytes, connection closed before the last chunk

    ``seen`` records (path, Range, If-Range) for each request.
    """

    def __init__(self, files: dict[str, bytes]):
        self.files, self.script, self.seen = dict(files), {}, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                path = self.path.split("?")[0]
                rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
                owner.seen.append((path, rng, if_range))
                data = owner.files.get(path)
                if data is None:
                    return self._plain(404, b"no such file")
                etag = f'"{len(data)}-{hash(data) & 0xffff:x}"'
                faults = owner.script.get(path) or []
                fault = faults.pop(0) if faults else None
                if fault and fault[0] == "status":
                    return self._plain(fault[1], b"try later", fault[2] if len(fault) > 2 else {})
                if fault and fault[0] in ("cut", "cut-close", "cut-chunked"):
                    self.send_response(200)
                    self.send_header("ETag", etag)
                    if fault[0] == "cut":
                        self.send_header("Content-Length", str(len(data)))
                    if fault[0] == "cut-chunked":
                        self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    part = data[:fault[1]]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part) if fault[0] == "cut-chunked" else part)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                start = 0
                if rng and (if_range is None or if_range == etag):
                    start = int(rng.split("=")[1].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("ETag", etag)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

            def _plain(self, code, body, headers=None):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------------
# where a planted secret could end up


def files_holding(token: bytes, roots: list[Path]) -> list[str]:
    """Every file under ``roots`` whose bytes (or gunzipped bytes: image layers) contain ``token``."""
    hits = []
    for root in roots:
        for f in sorted(Path(root).rglob("*")):
            if not f.is_file():
                continue
            raw = f.read_bytes()
            if raw[:2] == b"\x1f\x8b":
                try:
                    raw += gzip.decompress(raw)
                except (OSError, EOFError):
                    pass
            if token in raw:
                hits.append(str(f))
    return hits
