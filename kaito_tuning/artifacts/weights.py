"""Base-model weights from a registry, pulled into the weights cache: Kaito's way of shipping them.

Two shapes are read, told apart by the manifest:

- **an artifact of files** (Kaito's preset weights since its 0.2.0 tags, ``kaito-<model>:<tag>``
  under ``PRESET_REGISTRY_NAME``, which its init container fetches with ``oras pull``): every layer
  is one file named by its ``org.opencontainers.image.title`` annotation (a relative path), with a
  ModelPack media type (``application/vnd.cncf.model.weight.v1.raw``, ``...weight.config.v1.raw``,
  ...) or any other. A layer packed as tar or tar+gzip (ModelPack's other modes) is unpacked instead.
- **a container image** (Kaito's older preset images, or any image built ``FROM`` something with
  the weights copied in): the layers are listed first, then the model directory is unpacked:
  ``/workspace/weights`` or ``/workspace/tfs/weights`` (Kaito's paths; a symbolic link between them
  is followed), else the shallowest directory holding ``config.json`` and weights.

Either way the result is a directory with ``config.json`` (and the weights and tokenizer) under
the cache root, named after the reference, with a marker that records the digest: a second call
(the train step after the download step, a retried pod) finds it there without the registry.
The manifest is read (``transfer.resolve_image``), downloads digest-checked and capped (``Budget``,
``$KAITO_MAX_DOWNLOAD_BYTES``) as every pull.

``push_weights`` writes a model directory in Kaito's artifact shape (to mirror weights into a
registry an air-gapped cluster can reach, and for tests and the demo).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import kaito_tuning.artifacts.layers as layers
from kaito_tuning.artifacts.errors import NoWeightsInImage, UnsafeImage
from kaito_tuning.artifacts.registry import DEFAULT_TIMEOUT_S, RETRIES, Registry, connect, parse_reference
from kaito_tuning.artifacts.transfer import check_stored, push_reference, resolve_image
from kaito_tuning.artifacts.unpack import STAGING_PREFIX, Budget, layer_entries, unpack_layer

TITLE = "org.opencontainers.image.title"
MODELPACK_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
FILEPATH = "org.cncf.model.filepath"
#: ModelPack layers packed as tar (``...v1.tar``, ``...v1.tar+gzip``): unpacked rather than written as they are
_TAR_MEDIA = re.compile(r"\.tar(\+gzip)?$|\.tar\.gzip$")
#: where Kaito's model images keep the weights, first found wins
KAITO_WEIGHTS_DIRS = ("workspace/weights", "workspace/tfs/weights")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
MARKER = ".kaito-weights.json"
EXPECTED = ("a model directory: config.json, the weights (*.safetensors) and the tokenizer, as the files of an "
            "artifact (Kaito's kaito-<model>:<tag>, one file per layer named by org.opencontainers.image.title) "
            "or in an image under /workspace/weights")


@dataclass(frozen=True)
class WeightsPull:
    reference: str
    digest: str
    model_dir: str  #: the directory to load the model from
    shape: str  #: artifact or image
    files: list[str] = field(default_factory=list)
    cached: bool = False  #: found in the cache, nothing downloaded


def cache_path(image: str, root: str | os.PathLike) -> Path:
    """Where ``image``'s weights live under ``root``: readable name, and a hash of the whole reference."""
    ref = parse_reference(image, require_tag=False)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", ref.repository.rsplit("/", 1)[-1])[:60]
    return Path(root) / f"{name}-{hashlib.sha256(str(ref).encode()).hexdigest()[:12]}"


def cached_weights(image: str, root: str | os.PathLike) -> WeightsPull | None:
    """The weights of ``image`` already pulled under ``root`` (the marker names this reference), else None."""
    d = cache_path(image, root)
    try:
        mark = json.loads((d / MARKER).read_text())
    except (OSError, ValueError):
        return None
    ref = str(parse_reference(image, require_tag=False))
    if not isinstance(mark, dict) or mark.get("reference") != ref or not (d / "config.json").is_file():
        return None
    return WeightsPull(reference=ref, digest=str(mark.get("digest", "")), model_dir=str(d),
                       shape=str(mark.get("shape", "")), files=list(mark.get("files") or []), cached=True)


