"""Adapters as OCI images against a real docker-registry (distribution 2.8), read back with skopeo."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from fixtures_registry import REGISTRY_PASSWORD, REGISTRY_USER, make_fake_adapter

from kaito_tuning import cli
from kaito_tuning.artifacts import oci

ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "training_metadata.json"]


def _skopeo(*args: str, auth_file: str) -> subprocess.CompletedProcess:
    if not shutil.which("skopeo"):
        pytest.skip("skopeo is not installed")
    return subprocess.run(["skopeo", *args[:1], "--tls-verify=false", "--authfile", auth_file, *args[1:]],
                          capture_output=True, text=True, timeout=60, check=True)


@pytest.fixture()
def no_sleep(monkeypatch) -> list[float]:
    """Record the retry back-off instead of sleeping it."""
    slept: list[float] = []
    monkeypatch.setattr(oci, "_sleep", slept.append)
    return slept


def _push(adapter, registry, repo: str, **kw) -> oci.PushResult:
    return oci.push_adapter(adapter, f"{registry.host}/{repo}", auth_file=registry.auth_file, plain_http=True, **kw)


# ---------------------------------------------------------------------------------------------
# the image is a real, reproducible container image


def test_skopeo_reads_the_pushed_image_and_its_layer_holds_data_adapter(fake_adapter, registry, tmp_path):
    result = _push(fake_adapter, registry, "adapters/skopeo:0.1")
    ref = f"docker://{registry.host}/adapters/skopeo:0.1"

    manifest = json.loads(_skopeo("inspect", "--raw", ref, auth_file=registry.auth_file).stdout)
    assert "sha256:" + hashlib.sha256(
        _skopeo("inspect", "--raw", ref, auth_file=registry.auth_file).stdout.encode()).hexdigest() == result.digest
    assert manifest["mediaType"] == oci.MEDIA_MANIFEST and "artifactType" not in manifest
    assert [layer["mediaType"] for layer in manifest["layers"]] == [oci.MEDIA_LAYER]
    notes = manifest["annotations"]
    assert notes["sh.kaito.model.name"] == notes["kaito.sh/preset"] == "smollm2-135m-instruct"
    assert notes["kaito.sh/base-model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert notes["kaito.sh/method"] == "qlora" and notes["kaito.sh/lora-rank"] == "8"
    assert notes["kaito.sh/dataset-digests"] == "sha256:" + "ab" * 32
    assert notes["org.opencontainers.image.created"] == "2026-01-02T03:04:05Z"
    assert notes["org.opencontainers.image.title"] == "QLoRA adapter for smollm2-135m-instruct"

    config = json.loads(_skopeo("inspect", "--config", "--raw", ref, auth_file=registry.auth_file).stdout)
    assert (config["os"], config["architecture"], config["rootfs"]["type"]) == ("linux", "amd64", "layers")
    # the plain inspect needs a real image config (it fails on artifacts)
    info = json.loads(_skopeo("inspect", ref, auth_file=registry.auth_file).stdout)
    assert info["Digest"] == result.digest and info["Os"] == "linux"

    _skopeo("copy", ref, f"oci:{tmp_path / 'layout'}:copied", auth_file=registry.auth_file)
    blob = tmp_path / "layout" / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1]
    plain = gzip.decompress(blob.read_bytes())
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(plain).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["data"] + [f"data/{f}" for f in ADAPTER_FILES]
        assert all((m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", 0) for m in members)
        for name in ADAPTER_FILES:
            assert tar.extractfile(f"data/{name}").read() == (fake_adapter / name).read_bytes()


def test_pull_gives_back_byte_identical_files(fake_adapter, registry, tmp_path):
    pushed = _push(fake_adapter, registry, "adapters/roundtrip:1")
    pulled = oci.pull_adapter(pushed.reference, tmp_path / "out", auth_file=registry.auth_file, plain_http=True)
    assert pulled.digest == pushed.digest and pulled.files == ADAPTER_FILES == pushed.files
    for name in ADAPTER_FILES:
        assert (tmp_path / "out" / name).read_bytes() == (fake_adapter / name).read_bytes()
    # pinned by digest too
    again = oci.pull_adapter(pushed.pinned, tmp_path / "out2", auth_file=registry.auth_file, plain_http=True)
    assert again.digest == pushed.digest


def test_same_adapter_files_give_the_same_digest(registry, tmp_path):
    first = make_fake_adapter(tmp_path / "a")
    one = _push(first, registry, "adapters/repro:1")
    time.sleep(1.1)  # different mtimes, different directory, different tag
    second = make_fake_adapter(tmp_path / "b")
    two = _push(second, registry, "adapters/repro:2")
    assert one.digest == two.digest
    changed = make_fake_adapter(tmp_path / "c", seed=1)
    assert _push(changed, registry, "adapters/repro:3").digest != one.digest

    layer = tmp_path / "layer.tar.gz"
    oci.build_layer(oci.adapter_files(first), layer)
    head = layer.read_bytes()[:10]
    assert head[4:8] == b"\0\0\0\0" and not head[3] & 0x08  # gzip: mtime 0, no file name


def test_checkpoints_and_hidden_files_stay_out_of_the_image(fake_adapter):
    (fake_adapter / "training_args.bin").write_bytes(b"pickle")
    (fake_adapter / ".partial").write_text("x")
    (fake_adapter / "checkpoints").mkdir()
    (fake_adapter / "checkpoints" / "optimizer.pt").write_bytes(b"x")
    assert [p.name for p in oci.adapter_files(fake_adapter)] == ADAPTER_FILES


def test_cli_push_and_pull_print_json(fake_adapter, registry, tmp_path, capsys):
    image = f"{registry.host}/adapters/cli:2"
    assert cli.main(["push", str(fake_adapter), image, "--auth-file", registry.auth_file, "--plain-http",
                     "--annotation", "org.opencontainers.image.source=https://example.com/repo"]) == 0
    pushed = json.loads(capsys.readouterr().out)
    assert pushed["reference"] == image and pushed["digest"].startswith("sha256:")
    assert cli.main(["pull", image, str(tmp_path / "got"), "--auth-file", registry.auth_file, "--plain-http"]) == 0
    pulled = json.loads(capsys.readouterr().out)
    assert pulled["digest"] == pushed["digest"] and pulled["files"] == ADAPTER_FILES
    manifest = requests.get(f"{registry.url}/v2/adapters/cli/manifests/2", auth=(REGISTRY_USER, REGISTRY_PASSWORD),
                            headers={"Accept": oci.MEDIA_MANIFEST}).json()
    assert manifest["annotations"]["org.opencontainers.image.source"] == "https://example.com/repo"

    assert cli.main(["push", str(fake_adapter), image, "--annotation", "novalue", "--plain-http"]) == 65
    assert "InvalidAnnotation" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# credentials: every form of a dockerconfigjson entry, Basic and Bearer


def test_username_password_entry_and_a_whole_secret_are_accepted(fake_adapter, registry, tmp_path):
    plain = {"auths": {registry.host: {"username": REGISTRY_USER, "password": REGISTRY_PASSWORD}}}
    assert _push_with(fake_adapter, registry, plain, "creds/plain:1")
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson", "data": {
        ".dockerconfigjson": base64.b64encode(json.dumps(plain).encode()).decode()}}
    path = tmp_path / "secret.json"
    path.write_text(json.dumps(secret))
    result = oci.push_adapter(fake_adapter, f"{registry.host}/creds/secret:1", auth_file=path, plain_http=True)
    assert result.digest.startswith("sha256:")


def _push_with(adapter, registry, auth: dict, repo: str) -> str:
    return oci.push_adapter(adapter, f"{registry.host}/{repo}", auth=auth, plain_http=True).digest


def test_bearer_token_flow_with_password_and_identity_token(fake_adapter, token_registry, tmp_path):
    reg, tokens = token_registry
    tokens.requests.clear()
    pushed = oci.push_adapter(fake_adapter, f"{reg.host}/bearer/adapter:1", auth_file=reg.auth_file, plain_http=True)
    method, params = tokens.requests[0]
    assert (method, params["service"], params["scope"]) == ("GET", tokens.SERVICE, "repository:bearer/adapter:pull,push")

    tokens.requests.clear()
    refresh = {"auths": {reg.host: {"username": "<token>", "identitytoken": tokens.REFRESH_TOKEN}}}
    pulled = oci.pull_adapter(f"{reg.host}/bearer/adapter:1", tmp_path / "out", auth=refresh, plain_http=True)
    assert pulled.digest == pushed.digest
    method, form = tokens.requests[0]
    assert (method, form["grant_type"], form["scope"]) == ("POST", "refresh_token", "repository:bearer/adapter:pull")

    bad = {"auths": {reg.host: {"username": REGISTRY_USER, "password": "wrong"}}}
    with pytest.raises(oci.RegistryAuthFailed, match=f"authentication failed for {reg.host}"):
        oci.push_adapter(fake_adapter, f"{reg.host}/bearer/adapter:2", auth=bad, plain_http=True)
    with pytest.raises(oci.RegistryAuthFailed, match=f"registry {reg.host} requires credentials to pull"):
        oci.pull_adapter(f"{reg.host}/bearer/adapter:1", tmp_path / "anon", plain_http=True)


def test_parse_challenge():
    scheme, params = oci.parse_challenge(
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:a/b:pull,push",error="insufficient_scope"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example.com/token", "service": "registry.example.com",
                      "scope": "repository:a/b:pull,push", "error": "insufficient_scope"}
    assert oci.parse_challenge('Basic realm="my realm"') == ("basic", {"realm": "my realm"})
    assert oci.parse_challenge(None) == ("", {})


# ---------------------------------------------------------------------------------------------
# bad input: each with a clear error


def test_wrong_password_fails_fast_and_says_so(fake_adapter, registry, no_sleep):
    bad = {"auths": {registry.host: {"auth": base64.b64encode(f"{REGISTRY_USER}:nope".encode()).decode()}}}
    start = time.monotonic()
    with pytest.raises(oci.RegistryAuthFailed, match=f"authentication failed for {registry.host}") as e:
        oci.push_adapter(fake_adapter, f"{registry.host}/a/b:1", auth=bad, plain_http=True)
    assert time.monotonic() - start < 10 and no_sleep == []  # no retries on 401
    assert e.value.exit_code == 65


def test_no_credentials_for_a_registry_that_wants_them(fake_adapter, registry):
    with pytest.raises(oci.RegistryAuthFailed, match="requires credentials .*--auth-file"):
        oci.push_adapter(fake_adapter, f"{registry.host}/a/b:1", plain_http=True)


def test_unreachable_registry_is_retried_a_bounded_number_of_times(fake_adapter, no_sleep):
    with socket_closed_port() as port:
        with pytest.raises(oci.RegistryUnreachable, match=rf"cannot reach registry 127.0.0.1:{port}.*tried 4 times"):
            oci.push_adapter(fake_adapter, f"127.0.0.1:{port}/a/b:1", auth={"auths": {f"127.0.0.1:{port}": {
                "username": "u", "password": "p"}}}, plain_http=True)
    assert no_sleep == [1.0, 2.0, 4.0]


def test_tls_is_the_default(fake_adapter, registry, no_sleep):
    with pytest.raises(oci.RegistryUnreachable, match="TLS handshake .* --plain-http"):
        oci.push_adapter(fake_adapter, f"{registry.host}/a/b:1", auth_file=registry.auth_file)
    assert no_sleep == []


class socket_closed_port:
    """A loopback port nobody listens on."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc):
        return False


