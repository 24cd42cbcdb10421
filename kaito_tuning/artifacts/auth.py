"""Registry credentials from a docker config.json, a ``kubernetes.io/dockerconfigjson`` Secret, or a folder of them.

Accepted: ``auths[host].auth`` (base64 of ``user:password``), ``username``/``password``,
``identitytoken`` (an OAuth2 refresh token, exchanged at the registry's token service),
``registrytoken`` (a bearer token used as is), a legacy ``.dockercfg`` (hosts at the top level), a
whole Secret manifest (``data`` or ``stringData``), and a folder of such files (several
imagePullSecrets mounted together: the first file, in name order, with an entry for a registry wins).
Nothing here ever puts a password or token into a message or a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kaito_tuning.artifacts.errors import InvalidAuthFile

_EXAMPLE = '{"auths": {"REGISTRY": {"auth": "<base64 of user:password>"}}}'
_DOCKER_HUB_NAMES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
_MAX_AUTH_FILE_BYTES = 1 << 20  # a config.json is a few hundred bytes; a Secret is at most 1 MiB


@dataclass(frozen=True)
class Credentials:
    username: str | None = None
    password: str | None = None
    identity_token: str | None = None  #: OAuth2 refresh token, exchanged at the token endpoint
    registry_token: str | None = None  #: a bearer token used as is

    def __repr__(self) -> str:  # never print secrets
        return f"Credentials(username={self.username!r}, ...)"

    @property
    def anonymous(self) -> bool:
        return not (self.username or self.password or self.identity_token or self.registry_token)


ANONYMOUS = Credentials()


def _host_key(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``index.docker.io``: how config.json keys name registries."""
    key = re.sub(r"^[a-z]+://", "", key.strip().lower())
    return key.split("/", 1)[0]


def load_auth(auth_file: str | os.PathLike | None = None, auth: dict | None = None) -> tuple[dict | None, str]:
    """The ``auths`` map of a docker config.json, a Secret's ``.dockerconfigjson`` or a legacy .dockercfg.

    Returns (auths or None when no credentials were given, a name for messages).
    """
    if auth is None and auth_file is None:
        return None, "no credentials"
    if auth is None and Path(auth_file).is_dir():
        return _load_auth_dir(Path(auth_file))
    source = str(auth_file) if auth is None else "the auth config"
    if auth is None:
        auth = _read_json(Path(auth_file), source)
    if not isinstance(auth, dict):
        raise InvalidAuthFile(f"{source} must be a JSON object like {_EXAMPLE}")
    if auth.get("kind") == "Secret":  # a whole kubernetes.io/dockerconfigjson Secret
        auth = _secret_config(auth, source)
    if "auths" in auth:
        auths = auth["auths"]
    elif auth and all(isinstance(v, dict) and ("auth" in v or "username" in v) for v in auth.values()):
        auths = auth  # legacy .dockercfg: hosts at the top level
    else:
        raise InvalidAuthFile(f"{source} has no \"auths\" map; expected a docker config.json: {_EXAMPLE}")
    if not isinstance(auths, dict):
        raise InvalidAuthFile(f"{source}: \"auths\" must be a map of registry host to credentials")
    return auths, source


def _read_json(path: Path, source: str):
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_AUTH_FILE_BYTES + 1)
    except FileNotFoundError:
        raise InvalidAuthFile(f"auth file {source} does not exist") from None
    except OSError as e:
        raise InvalidAuthFile(f"cannot read auth file {source}: {e.strerror or e}") from None
    if len(raw) > _MAX_AUTH_FILE_BYTES:
        raise InvalidAuthFile(f"auth file {source} is larger than {_MAX_AUTH_FILE_BYTES >> 20} MiB; "
                              "it is not a docker config.json")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidAuthFile(f"auth file {source} is not UTF-8 text; expected a docker config.json") from None
    except json.JSONDecodeError as e:  # e.msg and position only: the document itself may hold secrets
        raise InvalidAuthFile(f"auth file {source} is not valid JSON ({e.msg} at line {e.lineno} column "
                              f"{e.colno}); expected a docker config.json: {_EXAMPLE}") from None


def _load_auth_dir(folder: Path) -> tuple[dict, str]:
    """Every ``*.json`` (or ``.dockerconfigjson``) in ``folder`` merged, in name order; the first
    file with an entry for a registry wins. This is how several imagePullSecrets reach one pull."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix == ".json" or p.name == ".dockerconfigjson"))
    if not files:
        raise InvalidAuthFile(f"auth folder {folder} holds no .json files")
    merged: dict = {}
    for f in files:
        auths, _ = load_auth(f)
        for host, entry in auths.items():
            merged.setdefault(host, entry)
    return merged, f"the auth files in {folder}"


def _secret_config(secret: dict, source: str) -> dict:
    data = secret.get("data") or {}
    string_data = secret.get("stringData") or {}
    try:
        if ".dockerconfigjson" in string_data:
            return json.loads(string_data[".dockerconfigjson"])
        if ".dockerconfigjson" in data:
            return json.loads(base64.b64decode(data[".dockerconfigjson"], validate=True))
    except (ValueError, binascii.Error, TypeError):
        raise InvalidAuthFile(f"{source}: the Secret's .dockerconfigjson is not base64 of a JSON object") from None
    raise InvalidAuthFile(f"{source} is a Secret without .dockerconfigjson; "
                          "use a secret of type kubernetes.io/dockerconfigjson")


def credentials_for(auths: dict | None, registry: str, source: str = "the auth file") -> Credentials:
    """The credentials ``auths`` holds for ``registry``; anonymous when no auths were given at all."""
    if auths is None:
        return ANONYMOUS
    want = _host_key(registry)
    names = _DOCKER_HUB_NAMES if want in _DOCKER_HUB_NAMES else {want}
    key = next((k for k in auths if _host_key(k) in names), None)
    if key is None:
        have = ", ".join(sorted(auths)) or "none"
        raise InvalidAuthFile(f"{source} has no credentials for registry {registry} (it has entries for: {have}); "
                              f"add auths[\"{registry}\"]", field=f"auths[{registry}]")
    entry, where = auths[key], f"auths[{key}]"
    if not isinstance(entry, dict):
        raise InvalidAuthFile(f"{source}: {where} must be an object", field=where)
    if entry.get("registrytoken"):
        return Credentials(registry_token=str(entry["registrytoken"]))
    if entry.get("identitytoken"):
        return Credentials(username=entry.get("username"), identity_token=str(entry["identitytoken"]))
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(str(entry["auth"]), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, sep, password = "", "", ""
        if not sep or not user:
            raise InvalidAuthFile(f"{source}: {where}.auth must be base64 of \"user:password\"", field=where)
        return Credentials(username=user, password=password)
    if entry.get("username") and entry.get("password") is not None:
        return Credentials(username=str(entry["username"]), password=str(entry["password"]))
    raise InvalidAuthFile(f"{source}: {where} has no auth, username/password or identitytoken", field=where)
