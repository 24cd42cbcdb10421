"""What goes into an adapter image: the files, the reproducible layer, the image config, the annotations.

The image is what Kaito's inference consumes (its skopeo puller, containerd, image volumes): an
ordinary single-layer OCI *image* whose one gzip tar layer holds ``data/adapter_config.json``,
``data/adapter_model.safetensors`` and our extra files (``training_metadata.json``, a README, ...),
with a valid image config (os, architecture, ``rootfs.diff_ids``). The same adapter files always give
the same digest: entries are sorted, owned by 0:0 with no user names, mtime 0, the gzip header carries
no name or time, and the config and manifest are canonical JSON.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import struct
import tarfile
from pathlib import Path

from kaito_tuning.artifacts.errors import AdapterIncomplete
from kaito_tuning.contract import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    IMAGE_ANNOTATION_BASE_MODEL,
    IMAGE_ANNOTATION_DATASETS,
    IMAGE_ANNOTATION_METHOD,
    IMAGE_ANNOTATION_PRESET,
    IMAGE_ANNOTATION_RANK,
    METADATA_FILE,
)

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
#: layer media types we can unpack (gzip or plain tar; OCI, non-distributable and Docker spellings)
TAR_LAYERS = re.compile(r"^application/vnd\.(oci\.image\.layer(\.nondistributable)?\.v1\.tar(\+gzip)?"
                        r"|docker\.image\.rootfs\.(foreign\.)?diff\.tar(\.gzip)?)$")
#: the Kaito layout: the adapter's files live in /data of the image
DATA_DIR = "data"

#: files of the adapter directory that never go into the image: checkpoints and trainer state
_EXCLUDED = re.compile(r"^\.|\.(bin|pt|pth|ckpt|tmp|lock)$|^progress\.json$")


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
        ok = 0 < n <= min(size - 8, 100 << 20)  # safetensors caps its header at 100 MB
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
        a[IMAGE_ANNOTATION_PRESET] = str(preset)
    if base:
        a[IMAGE_ANNOTATION_BASE_MODEL] = str(base)
    if method:
        a[IMAGE_ANNOTATION_METHOD] = str(method)
    if rank is not None:
        a[IMAGE_ANNOTATION_RANK] = str(rank)
    if digests:
        a[IMAGE_ANNOTATION_DATASETS] = ",".join(str(x) for x in digests) if isinstance(digests, list) else str(digests)
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
                tar.addfile(_tarinfo(DATA_DIR, tarfile.DIRTYPE, 0o755))
                for path in files:
                    info = _tarinfo(f"{DATA_DIR}/{path.name}", tarfile.REGTYPE, 0o644)
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


def canonical(obj: dict) -> bytes:
    """Sorted keys, no spaces, UTF-8: the same object always gives the same bytes (and digest)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def image_config(diff_ids: list[str]) -> bytes:
    """An image config that container runtimes and ``skopeo inspect`` accept (unlike an artifact's)."""
    return canonical({"architecture": "amd64", "os": "linux", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": diff_ids}})


def image_manifest(config: bytes, layers: list[tuple[str, int]], annotations: dict[str, str]) -> bytes:
    """An OCI image manifest (no ``artifactType``: this is an image) for ``config`` and (digest, size) layers."""
    return canonical({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": d, "size": s} for d, s in layers],
        "annotations": annotations,
    })
