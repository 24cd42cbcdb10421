"""The OCI distribution protocol, spoken by oras-py, set up for us in this one place.

``Registry`` is an ``oras.provider.Registry``: oras builds the URLs (``oras.container.Container``),
keeps the session (cookies ignored), checks for and uploads blobs (``upload_blob``: HEAD, POST,
PUT) and fetches them (``get_blob``). What we change, and why:

- ``do_request``: oras wraps it in ``oras.decorator.retry``, which retries *every* failure five
  times sleeping 3+5+11+29+83 s (a wrong password takes minutes), attaches the token to any URL
  and lets a 401 from anywhere trigger authentication. Ours sends one request (plus one
  credential exchange on a 401 from the registry itself); retries only transient failures
  (connection errors, 429, 5xx) with ``kaito_tuning.retry``, the project's one policy; never
  retries 401/403; sends ``Authorization`` only to the registry's own origin (scheme, host,
  port), so an upload ``Location`` or a blob redirect to storage elsewhere gets no credentials;
  follows redirects itself (never from HTTPS down to HTTP); caps every body it reads.
- the auth backend: oras picks Basic or Token when the client is built, accepts a token realm
  over plain HTTP and has no identity-token (OAuth2 refresh token) grant. ``_Auth`` chooses per
  ``WWW-Authenticate`` challenge, refuses an ``http://`` realm unless the registry itself is
  plain HTTP on request, and does both token grants.
- credentials: oras reads ``~/.docker/config.json`` (only ``auths[host].auth``); ours come from
  ``auth.py`` (every dockerconfigjson form), so ``load_configs`` is a no-op.
- manifests: oras's ``upload_manifest`` re-serialises the manifest with requests' JSON encoder
  (so the digest is not the one we computed) and validates it against its artifact schema, and
  ``get_manifest`` reads a body of any size. We PUT our canonical bytes, and read manifests
  size-capped and digest-checked. We push plain images (no ``artifactType``, no oras title
  annotations), so oras's ``push()``/``pull()`` (and their cwd path validation) are not used.
- blobs: downloads are streamed to a file, capped at the size the manifest gives, digest-checked,
  and started again when a transfer breaks off.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import oras.auth
import oras.container
import oras.defaults
import oras.provider
import requests

import kaito_tuning.artifacts.reference as imageref
from kaito_tuning import __version__, retry
from kaito_tuning.artifacts.auth import Credentials, credentials_for, load_auth
from kaito_tuning.artifacts.errors import (
    ImageNotFound,
    ImageTooLarge,
    InvalidImageReference,
    RegistryAuthFailed,
    RegistryError,
    RegistryRejected,
    RegistryUnreachable,
)
from kaito_tuning.errors import KaitoError, TransientError

RETRIES = 3  #: retries of a transient failure (4 tries in all); 401/403 are never retried
DEFAULT_TIMEOUT_S = 120.0  #: read timeout of one request
CONNECT_TIMEOUT_S = 10.0
MAX_MANIFEST_BYTES = 4 << 20  #: distribution's own limit for a manifest
MAX_BODY_BYTES = 1 << 20  #: any other answer (errors, tokens, upload sessions)
MAX_REDIRECTS = 5
_CHUNK = 1 << 20
_REDIRECTS = (301, 302, 303, 307, 308)
MANIFEST_TYPES = tuple(oras.defaults.default_manifest_accepted_media_types)  # OCI and Docker, image and index


def parse_reference(image: str, *, require_tag: bool) -> imageref.ImageRef:
    try:
        return imageref.parse(image, require_tag=require_tag)
    except imageref.InvalidReference as e:
        raise InvalidImageReference(str(e)) from None


def parse_challenge(header: str | None) -> tuple[str, dict[str, str]]:
    """``Bearer realm="https://a/token",service="reg",scope="repository:x:pull,push"`` -> (scheme, params)."""
    if not header:
        return "", {}
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): (q.replace('\\"', '"') if q or v == '""' else v)
              for k, v, q in re.findall(r'([A-Za-z_][\w-]*)\s*=\s*("((?:[^"\\]|\\.)*)"|[^,\s]*)', rest)}
    return scheme.lower(), params


def _origin(url: str) -> tuple[str, str, int]:
    p = urlsplit(url)
    return p.scheme, (p.hostname or "").lower(), p.port or (443 if p.scheme == "https" else 80)


def _shown(url: str) -> str:
    """``scheme://host/path``: never a query (upload state, signed storage URLs) or userinfo."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc.rpartition('@')[2]}{p.path}"


