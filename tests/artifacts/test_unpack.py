"""Safe unpack of image layers: nothing escapes the destination, nothing is amplified, budgets hold."""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from fixtures_registry import tar_layer

from kaito_tuning.artifacts.errors import DestinationNotEmpty, ImageTooLarge, NotAnAdapter, UnsafeImage
from kaito_tuning.artifacts.unpack import (
    STAGING_PREFIX,
    Budget,
    default_max_bytes,
    prepare_destination,
    unpack_layer,
)

IMAGE = "r.example.com/a/b:1"


def _unpack(tmp_path: Path, *blobs: bytes, budget: Budget | None = None) -> Path:
    root = tmp_path / "stage" / "data"
    root.mkdir(parents=True, exist_ok=True)
    budget = budget or Budget(max_bytes=1 << 30)
    for i, blob in enumerate(blobs):
        path = tmp_path / f"layer-{i}"
        path.write_bytes(blob)
        unpack_layer(path, root, IMAGE, budget)
    return root


def _outside(tmp_path: Path) -> list[str]:
    """Everything under tmp_path except the layers and the staging root itself."""
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                  if not p.name.startswith("layer-") and p.relative_to(tmp_path).parts[:2] != ("stage", "data"))


@pytest.mark.parametrize("entries, message", [
    ([("data/../../escape.txt", "file", b"x")], "points outside"),
    ([("../escape.txt", "file", b"x")], "points outside"),
    ([("data/adapter_config.json", "symlink", "/etc/passwd")], "is a symbolic link"),
    ([("data", "symlink", "/etc")], "/data is not a directory"),
    ([("data/link", "hardlink", "etc/shadow")], "does not name a file under /data"),
    ([("data/link", "hardlink", "data/../etc/shadow")], "does not name a file under /data"),
    ([("data/link", "hardlink", "data/missing")], "does not name a file under /data"),
    ([("data/.wh..", "file", b"")], "names no file"),
    ([("data/.wh...", "file", b"")], "names no file"),
])
def test_a_layer_that_would_write_outside_is_refused(tmp_path, entries, message):
    with pytest.raises(UnsafeImage, match=message) as e:
        _unpack(tmp_path, tar_layer(entries))
    assert e.value.exit_code == 65
    assert _outside(tmp_path) == ["stage"]


def test_devices_and_pipes_are_refused(tmp_path):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("data/fifo")
        info.type = tarfile.FIFOTYPE
        tar.addfile(info)
    with pytest.raises(UnsafeImage, match="is a device or pipe"):
        _unpack(tmp_path, gzip.compress(raw.getvalue()))


def _zeros_with_links(links: int, size: int = 3 << 20) -> bytes:
    return tar_layer([("data/zeros.bin", "file", b"\0" * size)]
                     + [(f"data/copy-{i}.bin", "hardlink", "data/zeros.bin") for i in range(links)])


def test_hard_links_are_links_not_copies(tmp_path):
    """A ~3 KB layer with one 3 MB file of zeros and 100 hard links to it must not become 300 MB."""
    blob = _zeros_with_links(100)
    assert len(blob) < 8 << 10
    root = _unpack(tmp_path, blob)
    files = sorted(root.iterdir())
    assert len(files) == 101
    inodes = {f.stat().st_ino: f.stat().st_blocks * 512 for f in files}
    assert len(inodes) == 1 and sum(inodes.values()) <= (3 << 20) + (64 << 10)  # one file on disk
    assert (root / "copy-99.bin").read_bytes() == b"\0" * (3 << 20)


def test_rewriting_a_linked_name_does_not_change_the_other(tmp_path):
    root = _unpack(tmp_path,
                   tar_layer([("data/a.txt", "file", b"original"), ("data/b.txt", "hardlink", "data/a.txt")]),
                   tar_layer([("data/b.txt", "file", b"replaced")]))
    assert (root / "a.txt").read_bytes() == b"original" and (root / "b.txt").read_bytes() == b"replaced"


def _gnu_tar_sparse(tmp_path: Path, fmt: str) -> bytes:
    if not shutil.which("tar"):
        pytest.skip("GNU tar is not installed")
    src = tmp_path / f"src-{fmt}"
    (src / "data").mkdir(parents=True)
    with open(src / "data" / "sparse.bin", "wb") as f:
        f.truncate(256 << 20)  # 256 MB of holes
        f.write(b"x")
    out = tmp_path / f"sparse-{fmt}.tar.gz"
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-czf", str(out), "-C", str(src), "data"], check=True)
    shutil.rmtree(src)
    return out.read_bytes()


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_sparse_members_are_refused(tmp_path, fmt):
    """A few hundred bytes of layer claiming a 256 MB file: refused before anything is written."""
    blob = _gnu_tar_sparse(tmp_path, fmt)
    assert len(blob) < 2048
    with pytest.raises(UnsafeImage, match="/data/sparse.bin is a sparse file"):
        _unpack(tmp_path, blob)
    written = sum(p.stat().st_size for p in (tmp_path / "stage").rglob("*") if p.is_file())
    assert written == 0


