"""Adapters as OCI images: push an adapter directory, pull it back, pull a dataset image's /data.

The image is what Kaito's inference consumes (its skopeo puller, containerd, image volumes): an
ordinary single-layer OCI *image* whose one gzip tar layer holds ``data/adapter_config.json``,
``data/adapter_model.safetensors`` and our extra files (``training_metadata.json``, a README, ...),
with a valid image config (os, architecture, ``rootfs.diff_ids``). The same adapter files always give
the same digest: entries are sorted, owned by 0:0 with no user names, mtime 0, and the gzip header
carries no name or time.

The registry is spoken to directly over the OCI distribution API with ``requests`` (monolithic blob
upload, manifest PUT, Basic or Bearer-token auth chosen from ``WWW-Authenticate``). Only transient
failures (connection errors, 429, 5xx) are retried, a few times with backoff; 401/403 fail at once.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import requests

from kaito_tuning import __version__
from kaito_tuning.artifacts import reference as imageref
from kaito_tuning.errors import TransientError, UserError

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_MANIFEST_ACCEPT = ", ".join([MEDIA_MANIFEST, MEDIA_INDEX, DOCKER_MANIFEST, DOCKER_LIST])
#: layer media types we can unpack (gzip or plain tar; OCI, non-distributable and Docker spellings)
_TAR_LAYERS = re.compile(r"^application/vnd\.(oci\.image\.layer(\.nondistributable)?\.v1\.tar(\+gzip)?"
                         r"|docker\.image\.rootfs\.(foreign\.)?diff\.tar(\.gzip)?)$")

from kaito_tuning.contract import ADAPTER_CONFIG, ADAPTER_WEIGHTS, METADATA_FILE  # noqa: E402

#: files of the adapter directory that never go into the image: checkpoints and trainer state
_EXCLUDED = re.compile(r"^\.|\.(bin|pt|pth|ckpt|tmp|lock)$|^progress\.json$")

#: retries of transient failures and the sleeps between them (seconds); 401/403 are never retried
RETRIES = 3
_BACKOFF_S = (1.0, 2.0, 4.0)
_CONNECT_TIMEOUT_S = 10.0
DEFAULT_TIMEOUT_S = 120.0
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
# errors


class InvalidImageReference(UserError):
    reason = "InvalidImageReference"


class InvalidAuthFile(UserError):
    reason = "InvalidAuthFile"


class RegistryAuthFailed(UserError):
    """Wrong or missing credentials, or credentials without the needed permission: fix the secret."""

    reason = "RegistryAuthFailed"


class RegistryUnreachable(TransientError):
    reason = "RegistryUnreachable"


class RegistryError(TransientError):
    """The registry kept failing (5xx, 429) or answered something we cannot use."""

    reason = "RegistryError"


class RegistryRejected(UserError):
    """The registry refused the request for a reason the user must fix (4xx other than 401/403)."""

    reason = "RegistryRejected"


class ImageNotFound(UserError):
    reason = "ImageNotFound"


class AdapterIncomplete(UserError):
    reason = "AdapterIncomplete"


class NotAnAdapter(UserError):
    reason = "NotAnAdapter"


class NoDataInImage(UserError):
    reason = "NoDataInImage"


class UnsafeImage(UserError):
    """A layer would write outside the destination (path traversal, links): refused."""

    reason = "UnsafeImageContent"


class DestinationNotEmpty(UserError):
    reason = "DestinationNotEmpty"


class InvalidAnnotation(UserError):
    reason = "InvalidAnnotation"


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class PushResult:
    reference: str  #: registry/repository:tag
    digest: str  #: sha256:... of the manifest
    size: int  #: bytes of the image: manifest + config + layer
    files: list[str] = field(default_factory=list)  #: names under /data/

    @property
    def pinned(self) -> str:
        """``registry/repository@sha256:...``, immune to the tag moving."""
        return f"{self.reference.rsplit(':', 1)[0]}@{self.digest}"

    def to_dict(self) -> dict:
        return {"reference": self.reference, "digest": self.digest, "image": self.pinned, "size": self.size,
                "files": self.files}


@dataclass(frozen=True)
class PullResult:
    reference: str
    digest: str
    dest_dir: str
    files: list[str]  #: paths relative to dest_dir, sorted

    def to_dict(self) -> dict:
        return {"reference": self.reference, "digest": self.digest, "dir": self.dest_dir, "files": self.files}


# ---------------------------------------------------------------------------------------------
# image references


def parse_reference(image: str, *, require_tag: bool) -> imageref.ImageRef:
    try:
        return imageref.parse(image, require_tag=require_tag)
    except imageref.InvalidReference as e:
        raise InvalidImageReference(str(e)) from None


# ---------------------------------------------------------------------------------------------
# credentials (a kubernetes.io/dockerconfigjson secret's content = a docker config.json)


@dataclass(frozen=True)
class Credentials:
    username: str | None = None
    password: str | None = None
    identity_token: str | None = None  #: OAuth2 refresh token, exchanged at the token endpoint
    registry_token: str | None = None  #: a bearer token used as is

    def __repr__(self) -> str:  # never print secrets
        return f"Credentials(username={self.username!r}, ...)"


_ANONYMOUS = Credentials()
_DOCKER_HUB_NAMES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}


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
        try:
            text = Path(auth_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InvalidAuthFile(f"auth file {source} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidAuthFile(f"cannot read auth file {source}: {e}") from None
        try:
            auth = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidAuthFile(f"auth file {source} is not valid JSON ({e.msg} at line {e.lineno} column "
                                  f"{e.colno}); expected a docker config.json: "
                                  '{"auths": {"REGISTRY": {"auth": "<base64 of user:password>"}}}') from None
    if not isinstance(auth, dict):
        raise InvalidAuthFile(f"{source} must be a JSON object like "
                              '{"auths": {"REGISTRY": {"auth": "<base64 of user:password>"}}}')
    if auth.get("kind") == "Secret":  # a whole kubernetes.io/dockerconfigjson Secret
        auth = _secret_config(auth, source)
    if "auths" in auth:
        auths = auth["auths"]
    elif auth and all(isinstance(v, dict) and ("auth" in v or "username" in v) for v in auth.values()):
        auths = auth  # legacy .dockercfg: hosts at the top level
    else:
        raise InvalidAuthFile(f"{source} has no \"auths\" map; expected a docker config.json: "
                              '{"auths": {"REGISTRY": {"auth": "<base64 of user:password>"}}}')
    if not isinstance(auths, dict):
        raise InvalidAuthFile(f"{source}: \"auths\" must be a map of registry host to credentials")
    return auths, source


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
    except (ValueError, binascii.Error, TypeError) as e:
        raise InvalidAuthFile(f"{source}: the Secret's .dockerconfigjson is not base64 of a JSON object ({e})") from None
    raise InvalidAuthFile(f"{source} is a Secret without .dockerconfigjson; "
                          "use a secret of type kubernetes.io/dockerconfigjson")


def credentials_for(auths: dict | None, registry: str, source: str = "the auth file") -> Credentials:
    """The credentials ``auths`` holds for ``registry``; anonymous when no auths were given at all."""
    if auths is None:
        return _ANONYMOUS
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


# ---------------------------------------------------------------------------------------------
# the registry client


def parse_challenge(header: str | None) -> tuple[str, dict[str, str]]:
    """``Bearer realm="https://a/token",service="reg",scope="repository:x:pull,push"`` -> (scheme, params)."""
    if not header:
        return "", {}
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): (q.replace('\\"', '"') if q or v == '""' else v)
              for k, v, q in re.findall(r'([A-Za-z_][\w-]*)\s*=\s*("((?:[^"\\]|\\.)*)"|[^,\s]*)', rest)}
    return scheme.lower(), params


def _error_text(resp: requests.Response) -> str:
    """The registry's own words: ``CODE: message`` from its JSON errors, else the start of the body."""
    try:
        errors = resp.json().get("errors") or []
        text = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors)
    except (ValueError, AttributeError):
        text = ""
    return text or resp.text.strip()[:200] or resp.reason or ""


