"""The registry protocol (oras-py, configured in artifacts/registry.py) against a real docker-registry.

Auth (Basic, Bearer with password or identity token), bounded retries of transient failures only,
credentials only ever sent to the registry itself, plain HTTP only when asked, capped reads.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import time

import pytest
from fixtures_registry import REGISTRY_PASSWORD, REGISTRY_USER, HttpStub, make_fake_adapter, self_signed_cert

from kaito_tuning.artifacts import pull_adapter, push_adapter
from kaito_tuning.artifacts import registry as reg_mod
from kaito_tuning.artifacts.errors import (
    ImageTooLarge,
    RegistryAuthFailed,
    RegistryError,
    RegistryRejected,
    RegistryUnreachable,
)
from kaito_tuning.artifacts.registry import parse_challenge

ADAPTER_BYTES = "adapter_model.safetensors"


def _creds(host: str, user: str = REGISTRY_USER, password: str = REGISTRY_PASSWORD) -> dict:
    return {"auths": {host: {"username": user, "password": password}}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_oras_speaks_the_protocol():
    """The client is oras-py's; only what the module doc lists is ours."""
    import oras.auth
    import oras.provider

    assert issubclass(reg_mod.Registry, oras.provider.Registry)
    assert issubclass(reg_mod._Auth, oras.auth.TokenAuth)
    assert "upload_blob" not in reg_mod.Registry.__dict__ and "get_blob" not in reg_mod.Registry.__dict__


def test_parse_challenge():
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:a/b:pull,push",error="insufficient_scope"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example.com/token", "service": "registry.example.com",
                      "scope": "repository:a/b:pull,push", "error": "insufficient_scope"}
    assert parse_challenge('Basic realm="my realm"') == ("basic", {"realm": "my realm"})
    assert parse_challenge(None) == ("", {})


# ---------------------------------------------------------------------------------------------
# auth


def test_bearer_token_flow_with_password_and_identity_token(fake_adapter, token_registry, tmp_path):
    reg, tokens = token_registry
    tokens.requests.clear()
    pushed = push_adapter(fake_adapter, f"{reg.host}/bearer/adapter:1", auth_file=reg.auth_file, plain_http=True)
    method, params = tokens.requests[0]
    assert (method, params["service"], params["scope"]) == ("GET", tokens.SERVICE, "repository:bearer/adapter:pull,push")

    tokens.requests.clear()
    refresh = {"auths": {reg.host: {"username": "<token>", "identitytoken": tokens.REFRESH_TOKEN}}}
    pulled = pull_adapter(f"{reg.host}/bearer/adapter:1", tmp_path / "out", auth=refresh, plain_http=True)
    assert pulled.digest == pushed.digest
    method, form = tokens.requests[0]
    assert (method, form["grant_type"], form["scope"]) == ("POST", "refresh_token", "repository:bearer/adapter:pull")

    bad = {"auths": {reg.host: {"username": REGISTRY_USER, "password": "wrong"}}}
    with pytest.raises(RegistryAuthFailed, match=f"authentication failed for {reg.host}") as e:
        push_adapter(fake_adapter, f"{reg.host}/bearer/adapter:2", auth=bad, plain_http=True)
    assert "wrong" not in str(e.value)
    with pytest.raises(RegistryAuthFailed, match=f"registry {reg.host} requires credentials to pull"):
        pull_adapter(f"{reg.host}/bearer/adapter:1", tmp_path / "anon", plain_http=True)


def test_wrong_password_fails_fast_and_says_so(fake_adapter, registry, no_sleep):
    bad = {"auths": {registry.host: {"auth": base64.b64encode(f"{REGISTRY_USER}:nope".encode()).decode()}}}
    start = time.monotonic()
    with pytest.raises(RegistryAuthFailed, match=f"authentication failed for {registry.host}: wrong user name") as e:
        push_adapter(fake_adapter, f"{registry.host}/a/b:1", auth=bad, plain_http=True)
    assert time.monotonic() - start < 10 and no_sleep == []  # no retries on 401
    assert e.value.exit_code == 65 and "nope" not in str(e.value)