def test_the_byte_budget_is_checked_before_writing(tmp_path):
    blob = tar_layer([("data/small.txt", "file", b"ok"), ("data/big.bin", "file", b"\0" * (3 << 20))])
    with pytest.raises(ImageTooLarge, match=r"unpacks to more than 1048576 bytes .*KAITO_MAX_DOWNLOAD_BYTES") as e:
        _unpack(tmp_path, blob, budget=Budget(max_bytes=1 << 20))
    assert e.value.exit_code == 65
    assert not (tmp_path / "stage" / "data" / "big.bin").exists()


def test_the_budget_spans_layers_and_counts_skipped_members(tmp_path):
    """Bytes outside /data cost as much to read as to write: they count too."""
    budget = Budget(max_bytes=1 << 20)
    first = tar_layer([("usr/lib/big.so", "file", b"\0" * (600 << 10))])
    second = tar_layer([("data/x.bin", "file", b"\0" * (600 << 10))])
    with pytest.raises(ImageTooLarge):
        _unpack(tmp_path, first, second, budget=budget)
    assert budget.bytes > 1 << 20


def test_the_member_budget(tmp_path):
    blob = tar_layer([(f"data/f{i}.txt", "file", b"x") for i in range(20)])
    with pytest.raises(ImageTooLarge, match="more than 10 files"):
        _unpack(tmp_path, blob, budget=Budget(max_bytes=1 << 30, max_members=10))


def test_an_oversized_tar_header_is_refused_before_it_is_read(tmp_path):
    """tarfile reads a PAX record whole; a 3 MB one (from a few KB of gzip) is refused instead."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("data/x.txt")
        info.pax_headers = {"comment": "a" * (3 << 20)}
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    blob = gzip.compress(raw.getvalue())
    assert len(blob) < 16 << 10
    with pytest.raises(UnsafeImage, match="tar header of .* bytes"):
        _unpack(tmp_path, blob)


def test_whiteouts_delete_lower_layers_files(tmp_path):
    root = _unpack(tmp_path,
                   tar_layer([("data/old.txt", "file", b"1"), ("data/dir/a.txt", "file", b"a"),
                              ("data/keep.txt", "file", b"k")]),
                   tar_layer([("data/.wh.old.txt", "file", b""), ("data/dir/.wh..wh..opq", "file", b""),
                              ("data/dir/b.txt", "file", b"b"), ("data/.wh..wh.plnk", "file", b"")]))
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == ["dir/b.txt", "keep.txt"]


def test_plain_tar_layers_unpack_and_garbage_is_refused(tmp_path):
    root = _unpack(tmp_path, tar_layer([("data/a.txt", "file", b"plain")], compress=False))
    assert (root / "a.txt").read_bytes() == b"plain"
    with pytest.raises(NotAnAdapter, match="not a \\(gzip\\) tar archive"):
        _unpack(tmp_path / "other", b"this is not a tar file at all" * 40)


def test_destination_must_be_new_or_empty_and_leftovers_are_cleaned(tmp_path):
    dest = tmp_path / "dest"
    (dest / f"{STAGING_PREFIX}killed").mkdir(parents=True)
    (dest / f"{STAGING_PREFIX}killed" / "half.bin").write_bytes(b"x")
    stage = prepare_destination(dest)
    assert stage.parent == dest and [p.name for p in dest.iterdir()] == [stage.name]
    (dest / "mine.txt").write_text("x")
    with pytest.raises(DestinationNotEmpty, match="is not empty"):
        prepare_destination(dest)
    with pytest.raises(DestinationNotEmpty, match="is not a directory"):
        prepare_destination(dest / "mine.txt")


def test_the_byte_budget_follows_the_download_limit(monkeypatch):
    monkeypatch.setenv("KAITO_MAX_DOWNLOAD_BYTES", "12345")
    assert default_max_bytes() == 12345 and Budget.default().max_bytes == 12345
    monkeypatch.delenv("KAITO_MAX_DOWNLOAD_BYTES")
    assert default_max_bytes() == 20 * 1024**3