def pull_weights(image: str, root: str | os.PathLike, *, auth_file: str | os.PathLike | None = None,
                 auth: dict | None = None, plain_http: bool = False, timeout: float = DEFAULT_TIMEOUT_S,
                 retries: int = RETRIES, budget: Budget | None = None) -> WeightsPull:
    """The model directory of ``image`` under ``root``: from the cache, else pulled (see the module doc)."""
    if (done := cached_weights(image, root)) is not None:
        return done
    budget = budget or Budget.default()
    registry = connect(image, auth_file=auth_file, auth=auth, plain_http=plain_http, push=False, timeout=timeout,
                       retries=retries, require_tag=False)
    dest, stage = cache_path(image, root), None
    try:
        registry.ping()
        manifest, digest, found = resolve_image(registry, image, budget)
        if not found:
            raise NoWeightsInImage(f"image {image} has no layers; expected {EXPECTED}")
        Path(root).mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
        config_type = (manifest.get("config") or {}).get("mediaType", "")
        is_image = (config_type in (layers.MEDIA_CONFIG, layers.DOCKER_CONFIG)
                    and all(layers.TAR_LAYERS.match(str(x.get("mediaType", ""))) for x in found))
        if is_image:
            model = _from_image(registry, found, stage, image, budget)
        else:
            model = _from_files(registry, found, stage, image, budget)
        files = _check_model(model, image)
        shape = "image" if is_image else "artifact"
        (model / MARKER).write_text(json.dumps({"reference": str(registry.ref), "digest": digest, "shape": shape,
                                                "files": files}, indent=1))
        if dest.exists():  # a pull that never finished (no marker), or one for another digest of the tag
            shutil.rmtree(dest)
        os.replace(model, dest)
    finally:
        registry.close()
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    return WeightsPull(reference=str(registry.ref), digest=digest, model_dir=str(dest), shape=shape, files=files)


def _relative(title: str, image: str) -> list[str]:
    """A title annotation as path parts under the model directory: relative, no ``..``, no empty name."""
    parts = [p for p in title.split("/") if p not in ("", ".")]
    if not parts or title.startswith("/") or ".." in parts or "\\" in title or "\x00" in title:
        raise UnsafeImage(f"image {image}: a layer is titled {title[:100]!r}, which is not a relative file path; "
                          "refused")
    return parts


def _from_files(registry: Registry, found: list[dict], stage: Path, image: str, budget: Budget) -> Path:
    """An artifact: each layer written as the file its title names (a tar layer unpacked). Returns the model dir."""
    root = stage / "model"
    root.mkdir()
    for i, x in enumerate(found):
        media = str(x.get("mediaType", ""))
        title = (x.get("annotations") or {}).get(TITLE)
        is_tar = bool(_TAR_MEDIA.search(media)) or bool(layers.TAR_LAYERS.match(media))
        if media.endswith("zstd"):
            raise NoWeightsInImage(f"image {image}: layer {i} is zstd-compressed ({media}), which is not read here; "
                                   "push the files uncompressed (Kaito's default, layer_packaging raw) or as tar+gzip")
        if not is_tar and not isinstance(title, str):
            raise NoWeightsInImage(f"image {image}: layer {i} ({media or 'no media type'}) has no {TITLE} "
                                   f"annotation naming its file; expected {EXPECTED}")
        blob = stage / f"blob-{i}"
        registry.fetch_blob(str(x.get("digest", "")), int(x["size"]), blob)
        if is_tar:
            unpack_layer(blob, root, image, budget, prefix="")
            blob.unlink()
            continue
        budget.add(image, int(x["size"]))
        target = root.joinpath(*_relative(title, image))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                raise FileExistsError(target)
        except OSError:  # the same name twice, or a file where a directory should be
            raise UnsafeImage(f"image {image}: two layers write {title[:100]!r}; refused") from None
        os.replace(blob, target)
    return root


def _from_image(registry: Registry, found: list[dict], stage: Path, image: str, budget: Budget) -> Path:
    """A container image: list its layers, find the model directory, unpack only that. Returns the model dir."""
    blobs = []
    for i, x in enumerate(found):
        blob = stage / f"layer-{i}"
        registry.fetch_blob(str(x.get("digest", "")), int(x["size"]), blob)
        blobs.append(blob)
    listing = Budget(max_bytes=budget.max_bytes, max_members=budget.max_members)  # the scan is charged on its own
    entries: dict[str, tuple[str, str]] = {}
    for blob in blobs:
        for path, kind, link in layer_entries(blob, image, listing):
            entries[path] = (kind, link)
    where = model_dir_in(entries)
    if where is None:
        raise NoWeightsInImage(f"image {image} holds no config.json with weights beside it (looked in "
                               f"{', '.join('/' + d for d in KAITO_WEIGHTS_DIRS)} and every other directory); "
                               f"expected {EXPECTED}")
    root = stage / "model"
    root.mkdir()
    for blob in blobs:
        unpack_layer(blob, root, image, budget, prefix=where)
        blob.unlink()
    return root


