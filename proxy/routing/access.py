"""Who may use a route: ``allow_from`` networks and ``inbound_auth`` keys
(compared in constant time, every key each time). Pure.
"""

from __future__ import annotations

import hashlib
import hmac
from ipaddress import ip_address
from typing import Any

from proxy.config.model import InboundAuth, RouteConfig
from proxy.errors import (
    ProxyKeyRequired,
    SourceNotAllowed,
)


def check_access(route: RouteConfig, remote: str | None, headers: Any) -> None:
    """``allow_from`` and ``inbound_auth``, before anything else happens."""
    if route.allow_from:
        try:
            address = ip_address((remote or "").split("%", 1)[0])
        except ValueError:
            address = None
        if address is None or not any(address in net for net in route.allow_from):
            raise SourceNotAllowed.at(route.name, f"requests from {remote} are not allowed")
    if route.inbound_auth is not None and not _key_ok(route.inbound_auth, headers):
        raise ProxyKeyRequired.for_header(route.name, route.inbound_auth.header)


def _key_ok(auth: InboundAuth, headers: Any) -> bool:
    """One field holding a listed key. Two fields are refused whatever they
    hold: which one a check reads (the first, the last) would decide, and a
    stack that joins them would see neither (round 10)."""
    fields = headers.getall(auth.header, ())
    if len(fields) != 1 or not fields[0]:
        return False
    presented = fields[0]
    digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
    ok = False
    for known in auth.key_digests:  # every key is compared: no early exit
        ok |= hmac.compare_digest(digest, known)
    return ok
