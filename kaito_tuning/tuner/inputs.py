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
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from kaito_tuning.errors import TransientError, UserError

log = logging.getLogger(__name__)

MANIFEST = ".kaito-inputs.json"
KINDS = ("parquet", "jsonl", "json", "csv")
EXTENSIONS = {"parquet": "parquet", "pq": "parquet", "jsonl": "jsonl", "ndjson": "jsonl", "json": "json",
              "csv": "csv"}
DEFAULT_MAX_BYTES = 20 * 1024**3  # 20 GiB; $KAITO_MAX_DOWNLOAD_BYTES overrides
CHUNK = 1 << 16


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
        first, _, rest = sample.partition("\n")
        try:
            json.loads(first)
        except ValueError:
            return "json"  # one object over several lines
        return "jsonl" if rest.strip() == "" or rest.lstrip().startswith("{") else "json"
    first_line = sample.partition("\n")[0]
    if "," in first_line or "\t" in first_line:
        return "csv"
    raise DatasetInvalid("is not parquet, JSON lines, JSON or CSV (first line: "
                         f"{first_line[:60]!r})", field=where)


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
    env = os.environ.get("KAITO_MAX_DOWNLOAD_BYTES")
    return int(env) if env else DEFAULT_MAX_BYTES


def download_urls(urls: list[str], dest: str | Path, *, max_bytes: int | None = None, attempts: int = 3,
                  backoff_s: float = 1.0, connect_timeout_s: float = 10.0, read_timeout_s: float = 60.0,
                  field: str = "tuning.input.urls") -> list[DataFile]:
    """Fetch every URL into ``dest``; write the manifest; return the files in URL order."""
    if not urls:
        raise UserError("no URLs to download", field=field)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cap = max_bytes_default() if max_bytes is None else max_bytes
    files = []
    for i, (url, name) in enumerate(zip(urls, local_names(urls))):
        where = f"{field}[{i}]"
        path = dest / name
        sha, size = _fetch(url, path, cap=cap, attempts=attempts, backoff_s=backoff_s,
                           timeout=(connect_timeout_s, read_timeout_s), where=where)
        files.append(DataFile(path=str(path), sha256=sha, size=size, kind=detect_kind(path, source=f"{where} ({url})"),
                              url=url))
    write_manifest(files, dest)
    return files


def _fetch(url: str, path: Path, *, cap: int, attempts: int, backoff_s: float, timeout: tuple, where: str):
    import requests

    if urlsplit(url).scheme not in ("http", "https"):
        raise DownloadRefused(f"{url!r} is not an http(s) URL", field=where)
    part = path.with_name(path.name + ".part")
    last = ""
    for attempt in range(1, attempts + 1):
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with requests.get(url, stream=True, timeout=timeout, headers=headers, allow_redirects=True) as r:
                if r.status_code == 416 and have:  # nothing left to send, or the file changed: start over
                    part.unlink()
                    last = "HTTP 416 on resume"
                    continue
                if r.status_code in (404, 410):
                    raise DownloadRefused(f"{url} answered HTTP {r.status_code} (not found): check the URL", field=where)
                if r.status_code in (401, 403):
                    raise DownloadRefused(f"{url} answered HTTP {r.status_code}: the file is not public; give a URL "
                                          "that needs no credentials (or a pre-signed one)", field=where)
                if r.status_code >= 500 or r.status_code == 429:
                    last = f"HTTP {r.status_code}"
                elif r.status_code >= 400:
                    raise DownloadRefused(f"{url} answered HTTP {r.status_code}", field=where)
                else:
                    resumed = r.status_code == 206 and have and r.headers.get("Content-Range", "").startswith(
                        f"bytes {have}-")
                    if not resumed:
                        have = 0
                    expected = _expected_size(r, have)
                    if expected is not None and expected > cap:
                        raise _too_large(url, expected, cap, where)
                    got = _stream(r, part, append=bool(resumed), start=have, cap=cap, url=url, where=where)
                    if expected is None or got == expected:
                        os.replace(part, path)
                        return sha256_file(path), got
                    last = f"connection closed after {got} of {expected} bytes"
        except (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
            last = "timed out" if isinstance(e, requests.Timeout) else f"connection failed ({type(e).__name__})"
        if attempt < attempts:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise DownloadFailed(f"{url} failed {attempts} times; last: {last}", field=where)


def _expected_size(r, have: int) -> int | None:
    length = r.headers.get("Content-Length")
    if length is None or not length.isdigit():
        return None
    return int(length) + (have if r.status_code == 206 else 0)


def _too_large(url: str, size: int, cap: int, where: str) -> UserError:
    return DownloadRefused(f"{url} is larger than the size cap ({size} > {cap} bytes); raise "
                           "KAITO_MAX_DOWNLOAD_BYTES or use a smaller file", field=where, reason="DatasetTooLarge")


def _stream(r, part: Path, *, append: bool, start: int, cap: int, url: str, where: str) -> int:
    got = start
    with open(part, "ab" if append else "wb") as fh:
        for chunk in r.iter_content(CHUNK):
            got += len(chunk)
            if got > cap:
                fh.close()
                part.unlink(missing_ok=True)
                raise _too_large(url, got, cap, where)
            fh.write(chunk)
    return got


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

    ``dataset_path`` is relative to ``root`` (Kaito's ``/mnt/data/...`` absolute form is accepted too);
    ``extension`` keeps only files of that type. Sizes and sha256s come from the download manifest
    when the download step wrote one, else they are computed here.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"input directory {root} does not exist", field=field)
    base = root
    if dataset_path:
        rel = dataset_path[len("/mnt/data"):].lstrip("/") if dataset_path.startswith("/mnt/data") else dataset_path
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