def test_transient_5xx_is_retried_and_the_push_succeeds(fake_adapter, registry, no_sleep, tmp_path):
    """A proxy that fails the first try of every distinct request with 503: uploads must be re-sent."""
    with _FlakyProxy(registry.url) as proxy:
        result = oci.push_adapter(fake_adapter, f"{proxy.host}/flaky/adapter:1",
                                  auth={"auths": {proxy.host: {"username": REGISTRY_USER, "password": REGISTRY_PASSWORD}}},
                                  plain_http=True)
    assert len(no_sleep) >= 5 and set(no_sleep) == {1.0}
    pulled = oci.pull_adapter(f"{registry.host}/flaky/adapter:1", tmp_path / "out", auth_file=registry.auth_file,
                              plain_http=True)
    assert pulled.digest == result.digest
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == \
        (fake_adapter / "adapter_model.safetensors").read_bytes()


def test_a_download_that_breaks_off_is_started_again(fake_adapter, registry, no_sleep, tmp_path):
    pushed = _push(fake_adapter, registry, "flaky/cut:1")
    with _FlakyProxy(registry.url, truncate=True) as proxy:
        pulled = oci.pull_adapter(f"{proxy.host}/flaky/cut:1", tmp_path / "out", plain_http=True,
                                  auth={"auths": {proxy.host: {"username": REGISTRY_USER, "password": REGISTRY_PASSWORD}}})
    assert pulled.digest == pushed.digest and no_sleep == [1.0]
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == \
        (fake_adapter / "adapter_model.safetensors").read_bytes()


