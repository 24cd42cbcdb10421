"""Registry fixtures: a real docker-registry (htpasswd) for the session, its auth file, tiny adapters.

``registry`` starts Debian's docker-registry once per session (about 0.1 s) and stops it at the end;
``fake_adapter`` writes a small but valid PEFT-shaped adapter (no torch needed).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from kaito_tuning.dev.localregistry import LocalRegistry

REGISTRY_USER = "tester"
REGISTRY_PASSWORD = "correct horse battery staple"


def write_safetensors(path: Path, tensors: dict[str, tuple[list[int], bytes]]) -> None:
    """A safetensors file of F32 tensors: {name: (shape, raw little-endian bytes)}."""
    header, offset = {}, 0
    for name, (shape, data) in tensors.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(d for _, d in tensors.values()))


def make_fake_adapter(directory: Path, *, rank: int = 8, seed: int = 0, metadata: bool = True) -> Path:
    """An adapter directory as our trainer writes it: config, safetensors weights, metadata, README."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }, indent=2))
    weights = {f"base_model.model.layers.0.self_attn.{m}.lora_{ab}.weight":
               ([rank, 16] if ab == "A" else [16, rank], bytes((seed + i) % 256 for i in range(rank * 16 * 4)))
               for m in ("q_proj", "v_proj") for ab in ("A", "B")}
    write_safetensors(directory / "adapter_model.safetensors", weights)
    if metadata:
        (directory / "training_metadata.json").write_text(json.dumps({
            "preset": "smollm2-135m-instruct", "method": "qlora",
            "baseModel": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "datasetDigests": ["sha256:" + "ab" * 32], "finishedAt": "2026-01-02T03:04:05Z",
        }, indent=2))
        (directory / "README.md").write_text("# a test adapter\n")
    return directory


def assert_fake_adapter_annotations(notes: dict) -> None:
    """The annotations ``make_fake_adapter``'s metadata must give (the manifest's, or layers.adapter_annotations)."""
    assert notes["sh.kaito.model.name"] == notes["kaito.sh/preset"] == "smollm2-135m-instruct"
    assert notes["kaito.sh/base-model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert notes["kaito.sh/method"] == "qlora" and notes["kaito.sh/lora-rank"] == "8"
    assert notes["kaito.sh/dataset-digests"] == "sha256:" + "ab" * 32
    assert notes["org.opencontainers.image.created"] == "2026-01-02T03:04:05Z"
    assert notes["org.opencontainers.image.title"] == "QLoRA adapter for smollm2-135m-instruct"


@pytest.fixture(scope="session")
def registry():
    """A running docker-registry with htpasswd auth (user tester); skipped if not installed."""
    if not (shutil.which("docker-registry") or shutil.which("registry")):
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    with LocalRegistry(user=REGISTRY_USER, password=REGISTRY_PASSWORD) as reg:
        yield reg


@pytest.fixture()
def registry_auth_file(registry) -> str:
    """A docker config.json with the registry's credentials (auths[host].auth)."""
    return registry.auth_file


@pytest.fixture()
def fake_adapter(tmp_path) -> Path:
    return make_fake_adapter(tmp_path / "adapter")


# ---------------------------------------------------------------------------------------------
# a registry with Bearer-token auth: docker-registry's `auth: token` + a tiny token service here


def _libtrust_kid(public_der: bytes) -> str:
    """distribution's key id for a certificate's key: base32 of sha256(DER)[:30] in groups of 4."""
    import base64
    import hashlib

    b32 = base64.b32encode(hashlib.sha256(public_der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))


class TokenService:
    """Issues RS256 JWTs the way Docker's token spec says: Basic user:password (GET) or refresh token (POST).

    Records each request in ``requests`` as (method, params) so tests can see the flow taken.
    """

    SERVICE, ISSUER, REFRESH_TOKEN = "kaito-test-registry", "kaito-test-issuer", "refresh-0123456789"

    def __init__(self, workdir: Path, user: str, password: str):
        import subprocess

        self.workdir, self.user, self.password, self.requests = workdir, user, password, []
        self.key, self.cert = workdir / "token.key", workdir / "token.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
                        "-out", str(self.cert), "-days", "2", "-subj", "/CN=kaito-test-token"],
                       check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-noout", "-pubkey"], check=True,
                             capture_output=True).stdout
        der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=der, check=True,
                             capture_output=True).stdout
        self.kid = _libtrust_kid(der)

    def sign(self, claims: dict) -> str:
        import base64
        import subprocess

        def b64(b: bytes) -> str:
            return base64.urlsafe_b64encode(b).decode().rstrip("=")

        head = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        signing_input = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing_input.encode(),
                             check=True, capture_output=True).stdout
        return f"{signing_input}.{b64(sig)}"

    def grant(self, scope: str, subject: str) -> str:
        import time

        access = []
        for item in scope.split(" "):
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and name:
                access.append({"type": "repository", "name": name, "actions": actions.split(",")})
        now = int(time.time())
        return self.sign({"iss": self.ISSUER, "sub": subject, "aud": self.SERVICE, "exp": now + 300,
                          "nbf": now - 10, "iat": now, "jti": f"{now}-{len(self.requests)}", "access": access})

    def serve(self):
        """Start the HTTP token endpoint in a thread; returns (server, realm URL)."""
        import base64
        import threading
        from http.server import BaseHTTPRequestHandler
        from urllib.parse import parse_qs, urlparse

        from fixtures_data import QuietHTTPServer

        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: dict):
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                params = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
                service.requests.append(("GET", params))
                auth = self.headers.get("Authorization", "")
                if not auth.startswith("Basic "):
                    return self._answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "credentials needed"}]})
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                if (user, password) != (service.user, service.password):
                    return self._answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                self._answer(200, {"token": service.grant(params.get("scope", ""), user)})

            def do_POST(self):
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode()).items()}
                service.requests.append(("POST", form))
                if form.get("grant_type") != "refresh_token" or form.get("refresh_token") != service.REFRESH_TOKEN:
                    return self._answer(401, {"error": "invalid_grant"})
                self._answer(200, {"access_token": service.grant(form.get("scope", ""), "refresh-user")})

        server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}/token"


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory):
    """(LocalRegistry with Bearer-token auth, TokenService): the registry trusts the service's key."""
    if not (shutil.which("docker-registry") or shutil.which("registry")) or not shutil.which("openssl"):
        pytest.skip("docker-registry or openssl is not installed")
    tokens = TokenService(tmp_path_factory.mktemp("token"), REGISTRY_USER, REGISTRY_PASSWORD)
    server, realm = tokens.serve()
    auth = {"token": {"realm": realm, "service": tokens.SERVICE, "issuer": tokens.ISSUER,
                      "rootcertbundle": str(tokens.cert)}}
    try:
        with LocalRegistry(user=REGISTRY_USER, password=REGISTRY_PASSWORD, auth=auth) as reg:
            yield reg, tokens
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------
# building images by hand (hostile layers, artifacts, dataset images)


