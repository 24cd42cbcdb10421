"""Push an adapter directory as an image, pull it back, pull a dataset image's /data.

Everything that can be checked locally (reference, credentials, adapter files) is checked before
the first byte goes to a registry; a pull writes into a staging directory inside the destination
and moves the files into place only once the whole image is unpacked and checked.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import kaito_tuning.artifacts.layers as layers
from kaito_tuning.artifacts.errors import (
    AdapterIncomplete,
    ImageTooLarge,
    InvalidAnnotation,
    InvalidImageReference,
    NoDataInImage,
    NotAnAdapter,
    RegistryError,
)
from kaito_tuning.artifacts.registry import DEFAULT_TIMEOUT_S, RETRIES, connect, parse_reference
from kaito_tuning.artifacts.unpack import Budget, prepare_destination, unpack_layer
from kaito_tuning.contract import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ENV_MAX_DOWNLOAD_BYTES


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


def push_adapter(adapter_dir: str | os.PathLike, image: str, *, auth_file: str | os.PathLike | None = None,
                 auth: dict | None = None, plain_http: bool = False, annotations: dict | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, retries: int = RETRIES) -> PushResult:
    """Push ``adapter_dir`` as the image ``image`` (registry/repository:tag); return its digest."""
    ref = push_reference(image)
    files = layers.adapter_files(adapter_dir)
    notes = layers.adapter_annotations(adapter_dir)
    for k, v in (annotations or {}).items():
        if not isinstance(k, str) or not k or not isinstance(v, str):
            raise InvalidAnnotation(f"annotation {k!r}={v!r}: keys and values must be non-empty strings")
        notes[k] = v
    registry = connect(image, auth_file=auth_file, auth=auth, plain_http=plain_http, push=True, timeout=timeout,
                       retries=retries, require_tag=True)
    with registry, tempfile.TemporaryDirectory(prefix="kaito-push-") as tmp:
        blob = Path(tmp) / "layer.tar.gz"
        layer_digest, layer_size, diff_id = layers.build_layer(files, blob)
        config = layers.image_config([diff_id])
        (Path(tmp) / "config.json").write_bytes(config)
        manifest = layers.image_manifest(config, [(layer_digest, layer_size)], notes)
        digest = layers.digest_of(manifest)
        registry.ping()
        registry.push_blob(blob, layer_digest, layer_size, layers.MEDIA_LAYER)
        registry.push_blob(Path(tmp) / "config.json", layers.digest_of(config), len(config), layers.MEDIA_CONFIG)
        check_stored(ref, registry.put_manifest(manifest, layers.MEDIA_MANIFEST), digest)
    return PushResult(reference=f"{ref.registry}/{ref.repository}:{ref.tag}", digest=digest,
                      size=len(manifest) + len(config) + layer_size, files=[p.name for p in files])


def push_reference(image: str):
    """``image`` parsed as a push target: a tag (not a digest), a lowercase repository."""
    ref = parse_reference(image, require_tag=True)
    if ref.digest:
        raise InvalidImageReference(f"image reference {image!r}: push to a tag, not a digest; drop @{ref.digest}")
    if ref.repository != ref.repository.lower():
        raise InvalidImageReference(f"image reference {image!r}: registries accept only lowercase repository "
                                    f"names; use {ref.registry}/{ref.repository.lower()}:{ref.tag}")
    return ref


def check_stored(ref, echoed: str | None, digest: str) -> None:
    """The registry must store the manifest that was sent (its echoed digest, when it gives one)."""
    if echoed and echoed != digest:
        raise RegistryError(f"registry {ref.registry} stored the manifest as {echoed}, not {digest}")


def pull_adapter(image: str, dest_dir: str | os.PathLike, *, auth_file: str | os.PathLike | None = None,
                 auth: dict | None = None, plain_http: bool = False, timeout: float = DEFAULT_TIMEOUT_S,
                 retries: int = RETRIES, budget: Budget | None = None) -> PullResult:
    """Pull an adapter image's /data into ``dest_dir`` (new or empty), laid out as PEFT expects."""
    return _pull(image, dest_dir, auth_file=auth_file, auth=auth, plain_http=plain_http, timeout=timeout,
                 retries=retries, budget=budget, check=_check_adapter)


def pull_data(image: str, dest_dir: str | os.PathLike, *, auth_file: str | os.PathLike | None = None,
              auth: dict | None = None, plain_http: bool = False, timeout: float = DEFAULT_TIMEOUT_S,
              retries: int = RETRIES, budget: Budget | None = None) -> PullResult:
    """Pull the whole /data directory of any image (a dataset image, say) into ``dest_dir``."""
    return _pull(image, dest_dir, auth_file=auth_file, auth=auth, plain_http=plain_http, timeout=timeout,
                 retries=retries, budget=budget, check=None)


