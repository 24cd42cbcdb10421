"""Base-model weights from a registry (artifacts/weights.py), against a real docker-registry.

The two shapes are published by tools other than ours: Kaito's artifact shape (one file per layer,
ModelPack media types, ``org.opencontainers.image.title``) by oras-py's own ``push``; a model image
(a gzip tar layer holding /workspace/weights, as Kaito's older preset images) by skopeo from an OCI
layout. ``push_weights`` (ours) is read back by oras-py's ``pull``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from fixtures_registry import REGISTRY_PASSWORD, REGISTRY_USER, write_safetensors

from kaito_tuning.artifacts.errors import (
    NoWeightsInImage,
    RegistryAuthFailed,
    RegistryUnreachable,
    UnsafeImage,
)
from kaito_tuning.artifacts.weights import (
    MODELPACK_CONFIG,
    TITLE,
    cache_path,
    cached_weights,
    model_dir_in,
    pull_weights,
    push_weights,
)
from kaito_tuning.errors import EXIT_TRANSIENT, EXIT_USER_ERROR


def fake_model(d: Path) -> Path:
    """A model directory's shape (config, safetensors, tokenizer files); no torch needed."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    write_safetensors(d / "model.safetensors", {"w": ([2, 2], bytes(range(16)))})
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    (d / "README.md").write_text("# tiny\n")
    return d


def tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def push_with_oras_py(model_dir: Path, registry, target: str, *, titles: dict[str, str] | None = None) -> None:
    """Kaito's artifact shape, written by oras-py (not by us): each file a layer with a ModelPack type."""
    import oras.client

    client = oras.client.OrasClient(hostname=registry.host, insecure=True, auth_backend="basic")
    client.login(REGISTRY_USER, REGISTRY_PASSWORD, hostname=registry.host)
    config = model_dir.parent / "modelpack-config.json"
    config.write_text("{}")
    files = []
    for p in sorted(model_dir.iterdir()):
        kind = "weight" if p.suffix == ".safetensors" else "doc" if p.suffix == ".md" else "weight.config"
        files.append(f"{p}:application/vnd.cncf.model.{kind}.v1.raw")
    client.push(f"{registry.host}/{target}", files=files, manifest_config=f"{config}:{MODELPACK_CONFIG}",
                disable_path_validation=True, quiet=True)


def push_image_with_skopeo(layer_files: dict[str, bytes | str], registry, target: str, tmp: Path,
                           symlinks: dict[str, str] | None = None) -> None:
    """A container image with one gzip tar layer (``{path in image: content}``), copied to the registry by skopeo."""
    if not shutil.which("skopeo"):
        pytest.skip("skopeo is not installed")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({"/".join(p.split("/")[:i]) for p in [*layer_files, *(symlinks or {})]
                       for i in range(1, p.count("/") + 1)})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for path, data in layer_files.items():
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for path, to in (symlinks or {}).items():
            info = tarfile.TarInfo(path)
            info.type, info.linkname = tarfile.SYMTYPE, to
            tar.addfile(info)
    plain = raw.getvalue()
    layer = gzip.compress(plain, mtime=0)
    layout = tmp / f"layout-{hashlib.sha256(target.encode()).hexdigest()[:8]}"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> tuple[str, int]:
        h = hashlib.sha256(data).hexdigest()
        (blobs / h).write_bytes(data)
        return f"sha256:{h}", len(data)

    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(plain).hexdigest()}"]}
                         }).encode()
    cd, cs = blob(config)
    ld, ls = blob(layer)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld,
                                       "size": ls}]}).encode()
    md, ms = blob(manifest)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
         "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", "--dest-authfile", registry.auth_file,
                    f"oci:{layout}:latest", f"docker://{registry.host}/{target}"], check=True, capture_output=True)


def model_files_in_image(model: Path, under: str) -> dict[str, bytes]:
    return {f"{under}/{k}": v for k, v in tree(model).items()}


def _pull(registry, image: str, root: Path, **kw):
    return pull_weights(f"{registry.host}/{image}", root, auth_file=registry.auth_file, plain_http=True, **kw)


def test_kaitos_artifact_shape_pushed_by_oras_py_is_pulled_file_for_file(registry, tmp_path):
    model = fake_model(tmp_path / "model")
    push_with_oras_py(model, registry, "kaito/kaito-tiny:0.2.0")
    got = _pull(registry, "kaito/kaito-tiny:0.2.0", tmp_path / "cache")
    assert got.shape == "artifact" and not got.cached and got.digest.startswith("sha256:")
    assert tree(Path(got.model_dir)) == tree(model)
    assert Path(got.model_dir) == cache_path(f"{registry.host}/kaito/kaito-tiny:0.2.0", tmp_path / "cache")
    # a second call (the train step after the download step) finds it without a registry or credentials
    again = pull_weights(f"{registry.host}/kaito/kaito-tiny:0.2.0", tmp_path / "cache", auth_file=None,
                         plain_http=False)
    assert again.cached and again.model_dir == got.model_dir and again.digest == got.digest
    assert not list((tmp_path / "cache").glob(".kaito-pull-*"))  # no staging left behind


