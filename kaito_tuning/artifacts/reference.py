"""Parse OCI image references (registry/repository:tag@digest) as the distribution grammar does."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kaito_tuning.spec.files import short

# Letters of either case: the distribution grammar wants lowercase repositories, but Kaito's own
# quick start uses the placeholder IMAGE_NAME_HERE, which must be accepted as written; a registry
# that refuses the name says so at push time.
_COMPONENT = r"[a-zA-Z0-9]+(?:(?:[._]|__|-+)[a-zA-Z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:]+\])(?::(?P<port>[0-9]+))?"
_TAG = r"[\w][\w.-]*"  # at most MAX_TAG characters: checked after the match, to say so
MAX_TAG = 128
_DIGEST = r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[0-9a-fA-F]{32,}"
_REF = re.compile(rf"^(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
                  rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$", re.ASCII)  # ASCII: \w must not match "å"

DOCKER_HUB = "docker.io"


class InvalidReference(ValueError):
    pass


@dataclass(frozen=True)
class ImageRef:
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest if pinned, else the tag (default latest)."""
        return self.digest or self.tag or "latest"


def parse(ref: str, *, require_tag: bool = False) -> ImageRef:
    """Parse ``ref``; raise InvalidReference with a message that says what is wrong."""
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidReference("image reference is empty")
    if "/" in ref and "@" in ref.split("/", 1)[0]:  # user:password@registry/...: never shown
        raise InvalidReference("image reference must not carry credentials (user:password@ before the registry); "
                               "write registry/repository:tag and name a dockerconfigjson secret for them")
    if ref != ref.strip() or any(c.isspace() for c in ref):
        raise InvalidReference(f"image reference {short(ref)} contains white space")
    if "://" in ref:
        raise InvalidReference(f"image reference {short(ref)} must not have a scheme; write registry/repository:tag")
    m = _REF.match(ref)
    if not m:
        raise InvalidReference(f"image reference {short(ref)} is invalid: expected registry/repository:tag "
                               "(letters, digits and . _ - in the repository; tag of letters, digits, . _ -)")
    if m.group("tag") and len(m.group("tag")) > MAX_TAG:
        raise InvalidReference(f"image reference {short(ref)} is invalid: its tag is {len(m.group('tag'))} "
                               f"characters; at most {MAX_TAG}")
    if m.group("port") and not 0 < int(m.group("port")) < 65536:
        raise InvalidReference(f"image reference {short(ref)}: port {int(m.group('port'))} of registry "
                               f"{m.group('domain')!r} is not 1-65535")
    domain, path = m.group("domain"), m.group("path")
    if domain and not ("." in domain or ":" in domain or domain == "localhost" or domain.startswith("[")):
        # "user/repo": the first component is a path on Docker Hub, not a registry
        path, domain = f"{domain}/{path}", None
    if domain and any(c.isupper() for c in domain):
        domain = domain.lower()
    if not domain:
        domain = DOCKER_HUB
        if "/" not in path:
            path = f"library/{path}"
    if len(path) > 255:
        raise InvalidReference(f"image reference {short(ref)}: repository name longer than 255 characters")
    tag, digest = m.group("tag"), m.group("digest")
    if require_tag and not tag:
        base = ref.split("@")[0]
        hint = f"e.g. {base}:0.0.1" if len(base) <= 120 else "e.g. :0.0.1 at its end"  # a message stays short
        raise InvalidReference(f"image reference {short(ref)} has no tag; add one, {hint}")
    return ImageRef(domain, path, tag, digest)
