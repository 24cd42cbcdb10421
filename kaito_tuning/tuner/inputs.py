"""Dataset input: URLs → local files, or a directory (volume / image input) → the same list of files.

Every URL in ``tuning.input.urls`` is fetched (Kaito's downloader kept one file per basename and its
trainer read only the first match). Downloads stream to ``<name>.part``, retry 5xx answers,
timeouts and dropped connections with exponential backoff, resume with ``Range`` where the server
allows it, stop at a size cap, and record each file's sha256. The type of each file is read from its
content (parquet magic bytes, JSON lines, JSON, CSV); an HTML page is refused with a clear message.

A manifest (``.kaito-inputs.json``) beside the files records url, name, size, sha256 and type so
the Job's train step, in another container, knows what the download step fetched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from kaito_tuning import addresses, redact, retry
from kaito_tuning.contract import (
    DATA_DIR,
    ENV_ALLOW_PRIVATE_URLS,
    ENV_MAX_DOWNLOAD_BYTES,
    MOUNT_ROOT,
    dataset_location,
    env_flag,
    in_data_dir,
)
from kaito_tuning.errors import TransientError, UserError

log = logging.getLogger(__name__)

MANIFEST = ".kaito-inputs.json"
KINDS = ("parquet", "jsonl", "json", "csv")
EXTENSIONS = {"parquet": "parquet", "pq": "parquet", "jsonl": "jsonl", "ndjson": "jsonl", "json": "json",
              "csv": "csv"}
DEFAULT_MAX_BYTES = 20 * 1024**3  # 20 GiB; $KAITO_MAX_DOWNLOAD_BYTES overrides
CHUNK = 1 << 16
MAX_ROW_BYTES = 64 * 1024**2  # the longest first row read whole to tell JSON lines from JSON


class DownloadFailed(TransientError):
    """The server or network failed; the Job may retry."""

    reason = "DownloadFailed"


class DownloadRefused(UserError):
    """The URL itself is wrong (404, 403, too large, not data): retrying cannot help."""

    reason = "DownloadFailed"


class DatasetInvalid(UserError):
    reason = "DatasetInvalid"


@dataclass
class DataFile:
    """One input file: where it came from, where it is, and what it holds."""

    path: str
    sha256: str
    size: int
    kind: str  # parquet | jsonl | json | csv
    url: str | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


# ------------------------------------------------------------------ content sniffing

#: the header of a CSV file of one column: its name (``text``, ``messages``), maybe quoted
_ONE_COLUMN = re.compile(r'"?[A-Za-z_][A-Za-z0-9_.-]{0,63}"?')


def detect_kind(path: str | Path, *, source: str | None = None) -> str:
    """parquet, jsonl, json or csv, from the first bytes of the file; UserError for anything else."""
    where = source or str(path)
    with open(path, "rb") as fh:
        head = fh.read(64 * 1024)
    if not head:
        raise DatasetInvalid("is empty (0 bytes)", field=where)
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    lower = text[:512].lower()
    if lower.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in lower[:256]:
        raise DatasetInvalid("is an HTML page, not a dataset: the URL probably points at a web page (a login or "
                             "'blob' view) instead of the raw file; use the file's direct download URL", field=where)
    if text.startswith(b"<"):
        raise DatasetInvalid("looks like XML/HTML, not parquet, JSON lines, JSON or CSV", field=where)
    binary = DatasetInvalid("is binary but not parquet (no PAR1 magic bytes); supported: parquet, JSON lines, "
                            "JSON, CSV", field=where)
    if b"\x00" in text[:4096]:
        raise binary
    try:
        sample = text.decode("utf-8")
    except UnicodeDecodeError:
        # a multibyte character may be cut at the end of the sample
        try:
            sample = text[:-4].decode("utf-8")
        except UnicodeDecodeError:
            raise binary from None
    if sample.startswith("["):
        return "json"
    if sample.startswith("{"):
        if "\n" not in sample and len(head) == 64 * 1024:
            sample = _first_line(path)  # a first row longer than the sample: read it whole before deciding
        try:
            json.loads(sample.partition("\n")[0])
        except ValueError:
            return "json"  # one object over several lines
        return "jsonl"  # a whole object on the first line: one per line (the reader names a line that is not)
    first_line = sample.partition("\n")[0].strip()
    if "," in first_line or "\t" in first_line:
        return "csv"
    if Path(path).suffix.lower() == ".csv" and _ONE_COLUMN.fullmatch(first_line):
        return "csv"  # a file of one column: nothing to separate (only where its name says CSV)
    # what was fetched is never echoed back: it could be anything (an internal page, a secret)
    raise DatasetInvalid("is not parquet, JSON lines, JSON or CSV", field=where)


def _first_line(path: str | Path, cap: int = MAX_ROW_BYTES) -> str:
    """The first line of ``path`` (and what follows it in the buffer), up to ``cap`` bytes."""
    with open(path, "rb") as fh:
        line = fh.readline(cap)
        more = fh.read(4096)
    return (line + more).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ URLs

def local_names(urls: list[str]) -> list[str]:
    """A distinct file name per URL: the URL's basename, numbered when two URLs share one."""
    names: list[str] = []
    for i, url in enumerate(urls):
        base = posixpath.basename(unquote(urlsplit(url).path)) or f"data-{i}"
        base = "".join(c if c.isalnum() or c in "._-" else "_" for c in base).lstrip(".") or f"data-{i}"
        name, n = base, 1
        while name in names:
            n += 1
            stem, dot, ext = base.partition(".")
            name = f"{stem}-{n}{dot}{ext}"
        names.append(name)
    return names