def tar_layer(entries: list[tuple], *, compress: bool = True) -> bytes:
    """A (gzip) tar of (name, kind, payload) with kind in file/dir/symlink/hardlink."""
    import gzip
    import io
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[kind]
            info.linkname = payload or ""
            tar.addfile(info)
    return gzip.compress(raw.getvalue()) if compress else raw.getvalue()


def push_image(registry, repo_tag: str, layers: list[bytes], *, config_type: str | None = None,
               layer_type: str | None = None) -> str:
    """Push an image made of ``layers`` (gzip tar blobs) with the registry client; returns the reference."""
    import gzip
    import hashlib
    import tempfile

    from kaito_tuning.artifacts import layers as L
    from kaito_tuning.artifacts.registry import connect

    image = f"{registry.host}/{repo_tag}"
    with connect(image, auth_file=registry.auth_file, plain_http=True, push=True, retries=0,
                 require_tag=True) as client, tempfile.TemporaryDirectory() as tmp:
        client.ping()
        descriptors, diff_ids = [], []
        for i, blob in enumerate(layers):
            path = Path(tmp) / f"layer-{i}"
            path.write_bytes(blob)
            digest = "sha256:" + hashlib.sha256(blob).hexdigest()
            client.push_blob(path, digest, len(blob), layer_type or L.MEDIA_LAYER)
            descriptors.append({"mediaType": layer_type or L.MEDIA_LAYER, "digest": digest, "size": len(blob)})
            if layer_type is None:
                diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest())
        config = json.dumps({"os": "linux", "architecture": "amd64",
                             "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
        (Path(tmp) / "config").write_bytes(config)
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        client.push_blob(Path(tmp) / "config", config_digest, len(config), config_type or L.MEDIA_CONFIG)
        client.put_manifest(json.dumps({
            "schemaVersion": 2, "mediaType": L.MEDIA_MANIFEST, "layers": descriptors,
            "config": {"mediaType": config_type or L.MEDIA_CONFIG, "digest": config_digest, "size": len(config)},
        }).encode(), L.MEDIA_MANIFEST)
    return image


# ---------------------------------------------------------------------------------------------
# HTTP stand-ins in front of (or instead of) a registry: flaky proxies, storage hosts, hostile registries


class HttpStub:
    """A threaded HTTP(S) server on a free loopback port.

    ``handle(stub, req)`` answers each request: it returns ``(status, headers, body)`` (optionally a
    4th item: send only that many bytes of the body, then drop the connection), or ``None`` to
    forward the request to ``upstream`` unchanged (its Host kept, so a registry's Locations name
    this server). Every request is recorded in ``seen`` as a dict: method, path, headers, body.
    """

    def __init__(self, upstream: str | None = None, handle=None, *, tls: tuple[str, str] | None = None):
        import ssl
        import threading
        from http.server import BaseHTTPRequestHandler

        from fixtures_data import QuietHTTPServer

        stub, self.upstream, self.handle, self.seen = self, upstream, handle, []
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                req = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()), "body": body}
                with stub._lock:
                    stub.seen.append(req)
                answer = stub.handle(stub, req) if stub.handle else None
                if answer is None:
                    answer = stub.forward(req)
                status, headers, data, *cut = answer
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                if cut:
                    self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data[:cut[0]] if cut else data)
                if cut:
                    self.close_connection = True

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        self.server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"

    def forward(self, req: dict, *, headers: dict | None = None, host: str | None = None) -> tuple[int, dict, bytes]:
        """Send ``req`` on to the upstream; ``host`` is the Host header it gets (default: this server's)."""
        import requests

        sent = {k: v for k, v in req["headers"].items() if k.lower() not in ("host", "content-length")}
        sent["Host"] = host or self.host
        sent.update(headers or {})
        resp = requests.request(req["method"], self.upstream + req["path"], data=req["body"], headers=sent,
                                allow_redirects=False, timeout=30)
        return resp.status_code, dict(resp.headers), resp.content

    def __enter__(self) -> "HttpStub":
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def self_signed_cert(directory: Path) -> tuple[str, str]:
    """(cert, key) files of a self-signed certificate for 127.0.0.1 (openssl)."""
    import subprocess

    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return str(cert), str(key)
