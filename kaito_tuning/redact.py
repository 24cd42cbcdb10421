"""Keep secrets out of everything a person or a registry can read: status, events, logs, adapter images.

Dataset URLs are often signed (``?sig=…``, ``X-Amz-Signature``, SAS tokens) or carry userinfo, so a
URL is only ever shown as ``scheme://host[:port]/path``: query, fragment and userinfo dropped.
``text()`` does the same to every URL inside a message, and masks ``Authorization`` / ``Bearer``
values and ``password=``-style pairs.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_URL = re.compile(r"""\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'"<>]+""")
_SECRET_PAIRS = re.compile(
    r"(?i)\b(authorization|password|passwd|token|secret|access_token|refresh_token|identitytoken|api[_-]?key|sig|"
    r"signature|x-amz-signature|x-amz-credential|x-amz-security-token|se|sv|sp)(\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s&,;]+)")
_USERINFO = re.compile(r"^([^/?#]*://)?[^/?#@]*@")  # "user:password@" before the host, with or without a scheme
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[a-z0-9._~+/=-]{8,}")


def url(value: str) -> str:
    """``scheme://host[:port]/path`` of ``value``; never its query, fragment or userinfo."""
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable URL>"
    if not parts.scheme or not host:  # not a URL a client would fetch; shown without what could be a secret
        return _USERINFO.sub(r"\1", value.split("?", 1)[0].split("#", 1)[0])
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def text(message: str) -> str:
    """``message`` with every URL redacted and credential-looking values masked."""
    out = _URL.sub(lambda m: url(m.group(0)), message)
    out = _BEARER.sub(lambda m: f"{m.group(1)} ***", out)
    return _SECRET_PAIRS.sub(lambda m: f"{m.group(1)}{m.group(2)}***", out)