@pytest.mark.parametrize("under,link", [("workspace/weights", None),
                                        ("workspace/tfs/weights", None),
                                        ("workspace/weights", ("workspace/tfs/weights", "/workspace/weights")),
                                        ("opt/models/tiny", None)])
def test_model_image_layers_hold_the_weights_directory(registry, tmp_path, under, link):
    model = fake_model(tmp_path / "model")
    files = {**model_files_in_image(model, under), "usr/lib/python3/site-packages/x/config.json": "{}",
             "etc/hostname": "kaito"}
    tag = f"models/img-{under.replace('/', '-')}-{'link' if link else 'plain'}:1"
    push_image_with_skopeo(files, registry, tag, tmp_path, symlinks=dict([link]) if link else None)
    got = _pull(registry, tag, tmp_path / "cache")
    assert got.shape == "image"
    assert tree(Path(got.model_dir)) == tree(model)  # only the model directory, nothing else of the image


def test_our_push_writes_kaitos_shape_that_oras_py_pulls(registry, tmp_path):
    import oras.client

    model = fake_model(tmp_path / "model")
    (model / "sub").mkdir()
    (model / "sub" / "extra.txt").write_text("nested")
    ref, digest = push_weights(model, f"{registry.host}/kaito/kaito-ours:0.2.0", auth_file=registry.auth_file,
                               plain_http=True)
    client = oras.client.OrasClient(hostname=registry.host, insecure=True, auth_backend="basic")
    client.login(REGISTRY_USER, REGISTRY_PASSWORD, hostname=registry.host)
    manifest = client.get_manifest(ref)
    assert manifest["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert manifest["config"]["mediaType"] == MODELPACK_CONFIG
    kinds = {x["annotations"][TITLE]: x["mediaType"] for x in manifest["layers"]}
    assert kinds["model.safetensors"] == "application/vnd.cncf.model.weight.v1.raw"
    assert kinds["config.json"] == "application/vnd.cncf.model.weight.config.v1.raw"
    assert kinds["README.md"] == "application/vnd.cncf.model.doc.v1.raw"
    assert kinds["sub/extra.txt"] == "application/vnd.cncf.model.weight.config.v1.raw"
    got = _pull(registry, "kaito/kaito-ours:0.2.0", tmp_path / "cache")
    assert got.digest == digest and tree(Path(got.model_dir)) == tree(model)


def test_wrong_password_is_a_user_error_without_the_secret(registry, tmp_path):
    model = fake_model(tmp_path / "model")
    push_with_oras_py(model, registry, "kaito/kaito-auth:1")
    bad = tmp_path / "bad.json"
    secret = "not-the-password-xyz"
    import base64

    bad.write_text(json.dumps({"auths": {registry.host: {"auth": base64.b64encode(
        f"{REGISTRY_USER}:{secret}".encode()).decode()}}}))
    with pytest.raises(RegistryAuthFailed) as e:
        pull_weights(f"{registry.host}/kaito/kaito-auth:1", tmp_path / "cache", auth_file=bad, plain_http=True)
    assert e.value.exit_code == EXIT_USER_ERROR and secret not in e.value.one_line()
    assert "\n" not in e.value.one_line()
    assert not cached_weights(f"{registry.host}/kaito/kaito-auth:1", tmp_path / "cache")


def test_unreachable_registry_is_transient(tmp_path, no_sleep):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RegistryUnreachable) as e:
        pull_weights(f"127.0.0.1:{port}/kaito/kaito-x:1", tmp_path / "cache", plain_http=True, retries=1)
    assert e.value.exit_code == EXIT_TRANSIENT and "127.0.0.1" in str(e.value)


def test_an_image_without_config_json_names_the_image_and_what_was_expected(registry, tmp_path):
    push_image_with_skopeo({"workspace/weights/model.safetensors": "x", "etc/os-release": "debian"}, registry,
                           "models/noconfig:1", tmp_path)
    with pytest.raises(NoWeightsInImage) as e:
        _pull(registry, "models/noconfig:1", tmp_path / "cache")
    msg = e.value.one_line()
    assert e.value.exit_code == EXIT_USER_ERROR
    assert f"{registry.host}/models/noconfig:1" in msg and "config.json" in msg and "/workspace/weights" in msg

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "hi"}\n')
    push_with_oras_py(data, registry, "kaito/dataset-not-a-model:1")
    with pytest.raises(NoWeightsInImage, match=r"has no config\.json \(it holds: train\.jsonl\)"):
        _pull(registry, "kaito/dataset-not-a-model:1", tmp_path / "cache")