def max_bytes_default() -> int:
    env = os.environ.get(ENV_MAX_DOWNLOAD_BYTES)
    return int(env) if env else DEFAULT_MAX_BYTES


def download_urls(urls: list[str], dest: str | Path, *, max_bytes: int | None = None,
                  attempts: int = retry.DEFAULT_ATTEMPTS, allow_private: bool | None = None,
                  connect_timeout_s: float = 10.0, read_timeout_s: float = 60.0,
                  field: str = "tuning.input.urls") -> list[DataFile]:
    """Fetch every URL into ``dest``; write the manifest; return the files in URL order.

    Each URL is tried ``attempts`` times on transient failures (the one retry policy), resuming
    partial files. Unless ``allow_private`` (default: ``$KAITO_ALLOW_PRIVATE_URLS``), every connection,
    redirects included, is checked against the address it actually reached (``addresses.py``).
    """
    if not urls:
        raise UserError("no URLs to download", field=field)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cap = max_bytes_default() if max_bytes is None else max_bytes
    allow = env_flag(ENV_ALLOW_PRIVATE_URLS) if allow_private is None else allow_private
    files = []
    with _session(allow) as session:
        for i, (url, name) in enumerate(zip(urls, local_names(urls), strict=True)):
            where, shown = f"{field}[{i}]", redact.url(url)
            path = dest / name
            fetch = _Fetch(session, url, path, cap=cap, where=where, allow_private=allow,
                           timeout=(connect_timeout_s, read_timeout_s))
            sha, size = retry.call(fetch.once, attempts=attempts)
            kind = detect_kind(path, source=f"{where} ({shown})")
            files.append(DataFile(path=str(path), sha256=sha, size=size, kind=kind, url=shown))
    write_manifest(files, dest)
    return files


# ---- one download attempt: redirects, the address policy, resume, integrity

MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)


class _Refused(Exception):
    """A connection reached an address the policy refuses (raised inside urllib3, mapped below)."""


def _guarded_connection(base):
    class Guarded(base):
        def connect(self):
            super().connect()
            why = addresses.forbidden(self.sock.getpeername()[0])
            if why:
                self.sock.close()
                raise _Refused(f"{self.host} resolved to an address that {why}")
    return Guarded