class _Registry:
    """One repository on one registry, authenticated once, with bounded retries of transient failures."""

    def __init__(self, ref: imageref.ImageRef, creds: Credentials, *, plain_http: bool, push: bool,
                 timeout: float, retries: int):
        self.ref = ref
        self.host = ref.registry
        api_host = "registry-1.docker.io" if ref.registry == imageref.DOCKER_HUB else ref.registry
        self.base = f"{'http' if plain_http else 'https'}://{api_host}"
        self.plain_http = plain_http
        self.creds = creds
        self.scope = f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"
        self.timeout = (_CONNECT_TIMEOUT_S, timeout)
        self.retries = retries
        self.session = requests.Session()
        self.session.headers["User-Agent"] = f"kaito-tuning/{__version__}"
        self._authorization: str | None = None
        self._challenge: tuple[str, dict] | None = None

    def close(self) -> None:
        self.session.close()

    # -- transport ----------------------------------------------------------------------------

    def _send(self, method: str, url: str, *, body: Path | bytes | dict | None = None, what: str = "",
              headers: dict | None = None, auth_header: bool = True, **kw) -> requests.Response:
        """One request, retried on connection errors, 429 and 5xx; anything else is returned.

        ``body`` is bytes, a form dict, or a Path opened afresh for each try.
        """
        attempt = 0
        while True:
            sent = dict(headers or {})
            if auth_header and self._authorization:
                sent["Authorization"] = self._authorization
            data = open(body, "rb") if isinstance(body, Path) else body
            try:
                resp = self.session.request(method, url, data=data, headers=sent, timeout=self.timeout, **kw)
            except requests.exceptions.SSLError as e:
                raise RegistryUnreachable(
                    f"TLS handshake with registry {self.host} failed ({_short(e)}); for a local registry "
                    "without TLS pass --plain-http (plain HTTP is never used unless asked for); for a private "
                    "CA set REQUESTS_CA_BUNDLE") from None
            except (requests.ConnectionError, requests.Timeout) as e:
                if attempt == self.retries:
                    raise RegistryUnreachable(f"cannot reach registry {self.host} at {self.base} "
                                              f"({_short(e)}); tried {attempt + 1} times") from None
                _sleep(_backoff(attempt))
                attempt += 1
                continue
            finally:
                if hasattr(data, "close"):
                    data.close()
            if resp.status_code == 429 or resp.status_code >= 500:
                if attempt == self.retries:
                    raise RegistryError(f"registry {self.host} answered {resp.status_code} {resp.reason} to "
                                        f"{what} {attempt + 1} times: {_error_text(resp)}")
                retry_after = resp.headers.get("Retry-After", "")
                resp.close()
                _sleep(min(float(retry_after), 30.0) if retry_after.isdigit() else _backoff(attempt))
                attempt += 1
                continue
            if resp.status_code == 400 and self.plain_http and "HTTPS" in resp.text:
                raise RegistryUnreachable(f"registry {self.host} speaks HTTPS; drop --plain-http")
            return resp

    def request(self, method: str, path: str, *, what: str, ok: tuple[int, ...], **kw) -> requests.Response:
        """A request to the registry API (path or absolute URL); re-authenticates once on 401."""
        url = path if path.startswith(("http://", "https://")) else self.base + path
        resp = self._send(method, url, what=what, **kw)
        if resp.status_code == 401:
            self._authenticate(resp.headers.get("WWW-Authenticate"))
            resp = self._send(method, url, what=what, **kw)
        if resp.status_code in ok:
            return resp
        self._fail(resp, what)

    def _fail(self, resp: requests.Response, what: str):
        status, text = resp.status_code, _error_text(resp)
        if status == 401:
            _, params = parse_challenge(resp.headers.get("WWW-Authenticate"))
            if params.get("error") == "insufficient_scope" or self.creds is _ANONYMOUS:
                raise self._denied(text)
            raise RegistryAuthFailed(f"authentication failed for {self.host}: {text}")
        if status == 403:
            raise self._denied(text)
        if status == 404:
            raise ImageNotFound(f"{self.ref} not found on {self.host} ({what}: {text})")
        raise RegistryRejected(f"registry {self.host} refused {what}: {status} {text}")

    def _denied(self, text: str) -> RegistryAuthFailed:
        action = "push to" if self.scope.endswith("push") else "pull"
        if self.creds is _ANONYMOUS:
            return RegistryAuthFailed(f"registry {self.host} requires credentials to {action} {self.ref.repository}; "
                                      f"pass --auth-file (a docker config.json / dockerconfigjson secret): {text}")
        return RegistryAuthFailed(f"the credentials for {self.host} may not {action} {self.ref.repository}: {text}")

    # -- authentication -----------------------------------------------------------------------

    def login(self) -> None:
        """GET /v2/: learn the auth scheme from WWW-Authenticate and check the credentials once."""
        if self.creds.registry_token:
            self._authorization = f"Bearer {self.creds.registry_token}"
        resp = self._send("GET", f"{self.base}/v2/", what="GET /v2/")
        if resp.status_code == 401:
            self._authenticate(resp.headers.get("WWW-Authenticate"))
            if self._challenge and self._challenge[0] == "basic":
                resp = self._send("GET", f"{self.base}/v2/", what="GET /v2/")
                if resp.status_code == 401:
                    raise RegistryAuthFailed(f"authentication failed for {self.host}: wrong user name or password "
                                             f"for {self.creds.username!r} ({_error_text(resp)})")
        elif resp.status_code == 404:
            raise RegistryError(f"{self.base} is not an OCI registry (GET /v2/ answered 404)")
        elif resp.status_code not in (200,):
            self._fail(resp, "GET /v2/")

    def _authenticate(self, header: str | None) -> None:
        scheme, params = parse_challenge(header)
        self._challenge = (scheme, params)
        if scheme == "basic":
            if not self.creds.username or self.creds.password is None:
                raise self._denied(f"it asks for Basic auth (realm {params.get('realm', '')!r})")
            pair = f"{self.creds.username}:{self.creds.password}".encode()
            self._authorization = "Basic " + base64.b64encode(pair).decode()
        elif scheme == "bearer":
            if "realm" not in params:
                raise RegistryError(f"registry {self.host} asked for a bearer token without a realm: {header}")
            self._authorization = f"Bearer {self._fetch_token(params)}"
        else:
            raise RegistryError(f"registry {self.host} answered 401 with an auth scheme we do not know: {header!r}")

    def _fetch_token(self, params: dict[str, str]) -> str:
        """Docker/OCI token flow: user:password (GET) or an identity token (OAuth2 refresh_token POST)."""
        realm = params["realm"]
        if not realm.startswith(("https://", "http://")):
            raise RegistryError(f"registry {self.host} gave a token realm that is not a URL: {realm!r}")
        scope = params.get("scope") or self.scope
        query = {k: v for k, v in (("service", params.get("service")), ("scope", scope)) if v}
        c = self.creds
        if c.identity_token:
            form = {**query, "grant_type": "refresh_token", "refresh_token": c.identity_token,
                    "client_id": "kaito-tuning"}
            resp = self._send("POST", realm, body=form, auth_header=False, what="token request")
        else:
            auth = (c.username, c.password) if c.username and c.password is not None else None
            resp = self._send("GET", realm, params=query, auth=auth, auth_header=False, what="token request")
        if resp.status_code in (401, 403):
            if c is _ANONYMOUS:
                raise self._denied(f"its token service {realm} refused an anonymous token")
            raise RegistryAuthFailed(f"authentication failed for {self.host}: the token service {realm} refused "
                                     f"the credentials ({_error_text(resp)})")
        if resp.status_code != 200:
            raise RegistryError(f"token service {realm} of {self.host} answered {resp.status_code}: {_error_text(resp)}")
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token:
            raise RegistryError(f"token service {realm} of {self.host} answered without a token")
        return token

    # -- API ----------------------------------------------------------------------------------

    def _repo(self, suffix: str) -> str:
        return f"/v2/{self.ref.repository}/{suffix}"

    def push_blob(self, digest: str, body: Path | bytes, what: str) -> None:
        if self.request("HEAD", self._repo(f"blobs/{digest}"), what=f"HEAD {what}", ok=(200, 404)).status_code == 200:
            return  # the registry has it already
        start = self.request("POST", self._repo("blobs/uploads/"), what=f"upload of {what}", ok=(202,))
        location = start.headers.get("Location")
        if not location:
            raise RegistryError(f"registry {self.host} started an upload without a Location header")
        if not location.startswith(("http://", "https://")):
            location = self.base + location
        location += ("&" if "?" in location else "?") + f"digest={digest}"
        self.request("PUT", location, body=body, what=f"upload of {what}", ok=(201, 204),
                     headers={"Content-Type": "application/octet-stream"})

    def put_manifest(self, tag: str, manifest: bytes) -> requests.Response:
        return self.request("PUT", self._repo(f"manifests/{tag}"), body=manifest, what="manifest upload",
                            ok=(201, 200), headers={"Content-Type": MEDIA_MANIFEST})

    def get_manifest(self, reference: str) -> tuple[dict, str]:
        resp = self.request("GET", self._repo(f"manifests/{reference}"), what="manifest download", ok=(200,),
                            headers={"Accept": _MANIFEST_ACCEPT})
        body = resp.content
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(f"registry {self.host} sent a manifest whose digest {digest} is not {reference}")
        try:
            manifest = json.loads(body)
        except ValueError:
            raise RegistryError(f"registry {self.host} sent a manifest that is not JSON") from None
        manifest.setdefault("mediaType", resp.headers.get("Content-Type", "").split(";")[0])
        return manifest, digest

    def download_blob(self, digest: str, dest: Path) -> None:
        """Stream a blob to ``dest`` and check its digest; a download that breaks off is started again."""
        for attempt in range(self.retries + 1):
            resp = self.request("GET", self._repo(f"blobs/{digest}"), what=f"download of {digest[:19]}", ok=(200,),
                                stream=True)
            h = hashlib.sha256()
            try:
                with open(dest, "wb") as f:
                    for chunk in resp.iter_content(_CHUNK):
                        h.update(chunk)
                        f.write(chunk)
                break
            except requests.RequestException as e:
                if attempt == self.retries:
                    raise RegistryUnreachable(f"download of {digest} from {self.host} broke off {attempt + 1} "
                                              f"times: {_short(e)}") from None
                _sleep(_backoff(attempt))
            finally:
                resp.close()
        if f"sha256:{h.hexdigest()}" != digest:
            raise RegistryError(f"blob {digest} from {self.host} arrived with a different digest; try again")