def test_config_without_weights_is_refused(registry, tmp_path):
    d = tmp_path / "cfgonly"
    d.mkdir()
    (d / "config.json").write_text("{}")
    push_with_oras_py(d, registry, "kaito/cfgonly:1")
    with pytest.raises(NoWeightsInImage, match=r"no weights \(\*\.safetensors or \*\.bin\)"):
        _pull(registry, "kaito/cfgonly:1", tmp_path / "cache")


def test_a_title_outside_the_directory_is_refused(registry, tmp_path):
    """A hostile artifact: a layer titled ../escape must not be written outside the cache."""
    from kaito_tuning.artifacts.registry import connect

    reg = connect(f"{registry.host}/kaito/evil:1", auth_file=registry.auth_file, plain_http=True, push=True,
                  require_tag=True)
    blob = tmp_path / "b"
    blob.write_bytes(b"owned")
    digest = "sha256:" + hashlib.sha256(b"owned").hexdigest()
    cfg = tmp_path / "c"
    cfg.write_bytes(b"{}")
    with reg:
        reg.ping()
        reg.push_blob(blob, digest, 5, "application/vnd.cncf.model.weight.v1.raw")
        reg.push_blob(cfg, "sha256:" + hashlib.sha256(b"{}").hexdigest(), 2, MODELPACK_CONFIG)
        reg.put_manifest(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                     "config": {"mediaType": MODELPACK_CONFIG, "size": 2,
                                                "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest()},
                                     "layers": [{"mediaType": "application/vnd.cncf.model.weight.v1.raw",
                                                 "digest": digest, "size": 5,
                                                 "annotations": {TITLE: "../../escape"}}]}).encode(),
                         "application/vnd.oci.image.manifest.v1+json")
    with pytest.raises(UnsafeImage, match="not a relative file path"):
        _pull(registry, "kaito/evil:1", tmp_path / "cache")
    assert not (tmp_path / "escape").exists() and not any(p.name == "escape" for p in tmp_path.rglob("*"))


def test_the_download_budget_applies(registry, tmp_path):
    from kaito_tuning.artifacts.errors import ImageTooLarge
    from kaito_tuning.artifacts.unpack import Budget

    push_with_oras_py(fake_model(tmp_path / "model"), registry, "kaito/budget:1")
    with pytest.raises(ImageTooLarge):
        _pull(registry, "kaito/budget:1", tmp_path / "cache", budget=Budget(max_bytes=10))


def test_model_dir_in_prefers_kaitos_paths_and_follows_their_link():
    f = ("file", "")
    entries = {"a/config.json": f, "a/model.safetensors": f, "workspace/weights/config.json": f,
               "workspace/weights/model-00001.safetensors": f}
    assert model_dir_in(entries) == "workspace/weights"
    linked = {"workspace/tfs/weights": ("symlink", "../weights"), "workspace/weights/config.json": f,
              "workspace/weights/x.bin": f}
    assert model_dir_in(linked) == "workspace/weights"
    assert model_dir_in({"deep/er/config.json": f, "deep/er/w.safetensors": f, "b/config.json": f,
                         "b/w.bin": f}) == "b"
    assert model_dir_in({"x/config.json": f}) is None
    assert model_dir_in({"workspace/tfs/weights": ("symlink", "../../../etc")}) is None



def test_modelpack_tar_gzip_layers_are_unpacked(registry, tmp_path):
    """ModelPack's tar+gzip mode (aikit layer_packaging=tar+gzip): each layer a tar of files, unpacked in place."""
    from kaito_tuning.artifacts.registry import connect

    model = fake_model(tmp_path / "model")
    layers_ = []
    for name in sorted(tree(model)):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            tar.add(model / name, arcname=name)
        blob = tmp_path / f"{name}.tgz"
        blob.write_bytes(gzip.compress(raw.getvalue(), mtime=0))
        layers_.append((blob, "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest(), name))
    cfg = tmp_path / "cfg"
    cfg.write_bytes(b"{}")
    cfg_digest = "sha256:" + hashlib.sha256(b"{}").hexdigest()
    media = "application/vnd.cncf.model.weight.v1.tar+gzip"
    reg = connect(f"{registry.host}/kaito/tgz:1", auth_file=registry.auth_file, plain_http=True, push=True,
                  require_tag=True)
    with reg:
        reg.ping()
        for blob, digest, _ in layers_:
            reg.push_blob(blob, digest, blob.stat().st_size, media)
        reg.push_blob(cfg, cfg_digest, 2, MODELPACK_CONFIG)
        reg.put_manifest(json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": MODELPACK_CONFIG, "digest": cfg_digest, "size": 2},
            "layers": [{"mediaType": media, "digest": d, "size": b.stat().st_size, "annotations": {TITLE: n}}
                       for b, d, n in layers_]}).encode(), "application/vnd.oci.image.manifest.v1+json")
    got = _pull(registry, "kaito/tgz:1", tmp_path / "cache")
    assert got.shape == "artifact" and tree(Path(got.model_dir)) == tree(model)