def test_wrong_password_fails_fast_without_patching_any_sleep(fake_adapter, registry):
    """oras's own retry decorator would sleep 3+5+11+29+83 s here; nothing may sleep at all."""
    bad = _creds(registry.host, password="nope")
    start = time.monotonic()
    with pytest.raises(RegistryAuthFailed):
        push_adapter(fake_adapter, f"{registry.host}/a/b:1", auth=bad, plain_http=True)
    assert time.monotonic() - start < 5


def test_no_credentials_for_a_registry_that_wants_them(fake_adapter, registry):
    with pytest.raises(RegistryAuthFailed, match="requires credentials .*--auth-file"):
        push_adapter(fake_adapter, f"{registry.host}/a/b:1", plain_http=True)


# ---------------------------------------------------------------------------------------------
# transient failures: retried a bounded number of times; nothing else is


def test_unreachable_registry_is_retried_a_bounded_number_of_times(fake_adapter, no_sleep):
    port = _free_port()
    with pytest.raises(RegistryUnreachable, match=rf"cannot reach registry 127.0.0.1:{port}.*tried 4 times") as e:
        push_adapter(fake_adapter, f"127.0.0.1:{port}/a/b:1", auth=_creds(f"127.0.0.1:{port}", "u", "p"),
                     plain_http=True)
    assert no_sleep == [1.0, 2.0, 4.0] and e.value.exit_code == 75


def test_tls_is_the_default(fake_adapter, registry, no_sleep):
    with pytest.raises(RegistryUnreachable, match="TLS handshake .* --plain-http"):
        push_adapter(fake_adapter, f"{registry.host}/a/b:1", auth_file=registry.auth_file)
    assert no_sleep == []


def _flaky(seen: set):
    """503 to the first try of each (method, path); then forward to the registry."""
    def handle(stub, req):
        key = (req["method"], req["path"].split("?")[0])
        if key not in seen:
            seen.add(key)
            return 503, {}, b""
        return None
    return handle


def test_transient_5xx_is_retried_and_the_push_succeeds(fake_adapter, registry, no_sleep, tmp_path):
    """A proxy that fails the first try of every distinct request with 503: uploads must be re-sent."""
    with HttpStub(registry.url, _flaky(set())) as proxy:
        result = push_adapter(fake_adapter, f"{proxy.host}/flaky/adapter:1", auth=_creds(proxy.host), plain_http=True)
    assert len(no_sleep) >= 5 and set(no_sleep) == {1.0}
    pulled = pull_adapter(f"{registry.host}/flaky/adapter:1", tmp_path / "out", auth_file=registry.auth_file,
                          plain_http=True)
    assert pulled.digest == result.digest
    assert (tmp_path / "out" / ADAPTER_BYTES).read_bytes() == (fake_adapter / ADAPTER_BYTES).read_bytes()


def test_retry_after_is_honoured_and_capped(fake_adapter, registry, no_sleep):
    tries = []

    def handle(stub, req):
        tries.append(req["path"])
        if len(tries) <= 2:
            return 429, {"Retry-After": "7" if len(tries) == 1 else "3600"}, b""
        return None
    with HttpStub(registry.url, handle) as proxy:
        push_adapter(fake_adapter, f"{proxy.host}/flaky/later:1", auth=_creds(proxy.host), plain_http=True)
    assert no_sleep == [7.0, 30.0]