def model_dir_in(entries: dict[str, tuple[str, str]]) -> str | None:
    """The path (in the image, no leading /) of the model directory among a layer listing
    ``{path: (kind, link)}``: Kaito's paths first (a symbolic link there followed once), else the
    shallowest directory with config.json and a weights file."""
    def has_model(d: str) -> bool:
        if entries.get(f"{d}/config.json", ("",))[0] != "file":
            return False
        return any(p.startswith(d + "/") and p.endswith(WEIGHT_SUFFIXES) for p in entries)

    for d in KAITO_WEIGHTS_DIRS:
        kind, link = entries.get(d, ("", ""))
        if kind == "symlink":
            d = posixpath.normpath(link.lstrip("/") if link.startswith("/") else posixpath.join(posixpath.dirname(d), link))
            if d.startswith(".."):
                continue
        if has_model(d):
            return d
    dirs = sorted({p.rsplit("/", 1)[0] for p, (kind, _) in entries.items() if p.endswith("/config.json")
                   and kind == "file"}, key=lambda d: (d.count("/"), d))
    return next((d for d in dirs if has_model(d)), None)


def _check_model(model: Path, image: str) -> list[str]:
    """The files of a pulled model directory; NoWeightsInImage when config.json or the weights are missing."""
    files = sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file())
    shown = ", ".join(files[:8]) + (", ..." if len(files) > 8 else "") if files else "nothing"
    if "config.json" not in files:
        raise NoWeightsInImage(f"image {image} has no config.json (it holds: {shown}); expected {EXPECTED}")
    if not any(f.endswith(WEIGHT_SUFFIXES) for f in files):
        raise NoWeightsInImage(f"image {image} has config.json but no weights (*.safetensors or *.bin) beside it "
                               f"(it holds: {shown}); expected {EXPECTED}")
    return files


def _modelpack_type(name: str) -> str:
    """The ModelPack media type of one file, by the categories Kaito's packager (aikit) uses."""
    base = name.rsplit("/", 1)[-1].lower()
    if base.endswith((".safetensors", ".bin", ".gguf", ".pt", ".ckpt")):
        kind = "weight"
    elif base.startswith(("readme", "license")) or base.endswith(".md"):
        kind = "doc"
    elif base.endswith((".py", ".sh", ".ipynb")):
        kind = "code"
    else:
        kind = "weight.config"
    return f"application/vnd.cncf.model.{kind}.v1.raw"


def push_weights(model_dir: str | os.PathLike, image: str, *, auth_file: str | os.PathLike | None = None,
                 auth: dict | None = None, plain_http: bool = False, timeout: float = DEFAULT_TIMEOUT_S,
                 retries: int = RETRIES) -> tuple[str, str]:
    """Push ``model_dir`` (config.json, weights, tokenizer) as an artifact in Kaito's shape: one
    layer per file, titled with its relative path. Returns (reference, manifest digest)."""
    d = Path(model_dir)
    files = sorted(p for p in d.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(d).parts))
    names = [p.relative_to(d).as_posix() for p in files]
    if "config.json" not in names:
        raise NoWeightsInImage(f"{d} has no config.json: give a directory written by save_pretrained")
    ref = push_reference(image)
    registry = connect(image, auth_file=auth_file, auth=auth, plain_http=plain_http, push=True, timeout=timeout,
                       retries=retries, require_tag=True)
    config = b"{}"
    entries = []
    with registry:
        registry.ping()
        for path, name in zip(files, names):
            digest, size, media = _file_digest(path), path.stat().st_size, _modelpack_type(name)
            registry.push_blob(path, digest, size, media)
            entries.append({"mediaType": media, "digest": digest, "size": size,
                            "annotations": {TITLE: name, FILEPATH: name}})
        with tempfile.TemporaryDirectory(prefix="kaito-push-") as tmp:
            (Path(tmp) / "config").write_bytes(config)
            registry.push_blob(Path(tmp) / "config", layers.digest_of(config), len(config), MODELPACK_CONFIG)
        manifest = layers.canonical({
            "schemaVersion": 2, "mediaType": layers.MEDIA_MANIFEST, "artifactType": MODELPACK_ARTIFACT,
            "config": {"mediaType": MODELPACK_CONFIG, "digest": layers.digest_of(config), "size": len(config)},
            "layers": entries})
        check_stored(ref, registry.put_manifest(manifest, layers.MEDIA_MANIFEST), layers.digest_of(manifest))
    return str(registry.ref), layers.digest_of(manifest)


def _file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return f"sha256:{sha.hexdigest()}"