def _short(e: Exception) -> str:
    """The innermost cause of a requests error, without urllib3's object reprs."""
    text = str(e.args[0] if e.args else e)
    m = re.search(r"(Connection refused|Name or service not known|Temporary failure in name resolution|"
                  r"timed out|No route to host|Connection reset by peer|certificate verify failed[^)'\"]*|"
                  r"wrong version number|Network is unreachable|Failed to resolve '[^']*'|"
                  r"Connection broken: [A-Za-z]+|IncompleteRead)", text)
    return m.group(1) if m else text[:200]


def _slurp(resp: requests.Response, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of a (streamed) body, and whether there was more; later ``resp.content`` is it."""
    if resp._content is not False:  # already read
        return resp.content or b"", False
    got, over = bytearray(), False
    try:
        for chunk in resp.iter_content(65536):
            got += chunk
            if len(got) > limit:
                over = True
                break
    except requests.RequestException:
        over = True  # an error body that breaks off is still worth quoting; the connection is not reused
    if over:
        resp.raw.close()  # unread bytes left: drop the connection rather than hand it back to the pool
    resp._content, resp._content_consumed = bytes(got[:limit]), True
    resp.close()
    return resp._content, over


def _error_text(resp: requests.Response) -> str:
    """The registry's own words: ``CODE: message`` from its JSON errors, else the start of the body."""
    body, _ = _slurp(resp, 65536)
    try:
        errors = json.loads(body).get("errors") or []
        text = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors)
    except (ValueError, AttributeError, TypeError):
        text = ""
    return " ".join((text or body[:200].decode("utf-8", "replace")).split()) or resp.reason or ""


class _NoRetry(Exception):
    """Carries an error out of ``retry.call`` without it being retried (a transient type that is not)."""

    def __init__(self, error: KaitoError):
        super().__init__(str(error))
        self.error = error


class _BrokenDownload(RegistryUnreachable):
    """A blob transfer that broke off midway: the whole download is started again."""


class _Auth(oras.auth.TokenAuth):
    """oras's auth backend interface (``authenticate_request``, ``get_auth_header``), answering each
    ``WWW-Authenticate`` challenge as it says: Basic with the user and password, Bearer with a token
    from its realm (user/password GET, or identity-token POST), anonymous where no credentials."""

    def __init__(self, registry: "Registry", creds: Credentials):
        super().__init__()
        self.registry, self.creds = registry, creds
        self.session, self.prefix, self._tls_verify = registry.session, registry.prefix, registry._tls_verify
        self._authorization = f"Bearer {creds.registry_token}" if creds.registry_token else None

    def __repr__(self) -> str:
        return f"_Auth({self.registry.host}, {self.creds!r})"

    def load_configs(self, container, configs=None) -> None:
        """Credentials come from auth.py (given explicitly), never from ~/.docker/config.json."""

    def get_auth_header(self) -> dict:
        return {"Authorization": self._authorization} if self._authorization else {}

    def authenticate_request(self, original: requests.Response, headers: dict | None, refresh: bool = False):
        scheme, params = parse_challenge(original.headers.get("WWW-Authenticate"))
        reg, c = self.registry, self.creds
        if scheme == "basic":
            if not c.username or c.password is None:
                raise reg.denied(f"it asks for Basic auth (realm {params.get('realm', '')!r})")
            self._authorization = f"Basic {oras.auth.utils.get_basic_auth(c.username, c.password)}"
        elif scheme == "bearer":
            self._authorization = f"Bearer {self._fetch_token(params)}"
        else:
            raise RegistryError(f"registry {reg.host} answered 401 with an auth scheme we do not know: "
                                f"{scheme or 'none'!r}")
        out = dict(headers or {})
        out.update(self.get_auth_header())
        return out, True

    def _fetch_token(self, params: dict[str, str]) -> str:
        """Docker/OCI token flow: user:password (GET) or an identity token (OAuth2 refresh_token POST)."""
        reg, c = self.registry, self.creds
        realm = params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise RegistryError(f"registry {reg.host} gave a token realm that is not a URL: {realm[:100]!r}")
        shown = _shown(realm)
        if parts.scheme == "http" and not reg.plain_http:
            raise RegistryRejected(f"registry {reg.host} asks for credentials at {shown} over plain HTTP; refused "
                                   "(only a registry used with --plain-http may have a plain-HTTP token service)")
        query = {k: v for k, v in (("service", params.get("service")), ("scope", params.get("scope") or reg.scope)) if v}
        kw = {"timeout": reg.timeout, "stream": True, "allow_redirects": False, "verify": self._tls_verify,
              "headers": {"Accept": "application/json"}}
        try:
            if c.identity_token:
                form = {**query, "grant_type": "refresh_token", "refresh_token": c.identity_token,
                        "client_id": "kaito-tuning"}
                resp = self.session.post(realm, data=form, **kw)
            else:
                auth = (c.username, c.password) if c.username and c.password is not None else None
                resp = self.session.get(realm, params=query, auth=auth, **kw)
        except requests.exceptions.SSLError as e:
            raise _NoRetry(RegistryUnreachable(f"TLS handshake with the token service {shown} of {reg.host} "
                                               f"failed ({_short(e)})")) from None
        except (requests.ConnectionError, requests.Timeout) as e:
            raise RegistryUnreachable(f"cannot reach the token service {shown} of {reg.host} ({_short(e)})") from None
        with resp:
            if resp.status_code in (401, 403):
                if c.anonymous:
                    raise reg.denied(f"its token service {shown} refused an anonymous token")
                raise RegistryAuthFailed(f"authentication failed for {reg.host}: the token service {shown} refused "
                                         f"the credentials ({_error_text(resp)})")
            if resp.status_code != 200:
                raise RegistryError(f"token service {shown} of {reg.host} answered {resp.status_code}: "
                                    f"{_error_text(resp)}", retry_after=_retry_after(resp))
            body, over = _slurp(resp, MAX_BODY_BYTES)
        try:
            answer = json.loads(body) if not over else {}
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token or not isinstance(token, str):
            raise RegistryError(f"token service {shown} of {reg.host} answered without a token")
        return token


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