def test_a_download_that_breaks_off_is_started_again(fake_adapter, registry, no_sleep, tmp_path):
    pushed = push_adapter(fake_adapter, f"{registry.host}/flaky/cut:1", auth_file=registry.auth_file, plain_http=True)
    cut = set()

    def handle(stub, req):
        if req["method"] == "GET" and "/blobs/" in req["path"] and req["path"] not in cut:
            cut.add(req["path"])
            status, headers, body = stub.forward(req)
            return status, headers, body, len(body) // 2
        return None
    with HttpStub(registry.url, handle) as proxy:
        pulled = pull_adapter(f"{proxy.host}/flaky/cut:1", tmp_path / "out", plain_http=True, auth=_creds(proxy.host))
    assert pulled.digest == pushed.digest and no_sleep == [1.0]
    assert (tmp_path / "out" / ADAPTER_BYTES).read_bytes() == (fake_adapter / ADAPTER_BYTES).read_bytes()


def test_persistent_5xx_gives_up_with_the_status(no_sleep, tmp_path):
    with HttpStub(None, lambda stub, req: (503, {}, b"")) as proxy:
        with pytest.raises(RegistryError, match=f"registry {proxy.host} answered 503 .* 4 times") as e:
            pull_adapter(f"{proxy.host}/a/b:1", tmp_path / "out", plain_http=True)
    assert no_sleep == [1.0, 2.0, 4.0] and not (tmp_path / "out").exists() and e.value.exit_code == 75


# ---------------------------------------------------------------------------------------------
# credentials go to the registry only (issue 11 item 2)


def test_upload_location_and_blob_redirect_on_another_host_get_no_credentials(fake_adapter, registry, tmp_path):
    """Registries hand uploads and downloads to storage elsewhere (S3, a CDN) by URL: the URL is the
    authorization there, our credentials must not follow. Here the storage host forwards to the
    registry with credentials of its own, as a signed URL would be honoured."""
    basic = "Basic " + base64.b64encode(f"{REGISTRY_USER}:{REGISTRY_PASSWORD}".encode()).decode()
    storage = HttpStub(registry.url, lambda stub, req: stub.forward(req, headers={"Authorization": basic},
                                                                    host=front.host))

    def front_handle(stub, req):
        if req["method"] == "GET" and "/blobs/sha256:" in req["path"]:
            return 307, {"Location": f"{storage.url}{req['path']}?sig=signed-by-registry"}, b""
        status, headers, body = stub.forward(req)
        if req["method"] == "POST" and "Location" in headers:  # the upload session lives on the storage host
            headers["Location"] = headers["Location"].replace(f"http://{front.host}", storage.url)
        return status, headers, body

    front = HttpStub(registry.url, front_handle)
    with front, storage:
        pushed = push_adapter(fake_adapter, f"{front.host}/elsewhere/adapter:1", auth=_creds(front.host),
                              plain_http=True)
        pulled = pull_adapter(f"{front.host}/elsewhere/adapter:1", tmp_path / "out", auth=_creds(front.host),
                              plain_http=True)
    assert pulled.digest == pushed.digest
    assert (tmp_path / "out" / ADAPTER_BYTES).read_bytes() == (fake_adapter / ADAPTER_BYTES).read_bytes()
    uploads = [r for r in storage.seen if r["method"] == "PUT"]
    downloads = [r for r in storage.seen if r["method"] == "GET"]
    assert len(uploads) == 2 and len(downloads) == 1  # layer + config; the layer
    assert all("Authorization" not in r["headers"] for r in storage.seen)
    assert any(r["headers"].get("Authorization") == basic for r in front.seen)  # the registry itself gets them


