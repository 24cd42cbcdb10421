"""The adapter image's content: which files, the reproducible layer, the image config, the annotations."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile

import pytest
from fixtures_registry import assert_fake_adapter_annotations, make_fake_adapter

from kaito_tuning.artifacts import layers, push_adapter
from kaito_tuning.artifacts.errors import AdapterIncomplete

ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "training_metadata.json"]


def test_same_adapter_files_give_the_same_digest(registry, tmp_path):
    def push(adapter, tag):
        return push_adapter(adapter, f"{registry.host}/adapters/repro:{tag}", auth_file=registry.auth_file,
                            plain_http=True)

    first = make_fake_adapter(tmp_path / "a")
    one = push(first, "1")
    second = make_fake_adapter(tmp_path / "b")
    for f in second.iterdir():  # other mtimes, other directory, other tag
        os.utime(f, (1_000_000_000, 1_000_000_000))
    two = push(second, "2")
    assert one.digest == two.digest
    changed = make_fake_adapter(tmp_path / "c", seed=1)
    assert push(changed, "3").digest != one.digest

    layer = tmp_path / "layer.tar.gz"
    layers.build_layer(layers.adapter_files(first), layer)
    head = layer.read_bytes()[:10]
    assert head[4:8] == b"\0\0\0\0" and not head[3] & 0x08  # gzip: mtime 0, no file name


def test_the_layer_is_kaito_layout_with_reproducible_entries(fake_adapter, tmp_path):
    os.utime(fake_adapter / "README.md", (1_700_000_000, 1_700_000_000))
    blob = tmp_path / "layer.tar.gz"
    digest, size, diff_id = layers.build_layer(layers.adapter_files(fake_adapter), blob)
    data = blob.read_bytes()
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest() and size == len(data)
    plain = gzip.decompress(data)
    assert diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    with tarfile.open(blob) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["data"] + [f"data/{f}" for f in ADAPTER_FILES]
        assert all((m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", 0) for m in members)
        assert members[0].isdir() and all(m.isreg() and m.mode == 0o644 for m in members[1:])


def test_config_and_manifest_are_a_canonical_image_not_an_artifact():
    config = layers.image_config(["sha256:" + "1" * 64])
    manifest = json.loads(layers.image_manifest(config, [("sha256:" + "2" * 64, 42)], {"k": "v"}))
    assert "artifactType" not in manifest and manifest["mediaType"] == layers.MEDIA_MANIFEST
    assert manifest["config"] == {"mediaType": layers.MEDIA_CONFIG, "digest": layers.digest_of(config),
                                  "size": len(config)}
    assert manifest["layers"] == [{"mediaType": layers.MEDIA_LAYER, "digest": "sha256:" + "2" * 64, "size": 42}]
    cfg = json.loads(config)
    assert (cfg["os"], cfg["architecture"], cfg["rootfs"]) == ("linux", "amd64", {
        "type": "layers", "diff_ids": ["sha256:" + "1" * 64]})
    assert config == layers.canonical(cfg)  # sorted keys, no spaces


def test_annotations_come_from_the_adapter_and_its_metadata(fake_adapter):
    notes = layers.adapter_annotations(fake_adapter)
    assert_fake_adapter_annotations(notes)

    (fake_adapter / "training_metadata.json").write_text(json.dumps({
        "preset_name": "phi-3", "method": "lora", "dataset_digests": {"a": "sha256:1", "b": "sha256:2"}}))
    notes = layers.adapter_annotations(fake_adapter)
    assert notes["kaito.sh/preset"] == "phi-3" and notes["kaito.sh/dataset-digests"] == "sha256:1,sha256:2"
    assert notes["org.opencontainers.image.title"] == "LoRA adapter for phi-3"
    assert "org.opencontainers.image.created" not in notes  # no clock: the digest stays reproducible

    bare = make_fake_adapter(fake_adapter.parent / "bare", metadata=False)
    assert layers.adapter_annotations(bare)["org.opencontainers.image.title"] == \
        "LoRA adapter for HuggingFaceTB/SmolLM2-135M-Instruct"


def test_checkpoints_and_hidden_files_stay_out_of_the_image(fake_adapter):
    (fake_adapter / "training_args.bin").write_bytes(b"pickle")
    (fake_adapter / ".partial").write_text("x")
    (fake_adapter / "progress.json").write_text("{}")
    (fake_adapter / "checkpoints").mkdir()
    (fake_adapter / "checkpoints" / "optimizer.pt").write_bytes(b"x")
    assert [p.name for p in layers.adapter_files(fake_adapter)] == ADAPTER_FILES


@pytest.mark.parametrize("remove, message", [
    ("adapter_config.json", "has no adapter_config.json"),
    ("adapter_model.safetensors", "has no adapter_model.safetensors"),
])
def test_incomplete_adapter_is_refused(fake_adapter, remove, message):
    (fake_adapter / remove).unlink()
    with pytest.raises(AdapterIncomplete, match=message) as e:
        push_adapter(fake_adapter, "registry.invalid/a/b:1")
    assert e.value.exit_code == 65


def test_truncated_weights_bad_config_and_bin_only_adapters_are_refused(fake_adapter, tmp_path):
    weights = fake_adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(AdapterIncomplete, match="truncated or not a safetensors"):
        push_adapter(fake_adapter, "registry.invalid/a/b:1")
    weights.rename(fake_adapter / "adapter_model.bin")
    with pytest.raises(AdapterIncomplete, match="safe_serialization=True"):
        push_adapter(fake_adapter, "registry.invalid/a/b:1")
    with pytest.raises(AdapterIncomplete, match="does not exist"):
        push_adapter(tmp_path / "nope", "registry.invalid/a/b:1")
    other = make_fake_adapter(tmp_path / "other")
    (other / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterIncomplete, match="must hold a JSON object"):
        push_adapter(other, "registry.invalid/a/b:1")
    (other / "adapter_config.json").write_text("{oops")
    with pytest.raises(AdapterIncomplete, match="is not valid JSON"):
        push_adapter(other, "registry.invalid/a/b:1")
