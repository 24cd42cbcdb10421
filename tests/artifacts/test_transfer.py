"""Push and pull against a real docker-registry (distribution 2.8), read back with skopeo."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile

import pytest
import requests
from fixtures_registry import (
    REGISTRY_PASSWORD,
    REGISTRY_USER,
    assert_fake_adapter_annotations,
    make_fake_adapter,
    push_image,
    tar_layer,
)

from kaito_tuning.artifacts import PullResult, PushResult, layers, pull_adapter, pull_data, push_adapter
from kaito_tuning.artifacts.errors import (
    DestinationNotEmpty,
    ImageNotFound,
    ImageTooLarge,
    InvalidImageReference,
    NoDataInImage,
    NotAnAdapter,
    UnsafeImage,
)
from kaito_tuning.artifacts.unpack import Budget

ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "training_metadata.json"]


def _skopeo(*args: str, auth_file: str) -> subprocess.CompletedProcess:
    if not shutil.which("skopeo"):
        pytest.skip("skopeo is not installed")
    return subprocess.run(["skopeo", *args[:1], "--tls-verify=false", "--authfile", auth_file, *args[1:]],
                          capture_output=True, text=True, timeout=60, check=True)


def _push(adapter, registry, repo: str, **kw) -> PushResult:
    return push_adapter(adapter, f"{registry.host}/{repo}", auth_file=registry.auth_file, plain_http=True, **kw)


def _pull(registry, image: str, dest, how=pull_adapter, **kw) -> PullResult:
    return how(image, dest, auth_file=registry.auth_file, plain_http=True, **kw)


def test_skopeo_reads_the_pushed_image_and_its_layer_holds_data_adapter(fake_adapter, registry, tmp_path):
    result = _push(fake_adapter, registry, "adapters/skopeo:0.1")
    ref = f"docker://{registry.host}/adapters/skopeo:0.1"

    raw = _skopeo("inspect", "--raw", ref, auth_file=registry.auth_file).stdout
    manifest = json.loads(raw)
    assert "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == result.digest
    assert manifest["mediaType"] == layers.MEDIA_MANIFEST and "artifactType" not in manifest
    assert [layer["mediaType"] for layer in manifest["layers"]] == [layers.MEDIA_LAYER]
    notes = manifest["annotations"]
    assert_fake_adapter_annotations(notes)

    config = json.loads(_skopeo("inspect", "--config", "--raw", ref, auth_file=registry.auth_file).stdout)
    assert (config["os"], config["architecture"], config["rootfs"]["type"]) == ("linux", "amd64", "layers")
    # the plain inspect needs a real image config (it fails on artifacts)
    info = json.loads(_skopeo("inspect", ref, auth_file=registry.auth_file).stdout)
    assert info["Digest"] == result.digest and info["Os"] == "linux"

    _skopeo("copy", ref, f"oci:{tmp_path / 'layout'}:copied", auth_file=registry.auth_file)
    blob = tmp_path / "layout" / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1]
    plain = gzip.decompress(blob.read_bytes())
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(plain).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["data"] + [f"data/{f}" for f in ADAPTER_FILES]
        assert all((m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", 0) for m in members)
        for name in ADAPTER_FILES:
            assert tar.extractfile(f"data/{name}").read() == (fake_adapter / name).read_bytes()
    assert result.size == len(raw.encode()) + manifest["config"]["size"] + manifest["layers"][0]["size"]


def test_pull_gives_back_byte_identical_files(fake_adapter, registry, tmp_path):
    pushed = _push(fake_adapter, registry, "adapters/roundtrip:1")
    pulled = _pull(registry, pushed.reference, tmp_path / "out")
    assert pulled.digest == pushed.digest and pulled.files == ADAPTER_FILES == pushed.files
    for name in ADAPTER_FILES:
        assert (tmp_path / "out" / name).read_bytes() == (fake_adapter / name).read_bytes()
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []  # no staging left
    # pinned by digest too
    again = _pull(registry, pushed.pinned, tmp_path / "out2")
    assert again.digest == pushed.digest and again.reference == pushed.pinned


def test_pushing_the_same_adapter_again_uploads_no_blob_twice(fake_adapter, registry):
    first = _push(fake_adapter, registry, "adapters/again:1")
    second = _push(fake_adapter, registry, "adapters/again:2")
    assert first.digest == second.digest


def test_pulling_an_artifact_says_it_is_not_an_image(registry, tmp_path):
    image = push_image(registry, "artifacts/model:1", [b"weights"],
                       config_type="application/vnd.cncf.model.config.v1+json",
                       layer_type="application/vnd.cncf.model.weight.v1.raw")
    with pytest.raises(NotAnAdapter, match="is an OCI artifact .*vnd.cncf.model.config"):
        _pull(registry, image, tmp_path / "out")


def test_pulling_a_dataset_image_as_an_adapter_says_it_is_not_one(registry, tmp_path):
    image = push_image(registry, "datasets/chat:1", [tar_layer([("data/train.parquet", "file", b"PAR1")])])
    with pytest.raises(NotAnAdapter, match=r"is not an adapter: it has no /data/adapter_config.json .*train.parquet"):
        _pull(registry, image, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # nothing left behind


def test_pull_data_takes_the_whole_data_dir_across_layers(registry, tmp_path):
    image = push_image(registry, "datasets/layered:1", [
        tar_layer([("bin/sh", "file", b"busybox"), ("data/", "dir", None), ("data/old.jsonl", "file", b"old"),
                   ("data/sub/a.jsonl", "file", b"a")]),
        tar_layer([("./data/.wh.old.jsonl", "file", b""), ("data/sub/b.jsonl", "file", b"b"),
                   ("data/sub/b-link.jsonl", "hardlink", "data/sub/b.jsonl")]),
    ])
    result = _pull(registry, image, tmp_path / "mnt", how=pull_data)
    assert result.files == ["sub/a.jsonl", "sub/b-link.jsonl", "sub/b.jsonl"]
    assert (tmp_path / "mnt" / "sub" / "b-link.jsonl").read_bytes() == b"b"
    assert not (tmp_path / "mnt" / "bin").exists()

    empty = push_image(registry, "datasets/empty:1", [tar_layer([("etc/hosts", "file", b"x")])])
    with pytest.raises(NoDataInImage, match="has no files under /data"):
        _pull(registry, empty, tmp_path / "other", how=pull_data)


@pytest.mark.parametrize("entries, message", [
    ([("data/../../escape.txt", "file", b"x")], "points outside"),
    ([("data/adapter_config.json", "symlink", "/etc/passwd")], "is a symbolic link"),
    ([("data", "symlink", "/etc")], "/data is not a directory"),
    ([("data/link", "hardlink", "etc/shadow")], "does not name a file under /data"),
])
def test_a_layer_that_would_write_outside_dest_is_refused(registry, tmp_path, entries, message):
    image = push_image(registry, "hostile/layer:1", [tar_layer(entries)])
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(UnsafeImage, match=message):
        _pull(registry, image, dest)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "dest"]


def test_a_pull_over_its_budget_leaves_nothing(registry, tmp_path):
    image = push_image(registry, "hostile/bomb:1", [tar_layer(
        [("data/adapter_config.json", "file", b"{}"), ("data/zeros.bin", "file", b"\0" * (2 << 20))])])
    with pytest.raises(ImageTooLarge, match="unpacks to more than 1048576 bytes"):
        _pull(registry, image, tmp_path / "dest", budget=Budget(max_bytes=1 << 20))
    assert list((tmp_path / "dest").iterdir()) == []
    with pytest.raises(ImageTooLarge, match="bytes of layers, more than the 100 allowed"):
        _pull(registry, image, tmp_path / "dest2", budget=Budget(max_bytes=100))
    assert not (tmp_path / "dest2").exists()


def test_pull_refuses_a_non_empty_destination_and_a_missing_image(fake_adapter, registry, tmp_path):
    pushed = _push(fake_adapter, registry, "adapters/dest:1")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(DestinationNotEmpty, match="is not empty"):
        _pull(registry, pushed.reference, tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    with pytest.raises(ImageNotFound, match=f"{registry.host}/adapters/dest:nope not found .*MANIFEST_UNKNOWN") as e:
        _pull(registry, f"{registry.host}/adapters/dest:nope", tmp_path / "x")
    assert not (tmp_path / "x").exists() and e.value.exit_code == 65


def test_pull_through_a_multi_platform_index_takes_linux_amd64(fake_adapter, registry, tmp_path):
    pushed = _push(fake_adapter, registry, "adapters/indexed:img")
    other = _push(make_fake_adapter(tmp_path / "other", seed=7), registry, "adapters/indexed:arm")

    def size(tag: str) -> int:
        return len(requests.get(f"{registry.url}/v2/adapters/indexed/manifests/{tag}", headers={
            "Accept": layers.MEDIA_MANIFEST}, auth=(REGISTRY_USER, REGISTRY_PASSWORD), timeout=10).content)

    index = {"schemaVersion": 2, "mediaType": layers.MEDIA_INDEX, "manifests": [
        {"mediaType": layers.MEDIA_MANIFEST, "digest": other.digest, "size": size("arm"),
         "platform": {"os": "linux", "architecture": "arm64"}},
        {"mediaType": layers.MEDIA_MANIFEST, "digest": pushed.digest, "size": size("img"),
         "platform": {"os": "linux", "architecture": "amd64"}}]}
    resp = requests.put(f"{registry.url}/v2/adapters/indexed/manifests/multi", data=json.dumps(index),
                        auth=(REGISTRY_USER, REGISTRY_PASSWORD), headers={"Content-Type": layers.MEDIA_INDEX},
                        timeout=10)
    assert resp.status_code == 201, resp.text
    _pull(registry, f"{registry.host}/adapters/indexed:multi", tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == \
        (fake_adapter / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("image, message", [
    ("registry.example.com/a/b", "has no tag; add one, e.g. registry.example.com/a/b:0.0.1"),
    ("registry.example.com/a/b@sha256:" + "a" * 64, "has no tag"),
    ("registry.example.com/a/b:1@sha256:" + "a" * 64, "push to a tag, not a digest"),
    ("registry.example.com/a b:1", "white space"),
    ("registry.example.com/a/b:v1!", "is invalid"),
    ("registry.example.com/Adapters/b:1", "only lowercase repository names"),
    ("https://registry.example.com/a:1", "must not have a scheme"),
])
def test_bad_image_reference(fake_adapter, image, message):
    with pytest.raises(InvalidImageReference, match=message.replace("?", r"\?")) as e:
        push_adapter(fake_adapter, image)
    assert e.value.exit_code == 65