def test_a_redirect_from_https_to_plain_http_is_refused(tmp_path, monkeypatch):
    cert, key = self_signed_cert(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", cert)
    with HttpStub(None, lambda stub, req: (200, {}, b"{}")) as plain:
        def handle(stub, req):
            if req["path"] == "/v2/":
                return 200, {}, b"{}"
            return 307, {"Location": f"{plain.url}{req['path']}"}, b""
        with HttpStub(None, handle, tls=(cert, key)) as tls:
            with pytest.raises(RegistryRejected, match="redirected GET .* to http://.*refused"):
                pull_adapter(f"{tls.host}/a/b:1", tmp_path / "out", auth=_creds(tls.host))
    assert plain.seen == []


def test_a_token_realm_over_plain_http_is_refused_for_an_https_registry(tmp_path, monkeypatch):
    cert, key = self_signed_cert(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", cert)
    with HttpStub(None, lambda stub, req: (200, {}, b'{"token": "t"}')) as realm:
        challenge = {"WWW-Authenticate": f'Bearer realm="{realm.url}/token",service="s"'}
        with HttpStub(None, lambda stub, req: (401, challenge, b""), tls=(cert, key)) as tls:
            with pytest.raises(RegistryRejected, match=r"credentials at http://127.0.0.1:\d+/token over plain HTTP"):
                push_adapter(make_fake_adapter(tmp_path / "a"), f"{tls.host}/a/b:1", auth=_creds(tls.host))
    assert realm.seen == []  # the password never left


def test_the_token_service_gets_the_password_only_over_https_unless_plain_http(fake_adapter, token_registry):
    """The token registry's realm is plain HTTP: accepted because the registry is used with --plain-http."""
    reg, tokens = token_registry
    tokens.requests.clear()
    push_adapter(fake_adapter, f"{reg.host}/bearer/plain:1", auth_file=reg.auth_file, plain_http=True)
    assert tokens.requests


# ---------------------------------------------------------------------------------------------
# capped reads (issue 11 item 10)


def _hostile(manifest: bytes | None = None, blob: bytes | None = None):
    def handle(stub, req):
        if req["path"] == "/v2/":
            return 200, {}, b"{}"
        if "/manifests/" in req["path"] and manifest is not None:
            return 200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, manifest
        if "/blobs/" in req["path"] and blob is not None:
            return 200, {}, blob
        return 404, {}, b'{"errors": [{"code": "NOT_FOUND", "message": "no"}]}'
    return handle


def test_an_oversized_manifest_is_refused_without_reading_it_all(tmp_path):
    huge = b'{"schemaVersion": 2, "x": "' + b"a" * (5 << 20) + b'"}'
    with HttpStub(None, _hostile(manifest=huge)) as bad:
        with pytest.raises(ImageTooLarge, match="manifest larger than 4 MiB"):
            pull_adapter(f"{bad.host}/a/b:1", tmp_path / "out", plain_http=True)
    assert not (tmp_path / "out").exists()


def test_a_blob_larger_than_its_manifest_says_is_refused(tmp_path):
    blob = b"\0" * (3 << 20)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": "sha256:" + "0" * 64, "size": 2},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 100,
                                       "digest": "sha256:" + hashlib.sha256(blob[:100]).hexdigest()}]}).encode()
    with HttpStub(None, _hostile(manifest=manifest, blob=blob)) as bad:
        with pytest.raises(ImageTooLarge, match="is 3145728 bytes, not the 100 its manifest says"):
            pull_adapter(f"{bad.host}/a/b:1", tmp_path / "out", plain_http=True)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_blob_with_another_digest_is_refused(tmp_path):
    blob = b"x" * 100
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": "sha256:" + "0" * 64, "size": 2},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 100,
                                       "digest": "sha256:" + "1" * 64}]}).encode()
    with HttpStub(None, _hostile(manifest=manifest, blob=blob)) as bad:
        with pytest.raises(RegistryError, match="arrived with a different size or digest"):
            pull_adapter(f"{bad.host}/a/b:1", tmp_path / "out", plain_http=True, retries=0)


def test_a_huge_error_body_is_not_read_whole(fake_adapter, tmp_path):
    """Any answer other than a manifest or blob is read at most 1 MiB."""
    def handle(stub, req):
        if req["path"] == "/v2/":
            return 200, {}, b"{}"
        return 400, {}, b"E" * (8 << 20)
    with HttpStub(None, handle) as bad:
        with pytest.raises((RegistryRejected, RegistryError)) as e:
            push_adapter(fake_adapter, f"{bad.host}/a/b:1", plain_http=True)
    assert len(str(e.value)) < 1000
