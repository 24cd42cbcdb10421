"""Credentials: every form of a dockerconfigjson entry, folders of pull secrets, and no secret ever shown."""

from __future__ import annotations

import base64
import json

import pytest
from fixtures_registry import REGISTRY_PASSWORD, REGISTRY_USER

from kaito_tuning.artifacts import auth, push_adapter
from kaito_tuning.artifacts.errors import InvalidAuthFile


def test_username_password_entry_and_a_whole_secret_are_accepted(fake_adapter, registry, tmp_path):
    plain = {"auths": {registry.host: {"username": REGISTRY_USER, "password": REGISTRY_PASSWORD}}}
    assert push_adapter(fake_adapter, f"{registry.host}/creds/plain:1", auth=plain, plain_http=True).digest
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson", "data": {
        ".dockerconfigjson": base64.b64encode(json.dumps(plain).encode()).decode()}}
    path = tmp_path / "secret.json"
    path.write_text(json.dumps(secret))
    result = push_adapter(fake_adapter, f"{registry.host}/creds/secret:1", auth_file=path, plain_http=True)
    assert result.digest.startswith("sha256:")
    string_data = {"kind": "Secret", "stringData": {".dockerconfigjson": json.dumps(plain)}}
    auths, source = auth.load_auth(auth=string_data)
    assert auth.credentials_for(auths, registry.host, source).password == REGISTRY_PASSWORD


@pytest.mark.parametrize("content, message", [
    ("{not json", r"is not valid JSON .*line 1 column 2"),
    ('["a"]', "must be a JSON object"),
    ('{"credsStore": "desktop"}', 'has no "auths" map'),
    ('{"auths": {"other.example.com": {"auth": "dTpw"}}}', r"has no credentials for registry HOST .*other.example.com"),
    ('{"auths": {"HOST": {"auth": "not base64!"}}}', r"auths\[HOST\].auth must be base64"),
    ('{"auths": {"HOST": {"email": "x@example.com"}}}', "has no auth, username/password or identitytoken"),
    ('{"kind": "Secret", "data": {".dockerconfigjson": "%%%"}}', "is not base64 of a JSON object"),
    ('{"kind": "Secret", "data": {"other": "e30="}}', "Secret without .dockerconfigjson"),
])
def test_bad_auth_file_is_refused_before_any_network(fake_adapter, tmp_path, content, message):
    host = "registry.invalid:5000"
    path = tmp_path / "config.json"
    path.write_text(content.replace("HOST", host))
    with pytest.raises(InvalidAuthFile, match=message.replace("HOST", host)) as e:
        push_adapter(fake_adapter, f"{host}/a/b:1", auth_file=path)
    assert e.value.exit_code == 65
    with pytest.raises(InvalidAuthFile, match="does not exist"):
        push_adapter(fake_adapter, f"{host}/a/b:1", auth_file=tmp_path / "missing.json")


def test_an_oversized_or_binary_auth_file_is_refused(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b" " * ((1 << 20) + 1))
    with pytest.raises(InvalidAuthFile, match="larger than 1 MiB"):
        auth.load_auth(big)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(InvalidAuthFile, match="is not UTF-8"):
        auth.load_auth(binary)


def test_every_entry_form_gives_the_right_credentials():
    b64 = base64.b64encode(b"alice:pa:ss").decode()
    auths = {
        "a.example.com": {"auth": b64},
        "https://b.example.com/v2/": {"username": "bob", "password": ""},
        "c.example.com": {"username": "<token>", "identitytoken": "refresh-xyz"},
        "d.example.com": {"registrytoken": "bearer-xyz"},
    }
    a = auth.credentials_for(auths, "a.example.com")
    assert (a.username, a.password) == ("alice", "pa:ss")  # only the first colon separates
    b = auth.credentials_for(auths, "b.example.com")
    assert (b.username, b.password) == ("bob", "")
    assert auth.credentials_for(auths, "c.example.com").identity_token == "refresh-xyz"
    assert auth.credentials_for(auths, "d.example.com").registry_token == "bearer-xyz"
    assert auth.credentials_for(None, "a.example.com").anonymous


def test_legacy_dockercfg_has_hosts_at_the_top(tmp_path):
    path = tmp_path / ".dockercfg"
    path.write_text(json.dumps({"r.example.com": {"auth": base64.b64encode(b"u:p").decode()}}))
    auths, source = auth.load_auth(path)
    assert auth.credentials_for(auths, "r.example.com", source).username == "u"


def test_docker_hub_entries_match_every_spelling():
    auths = {"https://index.docker.io/v1/": {"username": "u", "password": "p"}}
    for name in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        assert auth.credentials_for(auths, name).username == "u"
    with pytest.raises(InvalidAuthFile, match="no credentials for registry ghcr.io"):
        auth.credentials_for(auths, "ghcr.io")


def test_auth_folder_merges_several_pull_secrets(tmp_path):
    """Several imagePullSecrets are mounted as one folder of <secret>.json files; the first entry per registry wins."""
    def entry(user):
        return {"auth": base64.b64encode(f"{user}:pw".encode()).decode()}

    (tmp_path / "a.json").write_text(json.dumps({"auths": {"reg.example.com": entry("first")}}))
    (tmp_path / "b.json").write_text(json.dumps({"auths": {"reg.example.com": entry("second"),
                                                           "other.example.com": entry("other")}}))
    (tmp_path / "notes.txt").write_text("ignored")
    auths, source = auth.load_auth(tmp_path)
    assert set(auths) == {"reg.example.com", "other.example.com"}
    assert auth.credentials_for(auths, "reg.example.com", source).username == "first"
    assert auth.credentials_for(auths, "other.example.com", source).username == "other"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidAuthFile, match="holds no .json files"):
        auth.load_auth(empty)


def test_no_secret_in_reprs_or_messages(tmp_path):
    secret = "s3cr3t-Passw0rd"
    creds = auth.Credentials(username="u", password=secret, identity_token=secret, registry_token=secret)
    assert secret not in repr(creds) and secret not in str(creds)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"auths": {"r.io": {"auth": "' + secret + '"}')  # unterminated
    with pytest.raises(InvalidAuthFile) as e:
        auth.load_auth(bad_json)
    assert secret not in str(e.value)
    with pytest.raises(InvalidAuthFile) as e:
        auth.credentials_for({"r.io": {"auth": secret}}, "r.io")
    assert secret not in str(e.value)