def _check_adapter(image: str, files: list[str]) -> None:
    if ADAPTER_CONFIG not in files:
        listing = ", ".join(f"/data/{f}" for f in files[:8]) + (", ..." if len(files) > 8 else "")
        raise NotAnAdapter(f"image {image} is not an adapter: it has no /data/{ADAPTER_CONFIG} "
                           f"(its /data holds: {listing})")
    if ADAPTER_WEIGHTS not in files and "adapter_model.bin" not in files:
        raise AdapterIncomplete(f"image {image} has /data/{ADAPTER_CONFIG} but no /data/{ADAPTER_WEIGHTS}")


def _pull(image, dest_dir, *, auth_file, auth, plain_http, timeout, retries, budget, check) -> PullResult:
    budget = budget or Budget.default()
    registry = connect(image, auth_file=auth_file, auth=auth, plain_http=plain_http, push=False, timeout=timeout,
                       retries=retries, require_tag=False)
    ref, dest, stage = registry.ref, Path(dest_dir), None
    try:
        registry.ping()
        manifest, digest, found = resolve_image(registry, image, budget)
        blobs = image_layers(manifest, found, image)
        stage = prepare_destination(dest)  # only once the image is known to exist
        root = stage / layers.DATA_DIR
        root.mkdir()
        for i, (blob_digest, size) in enumerate(blobs):
            blob = stage / f"layer-{i}"
            registry.fetch_blob(blob_digest, size, blob)
            unpack_layer(blob, root, image, budget)
            blob.unlink()
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        if not files:
            raise NoDataInImage(f"image {image} has no files under /data; put the files under /data in the image")
        if check:
            check(image, files)
        for entry in root.iterdir():
            os.replace(entry, dest / entry.name)
    finally:
        registry.close()
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    return PullResult(reference=str(ref), digest=digest, dest_dir=str(dest), files=files)


def choose_platform(index: dict, image: str) -> str:
    """An adapter has no platform; from a multi-platform index take linux/amd64, else the first image."""
    entries = [m for m in index.get("manifests") or [] if isinstance(m, dict)
               and (m.get("platform") or {}).get("os", "linux") != "unknown"]  # skip attestations
    if not entries:
        raise NotAnAdapter(f"image {image} is an index without images")
    best = next((m for m in entries if (m.get("platform") or {}).get("architecture") == "amd64"), entries[0])
    digest = str(best.get("digest", ""))
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise NotAnAdapter(f"image {image} is an index whose entry has no usable digest ({digest[:80]!r})")
    return digest


def resolve_image(registry, image: str, budget: Budget) -> tuple[dict, str, list[dict]]:
    """(manifest, digest, layer descriptors) of the image the registry's reference names: a multi-platform
    index resolved to one platform (``choose_platform``), the manifest's schema and every layer's size
    checked, and their total within ``budget``, before anything is downloaded."""
    manifest, digest = registry.fetch_manifest(registry.ref.reference)
    if manifest.get("mediaType") in (layers.MEDIA_INDEX, layers.DOCKER_LIST) or "manifests" in manifest:
        manifest, _ = registry.fetch_manifest(choose_platform(manifest, image))
    media = manifest.get("mediaType", "")
    if manifest.get("schemaVersion") != 2 or media not in (layers.MEDIA_MANIFEST, layers.DOCKER_MANIFEST, ""):
        raise NotAnAdapter(f"image {image} has a manifest of type {media or 'unknown'} that we cannot read")
    found = manifest.get("layers") or []
    for layer in found:
        size = layer.get("size") if isinstance(layer, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise NotAnAdapter(f"image {image} has a layer without a valid size in its manifest")
    total = sum(layer["size"] for layer in found)
    if total > budget.max_bytes:
        raise ImageTooLarge(f"image {image} has {total} bytes of layers, more than the {budget.max_bytes} allowed "
                            f"({ENV_MAX_DOWNLOAD_BYTES} raises it)")
    return manifest, digest, found


def image_layers(manifest: dict, found: list[dict], image: str) -> list[tuple[str, int]]:
    """(digest, size) of each layer of a container image (``resolve_image``'s); refuses artifacts and layers
    we cannot unpack."""
    config_type = (manifest.get("config") or {}).get("mediaType", "")
    out = []
    for layer in found:
        if not layers.TAR_LAYERS.match(str(layer.get("mediaType", ""))):
            if config_type not in (layers.MEDIA_CONFIG, layers.DOCKER_CONFIG):
                raise NotAnAdapter(f"image {image} is an OCI artifact (config type {config_type!r}), not a container "
                                   "image; push the files under /data/ in the gzip tar layer of an image")
            raise NotAnAdapter(f"image {image} has a layer of type {layer.get('mediaType')!r} that cannot be "
                               "unpacked here (only tar and tar+gzip layers)")
        out.append((str(layer.get("digest", "")), layer["size"]))
    return out