def _session(allow_private: bool):
    """A requests session with no proxies from the environment; unless private addresses are allowed,
    its connections check the peer address after connecting (so DNS tricks cannot pass)."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3 import connectionpool

    session = requests.Session()
    session.trust_env = False  # a proxy would be the peer; downloads go direct
    if not allow_private:
        class Pool(connectionpool.HTTPConnectionPool):
            ConnectionCls = _guarded_connection(connectionpool.HTTPConnectionPool.ConnectionCls)

        class TLSPool(connectionpool.HTTPSConnectionPool):
            ConnectionCls = _guarded_connection(connectionpool.HTTPSConnectionPool.ConnectionCls)

        class Adapter(HTTPAdapter):
            def init_poolmanager(self, *args, **kwargs):
                super().init_poolmanager(*args, **kwargs)
                self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": TLSPool}

        session.mount("http://", Adapter())
        session.mount("https://", Adapter())
    return session


class _Fetch:
    """Downloads one URL to ``path`` through ``<path>.part``; ``once()`` is one attempt."""

    def __init__(self, session, url: str, path: Path, *, cap: int, where: str, allow_private: bool, timeout):
        self.session, self.url, self.path, self.cap, self.where = session, url, path, cap, where
        self.allow_private, self.timeout = allow_private, timeout
        self.shown = redact.url(url)
        self.part = path.with_name(path.name + ".part")
        self.validator: str | None = None  # ETag or Last-Modified of what .part holds (for If-Range)

    def _refuse(self, message: str, **kw) -> DownloadRefused:
        return DownloadRefused(f"{self.shown} {message}", field=self.where, **kw)

    def _check_target(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise DownloadRefused(f"{redact.url(url)} is not an http(s) URL", field=self.where)
        if not self.allow_private and (why := addresses.forbidden_host(parts.hostname or "")):
            raise DownloadRefused(f"{redact.url(url)}: the host {why}; dataset URLs must be public "
                                  "(local runs may pass --allow-private-urls)", field=self.where,
                                  reason="URLNotAllowed")

    def once(self) -> tuple[str, int]:
        import requests

        have = self.part.stat().st_size if self.part.exists() and self.validator else 0
        if not have:
            self.part.unlink(missing_ok=True)
        headers = {"Range": f"bytes={have}-", "If-Range": self.validator} if have else {}
        url = self.url
        try:
            for _ in range(MAX_REDIRECTS + 1):
                self._check_target(url)
                r = self.session.get(url, stream=True, timeout=self.timeout, headers=headers, allow_redirects=False)
                if r.status_code in _REDIRECTS and r.headers.get("Location"):
                    url = urljoin(url, r.headers["Location"])
                    r.close()
                    continue
                with r:
                    return self._receive(r, have)
            raise self._refuse(f"redirects more than {MAX_REDIRECTS} times")
        except _Refused as e:
            raise DownloadRefused(f"{redact.url(url)}: {e}; dataset URLs must be public (local runs may pass "
                                  "--allow-private-urls)", field=self.where, reason="URLNotAllowed") from None
        except requests.exceptions.ConnectionError as e:
            if isinstance(e.__context__, _Refused) or "_Refused" in repr(e):
                raise DownloadRefused(f"{redact.url(url)}: {_refused_reason(e)}; dataset URLs must be public "
                                      "(local runs may pass --allow-private-urls)", field=self.where,
                                      reason="URLNotAllowed") from None
            raise DownloadFailed(f"{self.shown}: connection failed ({type(e).__name__})", field=self.where) from None
        except (requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            what = "timed out" if isinstance(e, requests.Timeout) else "the connection broke off"
            raise DownloadFailed(f"{self.shown}: {what}", field=self.where) from None

    def _receive(self, r, have: int) -> tuple[str, int]:
        code = r.status_code
        if code == 416 and have:  # nothing left to send, or the file changed: start over
            self.part.unlink(missing_ok=True)
            self.validator = None
            raise DownloadFailed(f"{self.shown}: HTTP 416 on resume; starting over", field=self.where)
        if code in (404, 410):
            raise self._refuse(f"answered HTTP {code} (not found): check the URL")
        if code in (401, 403):
            raise self._refuse(f"answered HTTP {code}: the file is not public; give a URL that needs no "
                               "credentials (or a pre-signed one)")
        if code >= 500 or code == 429:
            e = DownloadFailed(f"{self.shown} answered HTTP {code}", field=self.where)
            after = r.headers.get("Retry-After", "")
            if after.isdigit():
                e.retry_after = int(after)
            raise e
        if code >= 400 or code in _REDIRECTS:
            raise self._refuse(f"answered HTTP {code}")
        resumed = bool(have) and code == 206 and r.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        start = have if resumed else 0
        expected = _expected_size(r, start)
        if expected is not None and expected > self.cap:
            raise _too_large(self.shown, expected, self.cap, self.where)
        self.validator = r.headers.get("ETag") or r.headers.get("Last-Modified")
        got = self._stream(r, append=resumed, start=start)
        if expected is not None and got != expected:
            raise DownloadFailed(f"{self.shown}: the connection closed after {got} of {expected} bytes",
                                 field=self.where)
        if self.part.stat().st_size and not _complete(self.part):
            self.part.unlink(missing_ok=True)
            self.validator = None
            raise DownloadFailed(f"{self.shown}: the parquet file is incomplete (no footer): the download was cut "
                                 "off", field=self.where)
        if expected is None and "chunked" not in r.headers.get("Transfer-Encoding", "").lower() \
                and not _is_parquet(self.part):
            self._confirm_end(r.url, got)
        with open(self.part, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.part, self.path)
        return sha256_file(self.path), got

    def _confirm_end(self, url: str, got: int) -> None:
        """A body with neither a length nor chunked framing ends when the connection closes, which a cut
        connection does too: ask the server what lies after byte ``got`` (a file without an end marker,
        JSON lines or CSV, could otherwise be accepted short)."""
        headers = {"Range": f"bytes={got}-", **({"If-Range": self.validator} if self.validator else {})}
        self._check_target(url)
        with self.session.get(url, stream=True, timeout=self.timeout, headers=headers, allow_redirects=False) as r:
            total = None
            if r.status_code in (206, 416):
                m = re.search(r"/(\d+)\s*$", r.headers.get("Content-Range", ""))
                total = int(m.group(1)) if m else (got if r.status_code == 416 else None)
            elif r.status_code == 200 and (r.headers.get("Content-Length") or "").isdigit():
                total = int(r.headers["Content-Length"])
        if total is None:
            log.warning("%s: the server sent no length and cannot say one; accepting %d bytes", self.shown, got)
        elif total != got:
            raise DownloadFailed(f"{self.shown}: the connection closed after {got} of {total} bytes",
                                 field=self.where)

    def _stream(self, r, *, append: bool, start: int) -> int:
        got = start
        with open(self.part, "ab" if append else "wb") as fh:
            for chunk in r.iter_content(CHUNK):
                got += len(chunk)
                if got > self.cap:
                    fh.close()
                    self.part.unlink(missing_ok=True)
                    raise _too_large(self.shown, got, self.cap, self.where)
                fh.write(chunk)
        return got


def _refused_reason(e: BaseException) -> str:
    seen = e
    while seen is not None:
        if isinstance(seen, _Refused):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    m = re.search(r"_Refused\('([^']*)'", repr(e))
    return m.group(1) if m else "the address is not allowed"


def _is_parquet(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PAR1"


def _complete(path: Path) -> bool:
    """False for a parquet file without its footer (it ends with PAR1): a download cut off where HTTP
    could not tell (no Content-Length). Other formats have no end marker to check."""
    with open(path, "rb") as fh:
        if fh.read(4) != b"PAR1":
            return True
        fh.seek(max(0, path.stat().st_size - 4))
        return fh.read(4) == b"PAR1"


def _expected_size(r, start: int) -> int | None:
    length = r.headers.get("Content-Length")
    if length is None or not length.isdigit():
        return None
    return int(length) + start


def _too_large(shown: str, size: int, cap: int, where: str) -> UserError:
    return DownloadRefused(f"{shown} is larger than the size cap ({size} > {cap} bytes); raise "
                           f"{ENV_MAX_DOWNLOAD_BYTES} or use a smaller file", field=where, reason="DatasetTooLarge")


# ------------------------------------------------------------------ manifest and directories

def write_manifest(files: list[DataFile], dest: str | Path) -> None:
    dest = Path(dest)
    tmp = dest / (MANIFEST + ".tmp")
    entries = [{**asdict(f), "path": os.path.relpath(f.path, dest)} for f in files]
    tmp.write_text(json.dumps({"files": entries}, indent=1))
    os.replace(tmp, dest / MANIFEST)


def collect_dir(root: str | Path, *, dataset_path: str | None = None, extension: str | None = None,
                field: str = "tuning.input") -> list[DataFile]:
    """Every data file under ``root`` (recursively; hidden files skipped), or under ``dataset_path`` in it.

    ``dataset_path`` is read as Kaito reads it, relative to ``/mnt`` (``/data/x.parquet`` is
    ``<root>/x.parquet``: ``root`` is what the pod mounts at ``/mnt/data``);
    ``extension`` keeps only files of that type. Sizes and sha256s come from the download manifest
    when the download step wrote one, else they are computed here.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"input directory {root} does not exist", field=field)
    base = root
    if dataset_path:
        rel = in_data_dir(dataset_location(dataset_path))
        if rel is None:
            raise UserError(f"{dataset_path!r} is outside the input directory {DATA_DIR} (paths are relative to "
                            f"{MOUNT_ROOT}, as in Kaito: /data/x.parquet is {DATA_DIR}/x.parquet)",
                            field="DatasetConfig.dataset_path")
        base = root / rel
        if not base.exists():
            raise UserError(f"{dataset_path!r} does not exist in the input; files there: "
                            f"{', '.join(_listing(root)) or 'none'}", field="DatasetConfig.dataset_path")
    want = None
    if extension:
        want = EXTENSIONS.get(extension.lower().lstrip("."))
        if want is None:
            raise UserError(f"unsupported extension {extension!r}; use one of {', '.join(sorted(EXTENSIONS))}",
                            field="DatasetConfig.dataset_extension")
    known = _read_manifest(root)
    paths = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file() and not _hidden(p, base))
    files = []
    for p in paths:
        entry = known.get(str(p.resolve()))
        if entry and entry.size == p.stat().st_size:
            f = DataFile(path=str(p), sha256=entry.sha256, size=entry.size, kind=entry.kind, url=entry.url)
        else:
            try:
                kind = detect_kind(p, source=str(p.relative_to(root)))
            except DatasetInvalid:
                if p.suffix.lstrip(".").lower() in EXTENSIONS or base.is_file():
                    raise
                log.warning("skipping %s: not a data file", p)
                continue
            f = DataFile(path=str(p), sha256=sha256_file(p), size=p.stat().st_size, kind=kind)
        if want is None or f.kind == want or p.suffix.lstrip(".").lower() == extension.lower().lstrip("."):
            files.append(f)
    if not files:
        what = f" with extension {extension!r}" if extension else ""
        raise UserError(f"no data files{what} in the input {base}; files there: "
                        f"{', '.join(_listing(root)) or 'none'}", field=field, reason="DatasetInvalid")
    return files


def _hidden(p: Path, base: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(base).parts) or p.name.endswith(".part")


def _listing(root: Path, limit: int = 10) -> list[str]:
    names = [str(p.relative_to(root)) for p in sorted(root.rglob("*")) if p.is_file() and not _hidden(p, root)]
    return names[:limit] + ([f"... ({len(names) - limit} more)"] if len(names) > limit else [])


def _read_manifest(root: Path) -> dict[str, DataFile]:
    try:
        doc = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for e in doc.get("files", []):
        f = DataFile(**{**e, "path": str(root / e["path"])})
        out[str(Path(f.path).resolve())] = f
    return out