def _short(e: Exception) -> str:
    """The innermost cause of a requests error, without urllib3's object reprs."""
    text = str(e.args[0] if e.args else e)
    m = re.search(r"(Connection refused|Name or service not known|Temporary failure in name resolution|"
                  r"timed out|No route to host|Connection reset by peer|certificate verify failed[^)'\"]*|"
                  r"wrong version number|Network is unreachable|Failed to resolve '[^']*')", text)
    return m.group(1) if m else text[:200]


def _sleep(seconds: float) -> None:  # a seam for tests
    time.sleep(seconds)


def _backoff(attempt: int) -> float:
    return _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]


def _client(image: str, *, auth_file, auth, plain_http: bool, push: bool, timeout: float,
            retries: int, require_tag: bool) -> _Registry:
    ref = parse_reference(image, require_tag=require_tag)
    auths, source = load_auth(auth_file, auth)
    creds = credentials_for(auths, ref.registry, source)
    return _Registry(ref, creds, plain_http=plain_http, push=push, timeout=timeout, retries=retries)


# ---------------------------------------------------------------------------------------------
# push


def adapter_files(adapter_dir: str | os.PathLike) -> list[Path]:
    """The files that go under /data/: every top-level file except hidden files and trainer state.

    Refuses a directory without ``adapter_config.json`` (valid JSON) or ``adapter_model.safetensors``
    (with a readable safetensors header).
    """
    d = Path(adapter_dir)
    if not d.is_dir():
        raise AdapterIncomplete(f"adapter directory {d} does not exist" if not d.exists()
                                else f"{d} is not a directory; give the adapter's directory")
    missing = [n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (d / n).is_file()]
    if missing:
        hint = ""
        if ADAPTER_WEIGHTS in missing and (d / "adapter_model.bin").is_file():
            hint = ("; it has adapter_model.bin: save the adapter with safetensors "
                    "(save_pretrained(..., safe_serialization=True))")
        raise AdapterIncomplete(f"adapter directory {d} has no {' and no '.join(missing)}; "
                                f"an adapter needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}{hint}")
    try:
        config = json.loads((d / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterIncomplete(f"{d / ADAPTER_CONFIG} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterIncomplete(f"{d / ADAPTER_CONFIG} must hold a JSON object")
    _check_safetensors(d / ADAPTER_WEIGHTS)
    return sorted(p for p in d.iterdir() if p.is_file() and not _EXCLUDED.search(p.name))


def _check_safetensors(path: Path) -> None:
    """A safetensors file starts with an 8-byte header length and that much JSON: catch truncated files."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        ok = 0 < n <= size - 8
        if ok:
            try:
                ok = isinstance(json.loads(f.read(n)), dict)
            except (ValueError, UnicodeDecodeError):
                ok = False
    if not ok:
        raise AdapterIncomplete(f"{path} is empty, truncated or not a safetensors file")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def adapter_annotations(adapter_dir: str | os.PathLike) -> dict[str, str]:
    """Manifest annotations read from the adapter: OCI standard ones plus Kaito's and ours.

    From ``training_metadata.json`` (camelCase or snake_case keys): ``preset``, ``method``,
    ``baseModel``, ``datasetDigests`` (a list of ``sha256:...``, or a map of name to digest) and
    ``finishedAt`` (becomes ``org.opencontainers.image.created``); from ``adapter_config.json``:
    ``base_model_name_or_path`` and ``r``. Nothing depends on the time or the target tag, so the
    same adapter gives the same digest.
    """
    d = Path(adapter_dir)
    config, meta = _read_json(d / ADAPTER_CONFIG), _read_json(d / METADATA_FILE)

    def meta_get(*names):
        return next((meta[n] for n in names if meta.get(n) not in (None, "", [], {})), None)

    base = meta_get("baseModel", "base_model") or config.get("base_model_name_or_path")
    preset = meta_get("preset", "presetName", "preset_name")
    method = meta_get("method")
    rank = config.get("r", meta_get("loraRank", "lora_rank", "rank"))
    digests = meta_get("datasetDigests", "dataset_digests")
    if isinstance(digests, dict):
        digests = list(digests.values())
    created = meta_get("finishedAt", "finished_at", "created")
    kind = {"lora": "LoRA", "qlora": "QLoRA"}.get(str(method).lower(), str(method)) + " adapter" if method else "LoRA adapter"
    a = {
        "org.opencontainers.image.title": f"{kind} for {preset or base}" if (preset or base) else kind,
        "org.opencontainers.image.description": "PEFT adapter in Kaito's layout: /data/adapter_config.json and "
                                                "/data/adapter_model.safetensors (kaito-tuning)",
    }
    if created:
        a["org.opencontainers.image.created"] = str(created)
    if preset:
        a["sh.kaito.model.name"] = str(preset)  # what Kaito's pusher writes
        a["kaito.sh/preset"] = str(preset)
    if base:
        a["kaito.sh/base-model"] = str(base)
    if method:
        a["kaito.sh/method"] = str(method)
    if rank is not None:
        a["kaito.sh/lora-rank"] = str(rank)
    if digests:
        a["kaito.sh/dataset-digests"] = ",".join(str(x) for x in digests)
    return a


class _HashingWriter:
    """A write-only file that hashes and counts what passes through to ``out``."""

    def __init__(self, out):
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.out.write(b)

    def flush(self) -> None:
        self.out.flush()

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha.hexdigest()}"


def build_layer(files: list[Path], out: Path) -> tuple[str, int, str]:
    """Write the reproducible gzip tar layer (``data/`` + ``data/<file>``); return (digest, size, diff_id)."""
    with open(out, "wb") as raw:
        compressed = _HashingWriter(raw)
        # filename="" and mtime=0: no name, no time in the gzip header
        with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=6) as gz:
            plain = _HashingWriter(gz)
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                tar.addfile(_tarinfo("data", tarfile.DIRTYPE, 0o755))
                for path in files:
                    info = _tarinfo(f"data/{path.name}", tarfile.REGTYPE, 0o644)
                    with open(path, "rb") as f:
                        info.size = os.fstat(f.fileno()).st_size
                        tar.addfile(info, f)
    return compressed.digest, compressed.size, plain.digest


def _tarinfo(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def push_adapter(adapter_dir: str | os.PathLike, image: str, *, auth_file: str | os.PathLike | None = None,
                 auth: dict | None = None, plain_http: bool = False, annotations: dict | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, retries: int = RETRIES) -> PushResult:
    """Push ``adapter_dir`` as the image ``image`` (registry/repository:tag); return its digest.

    Everything that can be checked locally (reference, credentials, adapter files) is checked
    before the first byte goes to the registry.
    """
    ref = parse_reference(image, require_tag=True)
    if ref.digest:
        raise InvalidImageReference(f"image reference {image!r}: push to a tag, not a digest; "
                                    f"drop @{ref.digest}")
    if ref.repository != ref.repository.lower():
        raise InvalidImageReference(f"image reference {image!r}: registries accept only lowercase repository "
                                    f"names; use {ref.registry}/{ref.repository.lower()}:{ref.tag}")
    files = adapter_files(adapter_dir)
    notes = adapter_annotations(adapter_dir)
    for k, v in (annotations or {}).items():
        if not isinstance(k, str) or not k or not isinstance(v, str):
            raise InvalidAnnotation(f"annotation {k!r}={v!r}: keys and values must be non-empty strings")
        notes[k] = v
    client = _client(image, auth_file=auth_file, auth=auth, plain_http=plain_http, push=True,
                     timeout=timeout, retries=retries, require_tag=True)
    with tempfile.TemporaryDirectory(prefix="kaito-push-") as tmp:
        layer = Path(tmp) / "layer.tar.gz"
        layer_digest, layer_size, diff_id = build_layer(files, layer)
        config = _canonical({
            "architecture": "amd64", "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        })
        config_digest = f"sha256:{hashlib.sha256(config).hexdigest()}"
        manifest = _canonical({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer_size}],
            "annotations": notes,
        })
        digest = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
        try:
            client.login()
            client.push_blob(layer_digest, layer, "the adapter layer")
            client.push_blob(config_digest, config, "the image config")
            resp = client.put_manifest(ref.tag, manifest)
        finally:
            client.close()
    echoed = resp.headers.get("Docker-Content-Digest")
    if echoed and echoed != digest:
        raise RegistryError(f"registry {ref.registry} stored the manifest as {echoed}, not {digest}")
    return PushResult(reference=f"{ref.registry}/{ref.repository}:{ref.tag}", digest=digest,
                      size=len(manifest) + len(config) + layer_size, files=[p.name for p in files])


# ---------------------------------------------------------------------------------------------
# pull


def pull_adapter(image: str, dest_dir: str | os.PathLike, *, auth_file: str | os.PathLike | None = None,
                 auth: dict | None = None, plain_http: bool = False, timeout: float = DEFAULT_TIMEOUT_S,
                 retries: int = RETRIES) -> PullResult:
    """Pull an adapter image's /data into ``dest_dir`` (new or empty), laid out as PEFT expects."""
    return _pull(image, dest_dir, auth_file=auth_file, auth=auth, plain_http=plain_http, timeout=timeout,
                 retries=retries, check=_check_adapter)


def pull_data(image: str, dest_dir: str | os.PathLike, *, auth_file: str | os.PathLike | None = None,
              auth: dict | None = None, plain_http: bool = False, timeout: float = DEFAULT_TIMEOUT_S,
              retries: int = RETRIES) -> PullResult:
    """Pull the whole /data directory of any image (a dataset image, say) into ``dest_dir``."""
    return _pull(image, dest_dir, auth_file=auth_file, auth=auth, plain_http=plain_http, timeout=timeout,
                 retries=retries, check=None)


def _check_adapter(image: str, files: list[str]) -> None:
    if ADAPTER_CONFIG not in files:
        listing = ", ".join(f"/data/{f}" for f in files[:8]) + (", ..." if len(files) > 8 else "")
        raise NotAnAdapter(f"image {image} is not an adapter: it has no /data/{ADAPTER_CONFIG} "
                           f"(its /data holds: {listing})")
    if ADAPTER_WEIGHTS not in files and "adapter_model.bin" not in files:
        raise AdapterIncomplete(f"image {image} has /data/{ADAPTER_CONFIG} but no /data/{ADAPTER_WEIGHTS}")


def _pull(image, dest_dir, *, auth_file, auth, plain_http, timeout, retries, check) -> PullResult:
    client = _client(image, auth_file=auth_file, auth=auth, plain_http=plain_http, push=False,
                     timeout=timeout, retries=retries, require_tag=False)
    ref = client.ref
    dest = Path(dest_dir)
    stage = None
    try:
        client.login()
        manifest, digest = client.get_manifest(ref.reference)
        if manifest.get("mediaType") in (MEDIA_INDEX, DOCKER_LIST) or "manifests" in manifest:
            chosen = _choose_platform(manifest, image)
            manifest, _ = client.get_manifest(chosen)
        layers = _image_layers(manifest, image)
        _prepare_destination(dest)  # only once the image is known to exist
        stage = Path(tempfile.mkdtemp(prefix=".kaito-pull-", dir=dest))
        root = stage / "data"
        root.mkdir()
        for i, layer in enumerate(layers):
            blob = stage / f"layer-{i}"
            client.download_blob(layer["digest"], blob)
            _unpack_data(blob, root, image)
            blob.unlink()
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        if not files:
            raise NoDataInImage(f"image {image} has no files under /data; put the files under /data in the image")
        if check:
            check(image, files)
        for entry in root.iterdir():
            os.replace(entry, dest / entry.name)
    finally:
        client.close()
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    return PullResult(reference=str(ref), digest=digest, dest_dir=str(dest), files=files)


def _prepare_destination(dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise DestinationNotEmpty(f"{dest} exists and is not a directory")
    dest.mkdir(parents=True, exist_ok=True)
    for leftover in dest.glob(".kaito-pull-*"):  # from a pull that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    if any(dest.iterdir()):
        raise DestinationNotEmpty(f"{dest} is not empty; pull into a new or empty directory")


def _choose_platform(index: dict, image: str) -> str:
    """An adapter has no platform; from a multi-platform index take linux/amd64, else the first image."""
    entries = [m for m in index.get("manifests") or []
               if (m.get("platform") or {}).get("os", "linux") != "unknown"]  # skip attestations
    if not entries:
        raise NotAnAdapter(f"image {image} is an index without images")
    best = next((m for m in entries if (m.get("platform") or {}).get("architecture") == "amd64"), entries[0])
    return best["digest"]


def _image_layers(manifest: dict, image: str) -> list[dict]:
    media = manifest.get("mediaType", "")
    if manifest.get("schemaVersion") != 2 or media not in (MEDIA_MANIFEST, DOCKER_MANIFEST, ""):
        raise NotAnAdapter(f"image {image} has a manifest of type {media or 'unknown'} that we cannot read")
    layers = manifest.get("layers") or []
    config_type = (manifest.get("config") or {}).get("mediaType", "")
    for layer in layers:
        if _TAR_LAYERS.match(layer.get("mediaType", "")):
            continue
        if config_type not in (MEDIA_CONFIG, "application/vnd.docker.container.image.v1+json"):
            raise NotAnAdapter(f"image {image} is an OCI artifact (config type {config_type!r}), not a container "
                               "image; push the files under /data/ in the gzip tar layer of an image")
        raise NotAnAdapter(f"image {image} has a layer of type {layer.get('mediaType')!r} that cannot be "
                           "unpacked here (only tar and tar+gzip layers)")
    return layers


def _unpack_data(blob: Path, root: Path, image: str) -> None:
    """Extract the ``data/`` entries of one layer into ``root`` without ever following or making links.

    Entries with ``..``, symbolic links and devices under /data are refused; hard links are copied
    from the file they name; whiteouts (``.wh.``) delete what lower layers wrote.
    """
    written: set[Path] = set()
    try:
        tar = tarfile.open(blob, mode="r:*")
    except tarfile.TarError as e:
        raise NotAnAdapter(f"image {image} has a layer that is not a (gzip) tar archive: {e}") from None
    with tar:
        try:
            for m in tar:
                parts = [p for p in m.name.split("/") if p not in ("", ".")]
                if ".." in parts:
                    raise UnsafeImage(f"image {image}: layer entry {m.name!r} points outside its directory; refused")
                if not parts or parts[0] != "data":
                    continue
                if len(parts) == 1:
                    if not m.isdir():
                        raise UnsafeImage(f"image {image}: /data is not a directory in the image (it is a "
                                          f"{'link' if m.issym() or m.islnk() else 'file'}); refused")
                    continue
                target = root.joinpath(*parts[1:])
                name = parts[-1]
                if name.startswith(".wh."):
                    _whiteout(target.parent, name, written)
                    continue
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                elif m.isreg():
                    _write_member(tar.extractfile(m), target)
                elif m.islnk():
                    link = [p for p in m.linkname.split("/") if p not in ("", ".")]
                    source = root.joinpath(*link[1:]) if link[:1] == ["data"] and ".." not in link else None
                    if source is None or not source.is_file():
                        raise UnsafeImage(f"image {image}: hard link {m.name!r} -> {m.linkname!r} leaves /data; "
                                          "refused")
                    with open(source, "rb") as f:
                        _write_member(f, target)
                elif m.issym():
                    raise UnsafeImage(f"image {image}: /{m.name.lstrip('./')} is a symbolic link (to "
                                      f"{m.linkname!r}); images must hold plain files under /data; refused")
                else:
                    raise UnsafeImage(f"image {image}: /{m.name.lstrip('./')} is a device or pipe; refused")
                written.add(target)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise RegistryError(f"image {image}: a layer could not be unpacked ({e})") from None


def _write_member(src, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        shutil.rmtree(target)
    with open(target, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)


def _whiteout(directory: Path, name: str, written: set[Path]) -> None:
    """Apply an overlay whiteout: ``.wh..wh..opq`` empties the directory of lower-layer files."""
    if name == ".wh..wh..opq":
        if directory.is_dir():
            for p in list(directory.iterdir()):
                if p not in written:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        return
    victim = directory / name[len(".wh."):]
    if victim.is_dir():
        shutil.rmtree(victim)
    elif victim.exists():
        victim.unlink()


# ---------------------------------------------------------------------------------------------
# CLI


def _parse_annotations(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidAnnotation(f"--annotation {item!r}: write KEY=VALUE")
        out[key.strip()] = value
    return out


def cli_push(args) -> int:
    result = push_adapter(args.dir, args.image, auth_file=args.auth_file, plain_http=args.plain_http,
                          annotations=_parse_annotations(args.annotation))
    print(json.dumps(result.to_dict(), indent=2))
    return 0


def cli_pull(args) -> int:
    result = pull_adapter(args.image, args.dir, auth_file=args.auth_file, plain_http=args.plain_http)
    print(json.dumps(result.to_dict(), indent=2))
    return 0
