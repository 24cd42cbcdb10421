"""Which network addresses a dataset download may reach: one policy for admission and the Job.

Refused unless a run opts in (``--allow-private-urls``, ``KAITO_ALLOW_PRIVATE_URLS``): loopback,
link-local (cloud metadata at 169.254.169.254 included), private (RFC 1918, IPv6 ULA), carrier-grade
NAT 100.64.0.0/10 (Alibaba's metadata service lives at 100.100.100.200), unspecified, multicast and
reserved ranges, and IPv4 addresses dressed as IPv6 (``::ffff:10.0.0.1``). Cluster service and pod
ranges are private ranges, so a namespace-local service cannot be reached either.
"""

from __future__ import annotations

import ipaddress

METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.google", "instance-data.ec2.internal",
                            "metadata.azure.com", "metadata"})
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def forbidden(address: str) -> str | None:
    """Why ``address`` (an IP literal) must not be reached, or None when it is a public address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if mapped is not None:
            return forbidden(str(mapped))
    if ip.is_loopback:
        return "is a loopback address"
    if ip.is_link_local:
        return "is a link-local address (cloud metadata services live there)"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "is in the carrier-grade NAT range 100.64.0.0/10 (used by cloud metadata services)"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return "is not a unicast public address"
    if ip.is_private:
        return "is a private address (inside the cluster or its network)"
    return None


def forbidden_host(host: str) -> str | None:
    """Why a host *name* is refused before any lookup (metadata names, localhost), or an IP literal's reason."""
    h = (host or "").strip("[]").rstrip(".").lower()
    if h in METADATA_HOSTS:
        return "is a cloud metadata service"
    if h == "localhost" or h.endswith(".localhost"):
        return "is the local machine"
    try:
        ipaddress.ip_address(h.split("%", 1)[0])
    except ValueError:
        return None
    return forbidden(h)