def test_persistent_5xx_gives_up_with_the_status(no_sleep, tmp_path):
    with _FlakyProxy(None) as proxy:
        with pytest.raises(oci.RegistryError, match=f"registry {proxy.host} answered 503 .* 4 times"):
            oci.pull_adapter(f"{proxy.host}/a/b:1", tmp_path / "out", plain_http=True)
    assert no_sleep == [1.0, 2.0, 4.0] and not (tmp_path / "out").exists()


class _FlakyProxy:
    """Forwards to ``upstream``, answering 503 to the first try of each (method, path); always 503 if None.

    With ``truncate``, the first try of each blob download is forwarded but cut off halfway instead.
    """

    def __init__(self, upstream: str | None, *, truncate: bool = False):
        seen: set = set()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = (self.command, self.path.split("?")[0])
                cut = truncate and key not in seen and self.command == "GET" and "/blobs/" in self.path
                if truncate and not cut:
                    seen.add(key)
                if upstream is None or key not in seen:
                    seen.add(key)
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                resp = requests.request(self.command, upstream + self.path, data=body, headers=headers,
                                        allow_redirects=False)
                self.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                if cut:
                    seen.add(key)
                    self.wfile.write(resp.content[:len(resp.content) // 2])
                    self.close_connection = True
                elif self.command != "HEAD":
                    self.wfile.write(resp.content)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("content, message", [
    ("{not json", r"is not valid JSON .*line 1 column 2"),
    ('["a"]', "must be a JSON object"),
    ('{"credsStore": "desktop"}', 'has no "auths" map'),
    ('{"auths": {"other.example.com": {"auth": "dTpw"}}}', r"has no credentials for registry HOST .*other.example.com"),
    ('{"auths": {"HOST": {"auth": "not base64!"}}}', r"auths\[HOST\].auth must be base64"),
    ('{"auths": {"HOST": {"email": "x@example.com"}}}', "has no auth, username/password or identitytoken"),
])
def test_bad_auth_file_is_refused_before_any_network(fake_adapter, tmp_path, content, message):
    host = "registry.invalid:5000"
    path = tmp_path / "config.json"
    path.write_text(content.replace("HOST", host))
    with pytest.raises(oci.InvalidAuthFile, match=message.replace("HOST", host)):
        oci.push_adapter(fake_adapter, f"{host}/a/b:1", auth_file=path)
    with pytest.raises(oci.InvalidAuthFile, match="does not exist"):
        oci.push_adapter(fake_adapter, f"{host}/a/b:1", auth_file=tmp_path / "missing.json")


def test_docker_hub_entries_match_every_spelling():
    auths = {"https://index.docker.io/v1/": {"username": "u", "password": "p"}}
    assert oci.credentials_for(auths, "docker.io").username == "u"


@pytest.mark.parametrize("remove, message", [
    ("adapter_config.json", "has no adapter_config.json"),
    ("adapter_model.safetensors", "has no adapter_model.safetensors"),
])
def test_incomplete_adapter_is_refused(fake_adapter, remove, message):
    (fake_adapter / remove).unlink()
    with pytest.raises(oci.AdapterIncomplete, match=message):
        oci.push_adapter(fake_adapter, "registry.invalid/a/b:1")


def test_truncated_weights_and_bin_only_adapters_are_refused(fake_adapter, tmp_path):
    weights = fake_adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(oci.AdapterIncomplete, match="truncated or not a safetensors"):
        oci.push_adapter(fake_adapter, "registry.invalid/a/b:1")
    weights.rename(fake_adapter / "adapter_model.bin")
    with pytest.raises(oci.AdapterIncomplete, match="safe_serialization=True"):
        oci.push_adapter(fake_adapter, "registry.invalid/a/b:1")
    with pytest.raises(oci.AdapterIncomplete, match="does not exist"):
        oci.push_adapter(tmp_path / "nope", "registry.invalid/a/b:1")


@pytest.mark.parametrize("image, message", [
    ("registry.example.com/a/b", "has no tag; add one, e.g. registry.example.com/a/b:0.0.1"),
    ("registry.example.com/a/b@sha256:" + "a" * 64, "has no tag"),
    ("registry.example.com/a/b:1@sha256:" + "a" * 64, "push to a tag, not a digest"),
    ("registry.example.com/a b:1", "white space"),
    ("registry.example.com/a/b:v1!", "is invalid"),
    ("registry.example.com/Adapters/b:1", "only lowercase repository names"),
    ("https://registry.example.com/a:1", "must not have a scheme"),
])
def test_bad_image_reference(fake_adapter, image, message):
    with pytest.raises(oci.InvalidImageReference, match=message.replace("?", r"\?")):
        oci.push_adapter(fake_adapter, image)


# ---------------------------------------------------------------------------------------------
# pulling: non-adapters, dataset images, hostile layers


def _layer(entries: list[tuple]) -> bytes:
    """A gzip tar of (name, kind, payload) with kind in file/dir/symlink/hardlink."""
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
    return gzip.compress(raw.getvalue())


def _push_image(registry, repo_tag: str, layers: list[bytes]) -> str:
    """Push an arbitrary image made of ``layers`` with the low-level client; returns the reference."""
    image = f"{registry.host}/{repo_tag}"
    client = oci._client(image, auth_file=registry.auth_file, auth=None, plain_http=True, push=True, timeout=30,
                         retries=0, require_tag=True)
    client.login()
    descriptors, diff_ids = [], []
    for blob in layers:
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        client.push_blob(digest, blob, "a layer")
        descriptors.append({"mediaType": oci.MEDIA_LAYER, "digest": digest, "size": len(blob)})
        diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest())
    config = json.dumps({"os": "linux", "architecture": "amd64", "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    client.push_blob(config_digest, config, "config")
    client.put_manifest(repo_tag.rsplit(":", 1)[1], json.dumps({
        "schemaVersion": 2, "mediaType": oci.MEDIA_MANIFEST, "layers": descriptors,
        "config": {"mediaType": oci.MEDIA_CONFIG, "digest": config_digest, "size": len(config)}}).encode())
    client.close()
    return image


def test_pulling_an_artifact_says_it_is_not_an_image(registry, tmp_path):
    image = f"{registry.host}/artifacts/model:1"
    client = oci._client(image, auth_file=registry.auth_file, auth=None, plain_http=True, push=True, timeout=30,
                         retries=0, require_tag=True)
    client.login()
    blob, config = b"weights", b"{}"
    for data in (blob, config):
        client.push_blob("sha256:" + hashlib.sha256(data).hexdigest(), data, "blob")
    client.put_manifest("1", json.dumps({"schemaVersion": 2, "mediaType": oci.MEDIA_MANIFEST, "config": {
        "mediaType": "application/vnd.cncf.model.config.v1+json", "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
        "size": 2}, "layers": [{"mediaType": "application/vnd.cncf.model.weight.v1.raw", "size": len(blob),
                                "digest": "sha256:" + hashlib.sha256(blob).hexdigest()}]}).encode())
    client.close()
    with pytest.raises(oci.NotAnAdapter, match="is an OCI artifact .*vnd.cncf.model.config"):
        oci.pull_adapter(image, tmp_path / "out", auth_file=registry.auth_file, plain_http=True)


def test_pulling_a_dataset_image_as_an_adapter_says_it_is_not_one(registry, tmp_path):
    image = _push_image(registry, "datasets/chat:1", [_layer([("data/train.parquet", "file", b"PAR1")])])
    with pytest.raises(oci.NotAnAdapter, match=r"is not an adapter: it has no /data/adapter_config.json .*train.parquet"):
        oci.pull_adapter(image, tmp_path / "out", auth_file=registry.auth_file, plain_http=True)
    assert list((tmp_path / "out").iterdir()) == []  # nothing left behind


def test_pull_data_takes_the_whole_data_dir_across_layers(registry, tmp_path):
    image = _push_image(registry, "datasets/layered:1", [
        _layer([("bin/sh", "file", b"busybox"), ("data/", "dir", None), ("data/old.jsonl", "file", b"old"),
                ("data/sub/a.jsonl", "file", b"a")]),
        _layer([("./data/.wh.old.jsonl", "file", b""), ("data/sub/b.jsonl", "file", b"b"),
                ("data/sub/b-link.jsonl", "hardlink", "data/sub/b.jsonl")]),
    ])
    result = oci.pull_data(image, tmp_path / "mnt", auth_file=registry.auth_file, plain_http=True)
    assert result.files == ["sub/a.jsonl", "sub/b-link.jsonl", "sub/b.jsonl"]
    assert (tmp_path / "mnt" / "sub" / "b-link.jsonl").read_bytes() == b"b"
    assert not (tmp_path / "mnt" / "bin").exists()

    empty = _push_image(registry, "datasets/empty:1", [_layer([("etc/hosts", "file", b"x")])])
    with pytest.raises(oci.NoDataInImage, match="has no files under /data"):
        oci.pull_data(empty, tmp_path / "other", auth_file=registry.auth_file, plain_http=True)


@pytest.mark.parametrize("entries, message", [
    ([("data/../../escape.txt", "file", b"x")], "points outside"),
    ([("data/adapter_config.json", "symlink", "/etc/passwd")], "is a symbolic link"),
    ([("data", "symlink", "/etc")], "/data is not a directory"),
    ([("data/link", "hardlink", "etc/shadow")], "leaves /data"),
])
def test_a_layer_that_would_write_outside_dest_is_refused(registry, tmp_path, entries, message):
    image = _push_image(registry, "hostile/layer:1", [_layer(entries)])
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(oci.UnsafeImage, match=message):
        oci.pull_adapter(image, dest, auth_file=registry.auth_file, plain_http=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "dest"]


def test_pull_refuses_a_non_empty_destination_and_a_missing_image(fake_adapter, registry, tmp_path):
    pushed = _push(fake_adapter, registry, "adapters/dest:1")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(oci.DestinationNotEmpty, match="is not empty"):
        oci.pull_adapter(pushed.reference, tmp_path / "busy", auth_file=registry.auth_file, plain_http=True)
    with pytest.raises(oci.ImageNotFound, match=f"{registry.host}/adapters/dest:nope not found .*MANIFEST_UNKNOWN"):
        oci.pull_adapter(f"{registry.host}/adapters/dest:nope", tmp_path / "x", auth_file=registry.auth_file,
                         plain_http=True)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# LocalRegistry (tests and demo)


def test_local_registry_cleans_up_and_checks_its_password(registry):
    from kaito_tuning.dev.localregistry import LocalRegistry

    with LocalRegistry(user="demo", password="pw") as reg:
        proc, root = reg._proc, reg.root
        config = json.loads(Path(reg.auth_file).read_text())
        assert base64.b64decode(config["auths"][reg.host]["auth"]) == b"demo:pw"
        assert requests.get(f"{reg.url}/v2/", auth=("demo", "pw"), timeout=5).status_code == 200
        assert requests.get(f"{reg.url}/v2/", auth=("demo", "bad"), timeout=5).status_code == 401
    assert proc.poll() is not None and not root.exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{reg.url}/v2/", timeout=2)


def test_local_registry_without_the_binary_says_what_to_install(monkeypatch):
    from kaito_tuning.dev import localregistry

    monkeypatch.setattr(localregistry.shutil, "which", lambda name: None)
    with pytest.raises(localregistry.RegistryNotInstalled, match="apt-get install docker-registry"):
        localregistry.LocalRegistry().start()


def test_pull_through_a_multi_platform_index_takes_linux_amd64(fake_adapter, registry, tmp_path):
    pushed = _push(fake_adapter, registry, "adapters/indexed:img")
    other = _push(make_fake_adapter(tmp_path / "other", seed=7), registry, "adapters/indexed:arm")

    def size(tag: str) -> int:
        return len(requests.get(f"{registry.url}/v2/adapters/indexed/manifests/{tag}", headers={
            "Accept": oci.MEDIA_MANIFEST}, auth=(REGISTRY_USER, REGISTRY_PASSWORD)).content)

    index = {"schemaVersion": 2, "mediaType": oci.MEDIA_INDEX, "manifests": [
        {"mediaType": oci.MEDIA_MANIFEST, "digest": other.digest, "size": size("arm"),
         "platform": {"os": "linux", "architecture": "arm64"}},
        {"mediaType": oci.MEDIA_MANIFEST, "digest": pushed.digest, "size": size("img"),
         "platform": {"os": "linux", "architecture": "amd64"}}]}
    resp = requests.put(f"{registry.url}/v2/adapters/indexed/manifests/multi", data=json.dumps(index),
                        auth=(REGISTRY_USER, REGISTRY_PASSWORD), headers={"Content-Type": oci.MEDIA_INDEX})
    assert resp.status_code == 201, resp.text
    oci.pull_adapter(f"{registry.host}/adapters/indexed:multi", tmp_path / "out", auth_file=registry.auth_file,
                     plain_http=True)
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == \
        (fake_adapter / "adapter_model.safetensors").read_bytes()


def test_auth_folder_merges_several_pull_secrets(tmp_path):
    """Several imagePullSecrets are mounted as one folder of <secret>.json files; the first entry per registry wins."""
    import base64
    import json

    from kaito_tuning.artifacts.oci import credentials_for, load_auth

    def entry(user):
        return {"auth": base64.b64encode(f"{user}:pw".encode()).decode()}

    (tmp_path / "a.json").write_text(json.dumps({"auths": {"reg.example.com": entry("first")}}))
    (tmp_path / "b.json").write_text(json.dumps({"auths": {"reg.example.com": entry("second"),
                                                           "other.example.com": entry("other")}}))
    auths, source = load_auth(tmp_path)
    assert set(auths) == {"reg.example.com", "other.example.com"}
    assert credentials_for(auths, "reg.example.com", source).username == "first"
    assert credentials_for(auths, "other.example.com", source).username == "other"