class Registry(oras.provider.Registry):
    """One repository on one registry, as oras-py speaks to it, with the changes the module doc lists."""

    def __init__(self, ref: imageref.ImageRef, creds: Credentials, *, plain_http: bool, push: bool,
                 timeout: float = DEFAULT_TIMEOUT_S, retries: int = RETRIES):
        api_host = "registry-1.docker.io" if ref.registry == imageref.DOCKER_HUB else ref.registry
        super().__init__(hostname=api_host, insecure=plain_http, auth_backend="token")  # replaced by _Auth below
        self.ref, self.host, self.plain_http = ref, ref.registry, plain_http
        self.origin = f"{self.prefix}://{api_host}"
        self.scope = f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"
        self.timeout = (CONNECT_TIMEOUT_S, timeout)
        self.attempts = max(1, retries + 1)
        self.session.headers["User-Agent"] = f"kaito-tuning/{__version__}"
        self.auth = _Auth(self, creds)
        # oras's parser would take a first path component with a dot for a registry: set the parts
        namespace, _, name = ref.repository.rpartition("/")
        self.container = oras.container.Container(name, registry=api_host)
        self.container.namespace, self.container.tag, self.container.digest = namespace or None, ref.tag, ref.digest

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the transport: oras calls do_request for everything ---------------------------------------

    def do_request(self, url: str, method: str = "GET", data=None, headers: dict | None = None,
                   json: dict | None = None, stream: bool = False) -> requests.Response:
        """One request with bounded retries of transient failures; 401/403 raise at once (see module doc)."""
        what = f"{method} {urlsplit(url).path}"
        try:
            return retry.call(lambda: self._once(url, method, data, dict(headers or {}), json, stream, what),
                              attempts=self.attempts)
        except _NoRetry as e:
            raise e.error from None
        except TransientError as e:
            if self.attempts > 1:
                raise type(e)(f"{e.message}; tried {self.attempts} times") from None
            raise

    def _once(self, url, method, data, headers, body_json, stream, what) -> requests.Response:
        resp = self._send(method, url, data, headers, body_json, what)
        if resp.status_code == 401 and _origin(resp.url) == _origin(self.origin):
            challenge = resp.headers.get("WWW-Authenticate")
            if not (self.auth._authorization and parse_challenge(challenge)[0] == "basic"):  # not a rejected password
                headers, _ = self.auth.authenticate_request(resp, headers)
                resp.close()
                resp = self._send(method, url, data, headers, body_json, what)
        if resp.status_code == 401 and _origin(resp.url) != _origin(self.origin):
            raise RegistryRejected(f"{self._whose(resp.url)} asked for credentials for {what}; "
                                   "credentials go to the registry only")
        if resp.status_code == 401:
            _, params = parse_challenge(resp.headers.get("WWW-Authenticate"))
            text = _error_text(resp)
            if params.get("error") == "insufficient_scope" or self.auth.creds.anonymous:
                raise self.denied(text)
            detail = "the token was refused" if (self.auth._authorization or "").startswith("Bearer") else \
                f"wrong user name or password for {self.auth.creds.username!r}"
            raise RegistryAuthFailed(f"authentication failed for {self.host}: {detail} ({text})")
        if resp.status_code == 403:
            raise self.denied(_error_text(resp))
        if resp.status_code == 429 or resp.status_code >= 500:
            raise RegistryError(f"registry {self.host} answered {resp.status_code} {resp.reason} to {what}: "
                                f"{_error_text(resp)}", retry_after=_retry_after(resp))
        if resp.status_code == 400 and self.plain_http:
            text = _error_text(resp)
            if "HTTPS" in text:
                raise RegistryRejected(f"registry {self.host} speaks HTTPS; drop --plain-http")
        if not stream:  # read now, capped, so that nothing later reads an unbounded body
            _, over = _slurp(resp, MAX_BODY_BYTES)
            if over:
                raise RegistryError(f"registry {self.host} answered {what} with more than {MAX_BODY_BYTES} bytes")
        return resp

    def _send(self, method, url, data, headers, body_json, what) -> requests.Response:
        """Send, following redirects by hand: credentials only to the registry's origin, never HTTPS -> HTTP."""
        for _ in range(MAX_REDIRECTS + 1):
            sent = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            if _origin(url) == _origin(self.origin):
                sent.update(self.auth.get_auth_header())
            try:
                resp = self.session.request(method, url, data=data, json=body_json, headers=sent, stream=True,
                                            verify=self._tls_verify, timeout=self.timeout, allow_redirects=False)
            except requests.exceptions.SSLError as e:
                raise _NoRetry(RegistryUnreachable(
                    f"TLS handshake with {self._whose(url)} failed ({_short(e)}); for a local registry without "
                    "TLS pass --plain-http (plain HTTP is never used unless asked for); for a private CA set "
                    "REQUESTS_CA_BUNDLE")) from None
            except (requests.ConnectionError, requests.Timeout) as e:
                raise RegistryUnreachable(f"cannot reach {self._whose(url)} ({_short(e)})") from None
            if resp.status_code not in _REDIRECTS or not resp.headers.get("Location"):
                return resp
            target = urljoin(url, resp.headers["Location"])
            resp.close()
            scheme = urlsplit(target).scheme
            if scheme not in ("http", "https") or (scheme == "http" and not self.plain_http):
                raise RegistryRejected(f"registry {self.host} redirected {what} to {_shown(target)}; "
                                       "refused (only HTTPS unless --plain-http)")
            if resp.status_code == 303 or (resp.status_code in (301, 302) and method not in ("GET", "HEAD")):
                method, data, body_json = "GET", None, None
            url = target
        raise RegistryError(f"registry {self.host} redirected {what} more than {MAX_REDIRECTS} times")

    def _whose(self, url: str) -> str:
        if _origin(url) == _origin(self.origin):
            return f"registry {self.host} at {self.origin}"
        return f"{_shown(url)} (where registry {self.host} sent us)"

    def _check_200_response(self, response: requests.Response) -> None:
        """oras's check raises a bare ValueError; ours says what failed, as a user or transient error."""
        if response.status_code in (200, 201, 202):
            return
        status, text = response.status_code, _error_text(response)
        what = f"{response.request.method} {urlsplit(response.request.url).path}"
        if status == 404:
            raise ImageNotFound(f"{self.ref} not found on {self.host} ({what}: {text})")
        raise RegistryRejected(f"registry {self.host} refused {what}: {status} {text}")

    def _get_location(self, r: requests.Response, container) -> str:
        self._check_200_response(r)  # oras would read a failed POST's body as JSON and raise ValueError
        location = super()._get_location(r, container)
        if not location:
            raise RegistryError(f"registry {self.host} started an upload without a Location header")
        return location

    def denied(self, text: str) -> RegistryAuthFailed:
        action = "push to" if self.scope.endswith("push") else "pull"
        if self.auth.creds.anonymous:
            return RegistryAuthFailed(f"registry {self.host} requires credentials to {action} {self.ref.repository}; "
                                      f"pass --auth-file (a docker config.json / dockerconfigjson secret): {text}")
        return RegistryAuthFailed(f"the credentials for {self.host} may not {action} {self.ref.repository}: {text}")

    # -- the API ----------------------------------------------------------------------------------

    def ping(self) -> None:
        """GET /v2/: learn the auth scheme from WWW-Authenticate and check the credentials once, up front."""
        resp = self.do_request(f"{self.origin}/v2/", "GET")
        if resp.status_code == 404:
            raise RegistryError(f"{self.origin} is not an OCI registry (GET /v2/ answered 404)")
        if resp.status_code != 200:
            self._check_200_response(resp)

    def push_blob(self, path: Path, digest: str, size: int, media_type: str) -> None:
        """oras's upload_blob: HEAD (skip if present), POST, then PUT ?digest= to the session Location."""
        layer = {"mediaType": media_type, "digest": digest, "size": size}
        self._check_200_response(self.upload_blob(str(path), self.container, layer))

    def put_manifest(self, manifest: bytes, media_type: str) -> str | None:
        """PUT exactly these bytes (their sha256 is the image digest); the digest the registry echoes, if any."""
        resp = self.do_request(f"{self.prefix}://{self.container.manifest_url(self.ref.tag)}", "PUT", data=manifest,
                               headers={"Content-Type": media_type})
        self._check_200_response(resp)
        return resp.headers.get("Docker-Content-Digest")

    def fetch_manifest(self, reference: str) -> tuple[dict, str]:
        """The manifest (or index) ``reference`` names, read at most MAX_MANIFEST_BYTES, and its digest."""
        resp = self.do_request(f"{self.prefix}://{self.container.manifest_url(reference)}", "GET", stream=True,
                               headers={"Accept": ", ".join(MANIFEST_TYPES)})
        with resp:
            self._check_200_response(resp)
            body, over = _slurp(resp, MAX_MANIFEST_BYTES)
        if over:
            raise ImageTooLarge(f"{self.ref}: the registry sent a manifest larger than {MAX_MANIFEST_BYTES >> 20} MiB")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(f"registry {self.host} sent a manifest whose digest {digest} is not {reference}")
        try:
            manifest = json.loads(body)
        except ValueError:
            raise RegistryError(f"registry {self.host} sent a manifest that is not JSON") from None
        if not isinstance(manifest, dict):
            raise RegistryError(f"registry {self.host} sent a manifest that is not a JSON object")
        manifest.setdefault("mediaType", resp.headers.get("Content-Type", "").split(";")[0])
        return manifest, digest

    def fetch_blob(self, digest: str, size: int, dest: Path) -> None:
        """Stream blob ``digest`` to ``dest``: never more than ``size`` bytes, digest checked; a transfer that
        breaks off is started again (the request itself is retried by do_request)."""
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest or ""):
            raise RegistryError(f"{self.ref}: the manifest names a blob by an unusable digest {str(digest)[:80]!r}")

        def once() -> None:
            resp = self.get_blob(self.container, digest, stream=True)
            with resp:
                self._check_200_response(resp)
                length = resp.headers.get("Content-Length", "")
                if length.isdigit() and int(length) > size:
                    raise ImageTooLarge(f"{self.ref}: blob {digest} is {length} bytes, not the {size} its manifest "
                                        "says; refused")
                sha, n = hashlib.sha256(), 0
                with open(dest, "wb") as f:
                    try:
                        for chunk in resp.iter_content(_CHUNK):
                            n += len(chunk)
                            if n > size:
                                raise ImageTooLarge(f"{self.ref}: blob {digest} is larger than the {size} bytes its "
                                                    "manifest says; refused")
                            sha.update(chunk)
                            f.write(chunk)
                    except requests.RequestException as e:
                        raise _BrokenDownload(f"download of {digest} from {self.host} broke off ({_short(e)})") from None
            if n != size or f"sha256:{sha.hexdigest()}" != digest:
                raise RegistryError(f"blob {digest} from {self.host} arrived with a different size or digest; try again")

        try:
            retry.call(once, attempts=self.attempts, retry_on=(_BrokenDownload,))
        except _BrokenDownload as e:
            raise RegistryUnreachable(f"{e.message}; tried {self.attempts} times") from None


def connect(image: str, *, auth_file=None, auth: dict | None = None, plain_http: bool = False, push: bool,
            timeout: float = DEFAULT_TIMEOUT_S, retries: int = RETRIES, require_tag: bool) -> Registry:
    """A ``Registry`` for ``image`` with its credentials (from ``auth_file`` or ``auth``); nothing is sent yet."""
    ref = parse_reference(image, require_tag=require_tag)
    auths, source = load_auth(auth_file, auth)
    return Registry(ref, credentials_for(auths, ref.registry, source), plain_http=plain_http, push=push,
                    timeout=timeout, retries=retries)
