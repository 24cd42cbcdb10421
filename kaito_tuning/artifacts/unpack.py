"""Unpack one directory of image layers safely: nothing written outside the destination, nothing amplified.

The directory is ``/data`` (adapters, datasets) unless the caller names another (``prefix``: a
model image's weights directory, or the whole layer). Below, "/data" stands for it.

- Entries with ``..``, symbolic links, devices and pipes under /data are refused; entries outside
  /data are skipped (but still counted: reading past them costs as much as writing them).
- Hard links become real hard links to a file already unpacked under /data (never copies, so a
  small layer cannot expand by linking one large file many times); anything else is refused.
  A file is always written to a fresh inode, so rewriting one name never changes another.
- Sparse members are refused: their holes would be written out as zeros (a 151-byte layer can
  claim hundreds of MB).
- A ``Budget`` bounds the total bytes of all members and their number across every layer of a pull;
  a tar header (long name, PAX record) larger than 1 MiB is refused before it is read into memory.
- Whiteouts (``.wh.<name>``, ``.wh..wh..opq``) delete what lower layers wrote, as overlayfs does.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from kaito_tuning.artifacts.errors import DestinationNotEmpty, ImageTooLarge, NotAnAdapter, RegistryError, UnsafeImage
from kaito_tuning.artifacts.layers import DATA_DIR
from kaito_tuning.contract import ENV_MAX_DOWNLOAD_BYTES

DEFAULT_MAX_BYTES = 20 * 1024**3  #: as for dataset URLs; $KAITO_MAX_DOWNLOAD_BYTES overrides both
DEFAULT_MAX_MEMBERS = 100_000
MAX_HEADER_BYTES = 1 << 20  #: one tar header record (PAX, GNU long name); real ones are a few hundred bytes
_CHUNK = 1 << 20
STAGING_PREFIX = ".kaito-pull-"


def default_max_bytes() -> int:
    env = os.environ.get(ENV_MAX_DOWNLOAD_BYTES, "").strip()
    return int(env) if env.isdigit() else DEFAULT_MAX_BYTES


@dataclass
class Budget:
    """What one pull may unpack in all: bytes (every member's size) and members."""

    max_bytes: int
    max_members: int = DEFAULT_MAX_MEMBERS
    bytes: int = 0
    members: int = 0

    @classmethod
    def default(cls) -> "Budget":
        return cls(max_bytes=default_max_bytes())

    def charge(self, image: str, member: tarfile.TarInfo) -> None:
        self.add(image, member.size)

    def add(self, image: str, size: int) -> None:
        """Count one file of ``size`` bytes; ImageTooLarge once over either limit."""
        self.members += 1
        self.bytes += max(0, size)
        if self.members > self.max_members:
            raise ImageTooLarge(f"image {image} has more than {self.max_members} files in its layers; refused")
        if self.bytes > self.max_bytes:
            raise ImageTooLarge(f"image {image} unpacks to more than {self.max_bytes} bytes (the limit; "
                                f"{ENV_MAX_DOWNLOAD_BYTES} raises it); refused")


class _HeaderCap:
    """A read-only file over the decompressed layer that refuses any single read over MAX_HEADER_BYTES.

    tarfile reads a PAX or long-name record in one ``read(size)``; member data we read in 1 MiB
    chunks ourselves, and skipped data is ``seek``ed past. So only a hostile header hits the cap.
    """

    def __init__(self, raw, image: str):
        self.raw, self.image = raw, image

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > MAX_HEADER_BYTES + _CHUNK:
            raise UnsafeImage(f"image {self.image}: a layer has a tar header of {n} bytes; refused")
        return self.raw.read(n)

    def seek(self, *args):
        return self.raw.seek(*args)

    def tell(self) -> int:
        return self.raw.tell()


@contextlib.contextmanager
def _open_layer(blob: Path, image: str):
    """The (gzip) tar archive of one layer blob, reading headers through ``_HeaderCap``."""
    with open(blob, "rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        source = gzip.GzipFile(fileobj=raw, mode="rb") if magic == b"\x1f\x8b" else raw
        try:
            tar = tarfile.open(fileobj=_HeaderCap(source, image), mode="r:")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise NotAnAdapter(f"image {image} has a layer that is not a (gzip) tar archive: {e}") from None
        try:
            with tar:
                yield tar
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise RegistryError(f"image {image}: a layer could not be unpacked ({e})") from None


def _parts(name: str) -> list[str]:
    return [p for p in name.split("/") if p not in ("", ".")]


def layer_entries(blob: Path, image: str, budget: Budget) -> list[tuple[str, str, str]]:
    """(path, kind, link target) of every entry of one layer, without writing anything; kind is
    file, dir, symlink, hardlink or other. Members are charged to ``budget`` as if unpacked."""
    out = []
    with _open_layer(blob, image) as tar:
        for m in tar:
            budget.charge(image, m)
            kind = ("file" if m.isreg() else "dir" if m.isdir() else "symlink" if m.issym()
                    else "hardlink" if m.islnk() else "other")
            out.append(("/".join(_parts(m.name)), kind, m.linkname))
    return out


def unpack_layer(blob: Path, root: Path, image: str, budget: Budget, prefix: str = DATA_DIR) -> None:
    """Extract the entries under ``prefix`` (a path in the layer; "" for all of it) of one (gzip) tar
    layer into ``root`` (see the module doc)."""
    written: set[Path] = set()
    base = _parts(prefix)
    with _open_layer(blob, image) as tar:
        for m in tar:
            budget.charge(image, m)
            _member(tar, m, root, image, written, base)


def _member(tar: tarfile.TarFile, m: tarfile.TarInfo, root: Path, image: str, written: set[Path],
            base: list[str]) -> None:
    parts = _parts(m.name)
    where = "/" + "/".join(base)
    if ".." in parts:
        raise UnsafeImage(f"image {image}: layer entry {m.name!r} points outside its directory; refused")
    if parts[:len(base)] != base:
        return
    if len(parts) == len(base):
        if not m.isdir():
            raise UnsafeImage(f"image {image}: {where} is not a directory in the image (it is a "
                              f"{'link' if m.issym() or m.islnk() else 'file'}); refused")
        return
    shown = "/" + "/".join(parts)
    target = root.joinpath(*parts[len(base):])
    name = parts[-1]
    if name.startswith(".wh."):
        _whiteout(target.parent, name, written, image)
        return
    if m.issparse():
        raise UnsafeImage(f"image {image}: {shown} is a sparse file; images must hold plain files; refused")
    if m.isdir():
        if target.exists() and not target.is_dir():
            target.unlink()
        target.mkdir(parents=True, exist_ok=True)
    elif m.isreg():
        _fresh(target)
        with tar.extractfile(m) as src, open(target, "xb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
    elif m.islnk():
        link = _parts(m.linkname)
        inside = link[:len(base)] == base and len(link) > len(base) and ".." not in link
        source = root.joinpath(*link[len(base):]) if inside else None
        if source is None or source.is_symlink() or not source.is_file():
            raise UnsafeImage(f"image {image}: hard link {shown} -> {m.linkname!r} does not name a file under "
                              f"{where}; refused")
        if source != target:
            _fresh(target)
            os.link(source, target)  # a link, not a copy: no amplification
    elif m.issym():
        raise UnsafeImage(f"image {image}: {shown} is a symbolic link (to {m.linkname!r}); images must hold plain "
                          f"files under {where}; refused")
    else:
        raise UnsafeImage(f"image {image}: {shown} is a device or pipe; refused")
    written.add(target)


def _fresh(target: Path) -> None:
    """Make room for a new file at ``target``: its parents exist, and no old file or directory is there
    (a file is unlinked, never truncated, so another hard link to it keeps its content)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()


def _whiteout(directory: Path, name: str, written: set[Path], image: str) -> None:
    """Apply an overlay whiteout: ``.wh..wh..opq`` empties the directory of lower-layer files."""
    if name == ".wh..wh..opq":
        if directory.is_dir():
            for p in list(directory.iterdir()):
                if p not in written:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return
    victim = name[len(".wh."):]
    if victim.startswith(".wh."):  # other AUFS metadata (.wh..wh.plnk, ...): nothing to apply
        return
    if victim in ("", ".", ".."):
        raise UnsafeImage(f"image {image}: whiteout {name!r} names no file; refused")
    path = directory / victim
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def prepare_destination(dest: Path) -> Path:
    """``dest`` as a new or empty directory (leftovers of a killed pull removed); a staging dir inside it."""
    if dest.exists() and not dest.is_dir():
        raise DestinationNotEmpty(f"{dest} exists and is not a directory")
    dest.mkdir(parents=True, exist_ok=True)
    for leftover in dest.glob(f"{STAGING_PREFIX}*"):  # from a pull that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    if any(dest.iterdir()):
        raise DestinationNotEmpty(f"{dest} is not empty; pull into a new or empty directory")
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dest))
