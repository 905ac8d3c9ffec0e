"""Routing: which route a request belongs to, and where it goes upstream (pure).

Paths are handled as the raw bytes the app sent (as ``str``): nothing is
percent-decoded or normalised on the way through, so the partner receives
exactly what the app wrote, only with the route's prefix replaced.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final, Generic, TypeVar

from yarl import URL

from proxy.config.model import RouteConfig
from proxy.errors import (
    AmbiguousPath,
    BadRequest,
    MethodNotAllowed,
    MisdirectedRequest,
    PathEscapesRoute,
)

T = TypeVar("T")
# Separators that some upstream stacks honour besides "/": encoded slashes and
# backslashes (IIS, some Java containers). A dot-segment check that ignored them
# could be walked around.
_SEGMENT_SPLIT = re.compile(r"/|\\|%2f|%5c", re.IGNORECASE)
_DOT = re.compile(r"%2e", re.IGNORECASE)
_PARAMS = re.compile(r"(?:;|%3b).*", re.IGNORECASE)  # a segment's ;parameters
# RFC 9110 §7.2 / RFC 3986 §3.2: Host = uri-host [ ":" port ], no userinfo;
# uri-host is an IP literal in brackets or a reg-name (IPv4 is one of those).
_AUTHORITY = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|\[[vV][0-9A-Fa-f]+\.[A-Za-z0-9._~!$&'()*+,;=:-]+\]"
    r"|(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?"
)


class _Same:
    """The "unchanged" default of :meth:`RequestTarget.replace`."""


_SAME: Final = _Same()


class RequestTarget:
    """The parts of an inbound request target that routing needs.

    ``host`` is the lower-cased host name without port (``None`` if the request
    named none), ``authority`` the host as sent (with port), ``path`` the raw
    path and ``query`` the raw query without ``?`` (``""`` when absent).
    ``absolute`` is true for absolute-form targets (``GET http://host/path``),
    sent by apps that use the proxy as their ``HTTP_PROXY``.

    Read-only (``Final``: mypy and the compiled build enforce it, plain
    Python does not; :meth:`replace` makes a changed copy). A class of
    its own rather than a frozen dataclass: one is made per request, and a
    dataclass's generated ``__init__`` stays interpreted Python in the
    compiled build (8,300 instructions, against a few hundred; issue 16).
    """

    __slots__ = ("absolute", "authority", "host", "path", "query")

    def __init__(
        self, *, host: str | None, authority: str | None, path: str, query: str, absolute: bool
    ) -> None:
        self.host: Final = host
        self.authority: Final = authority
        self.path: Final = path
        self.query: Final = query
        self.absolute: Final = absolute

    def replace(
        self,
        *,
        host: str | _Same | None = _SAME,
        authority: str | _Same | None = _SAME,
        path: str | _Same = _SAME,
        absolute: bool | _Same = _SAME,
    ) -> RequestTarget:
        """A copy with the given parts changed."""
        return RequestTarget(
            host=self.host if isinstance(host, _Same) else host,
            authority=self.authority if isinstance(authority, _Same) else authority,
            path=self.path if isinstance(path, _Same) else path,
            query=self.query,
            absolute=self.absolute if isinstance(absolute, _Same) else absolute,
        )

    def _parts(self) -> tuple[str | None, str | None, str, str, bool]:
        return (self.host, self.authority, self.path, self.query, self.absolute)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RequestTarget):
            return NotImplemented
        return self._parts() == other._parts()

    def __hash__(self) -> int:
        return hash(self._parts())

    def __repr__(self) -> str:
        return (
            f"RequestTarget(host={self.host!r}, authority={self.authority!r}, "
            f"path={self.path!r}, query={self.query!r}, absolute={self.absolute!r})"
        )


# Answers of valid_authority for the Host values seen lately: an app sends the
# same one on every request, and the regex costs 400 instructions a character.
_CHECKED: Final[dict[str, bool]] = {}
_CHECKED_MOST: Final = 256  # entries, each at most 255 characters: then it starts over


def valid_authority(value: str) -> bool:
    """Whether ``value`` is a ``Host`` (host and optional port, RFC 9110 §7.2);
    an empty one is valid (a target with no authority). A port is 0-65535
    (RFC 3986 §3.2.3), in ``Host`` as in an absolute-form target."""
    known = _CHECKED.get(value)
    if known is not None:
        return known
    valid = _valid_authority(value)
    if len(value) <= 255:
        if len(_CHECKED) >= _CHECKED_MOST:
            _CHECKED.clear()
        _CHECKED[value] = valid
    return valid


def _valid_authority(value: str) -> bool:
    if _AUTHORITY.fullmatch(value) is None:
        return False
    end = value.rfind("]") + 1 if value.startswith("[") else 0  # past an IPv6 literal
    port = value[end:].partition(":")[2]
    return len(port) <= 5 and (not port or int(port) <= 65535)


def split_host(authority: str) -> str:
    """The lower-cased host of ``host[:port]`` or ``[v6]:port``, without the port."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        end = authority.find("]")
        return authority[: end + 1] if end != -1 else authority
    host = authority.rsplit(":", 1)[0] if ":" in authority else authority
    # One trailing dot is the same name, fully qualified (RFC 1034 §3.1);
    # two are no name, and match no route (round 10).
    return host[:-1] if host.endswith(".") else host


def parse_target(method: str, raw_target: str, host_header: str | None) -> RequestTarget:
    """Split the request line's target. Raises BadRequest or MethodNotAllowed.

    RFC 9112 §3.2.2: for an absolute-form target the proxy uses the target's
    authority and ignores the ``Host`` header.
    """
    if method == "CONNECT":  # the forwarder plans CONNECTs; one inside a tunnel lands here
        raise MethodNotAllowed("CONNECT inside an intercepted CONNECT tunnel is not supported")
    if method.upper() == "TRACE":  # any spelling: a partner may match it case-blind
        # RFC 9110 §9.3.8: TRACE must not carry credentials, and a partner that
        # answers it would echo the proxy's token back to the app.
        raise MethodNotAllowed("TRACE is not forwarded: it would echo the partner token back")
    absolute = False
    authority = host_header
    target = raw_target
    lowered = raw_target[:8].lower()
    if lowered.startswith("http://") or lowered.startswith("https://"):
        absolute = True
        rest = raw_target.split("://", 1)[1]
        slash = min((i for i in (rest.find("/"), rest.find("?")) if i != -1), default=len(rest))
        authority, target = rest[:slash], rest[slash:]
        if not authority or "@" in authority:
            raise BadRequest("absolute-form request target has no host or carries credentials")
        if not valid_authority(authority):
            raise BadRequest("absolute-form request target has an invalid host[:port]")
        if not target.startswith("/"):
            target = "/" + target
    elif not raw_target.startswith("/"):
        raise BadRequest("request target must be a path (/...) or an absolute http(s) URL")
    if "#" in target:
        raise BadRequest("request target must not contain a fragment")
    path, _, query = target.partition("?")
    host = split_host(authority) if authority else None
    return RequestTarget(host=host, authority=authority, path=path, query=query, absolute=absolute)


def tunnel_target(
    method: str, raw_target: str, host_header: str | None, tunnel_host: str
) -> RequestTarget:
    """A request inside an intercepted ``CONNECT tunnel_host:443``: routed
    exactly as the absolute-form ``https://tunnel_host/...`` would be. Its
    ``Host`` (or an absolute-form target) must name the tunnel's host, on
    port 443 or none; another one is 421 (RFC 9110 §15.5.20): the app's TLS
    connection was made for ``tunnel_host``, not for it."""
    target = parse_target(method, raw_target, host_header)
    authority = target.authority or tunnel_host
    end = authority.find("]") + 1 if authority.startswith("[") else 0  # past an IPv6 literal
    port = authority[end:].partition(":")[2]
    if (target.host is not None and target.host != tunnel_host) or port not in ("", "443"):
        raise MisdirectedRequest(
            f"this connection is a tunnel to {tunnel_host}:443; the request names another "
            "host or port (send it through its own CONNECT)"
        )
    return target.replace(host=tunnel_host, authority=authority, absolute=True)


_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# RFC 3986 §2.3: unreserved characters; decoded, they name the same resource.
# "/" too: many partner stacks decode %2F before they route.
# "\\" as well, read as "/" below: IIS and some Java containers split on it.
_DECODED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/\\")


def _decode_unreserved(found: re.Match[str]) -> str:
    char = chr(int(found.group(1), 16))
    return char if char in _DECODED else found.group().upper()


def canonical_path(path: str) -> str:
    """The path as a partner stack may read it: unreserved characters and
    ``/`` percent-decoded, slashes merged, dot-segments removed (RFC 3986
    §6.2.2, §5.2.4; nginx matches its locations on this form), and, as Java
    and IIS stacks read it, ``;parameters`` dropped and ``\\`` a slash."""
    decoded = _ESCAPE.sub(_decode_unreserved, path) if "%" in path else path
    segments: list[str] = []
    # Parameters dropped before slashes merge: a segment that is only
    # ";x" leaves an empty one, merged as "//" is (round 10, F1:
    # "/acme/;/admin/x" reads as "/acme/admin/x" to Tomcat and Spring).
    parts = [part.partition(";")[0] for part in decoded.replace("\\", "/").split("/")]
    last = len(parts) - 1
    for index, part in enumerate(parts[1:], 1):
        if not part and index != last:
            continue  # an empty segment: merged slashes (a trailing one stays)
        if part == "..":
            if segments:
                segments.pop()
        elif part != ".":
            segments.append(part)
    if parts[-1] in (".", ".."):
        segments.append("")  # "/a/." is the directory "/a/"
    return "/" + "/".join(segments)


def may_read_otherwise(path: str) -> bool:
    """Could ``path`` read as another path once decoded and normalised?"""
    return "%" in path or "//" in path or "/." in path or ";" in path or "\\" in path


def climbs_out(remainder: str) -> bool:
    """True when dot-segments in ``remainder`` would climb above its start.

    RFC 3986 §5.2.4 removal, applied to the decoded forms too (``%2e%2e``,
    ``%2f``, backslashes) and to segments with path parameters (``..;x``,
    which Tomcat and Jetty read as ``..``): what an upstream might decode must
    not escape either.
    """
    if "." not in remainder and "%" not in remainder:
        return False  # no dot-segment, plain or encoded, can be in it
    depth = 0
    for segment in _SEGMENT_SPLIT.split(remainder):
        segment = _PARAMS.sub("", _DOT.sub(".", segment))
        if segment == "..":
            depth -= 1
            if depth < 0:
                return True
        elif segment not in ("", "."):
            depth += 1
    return False


def prefix_matches(prefix: str, path: str) -> bool:
    """``/acme/`` matches ``/acme/x``; ``/acme`` matches ``/acme`` and ``/acme/x``
    but not ``/acmex`` (prefixes end on a segment boundary)."""
    if not path.startswith(prefix):
        return False
    return prefix.endswith("/") or len(path) == len(prefix) or path[len(prefix)] == "/"


def remainder_after(prefix: str | None, path: str) -> str:
    """The part of ``path`` (which matched ``prefix``) that follows the prefix,
    without its leading separator."""
    if prefix is None:
        return path[1:]
    rest = path[len(prefix) :]
    if not prefix.endswith("/") and rest.startswith("/"):
        rest = rest[1:]
    return rest


@dataclass(frozen=True, slots=True)
class UpstreamBase:
    """A route's upstream, pre-split at config load so that mapping a request is
    string concatenation."""

    origin: str  # scheme://host[:port]
    host_header: str  # what the upstream expects in Host
    base_path: str  # ends with "/"
    exact_path: str  # the upstream path as configured (for a request equal to the prefix)

    @classmethod
    def parse(cls, upstream: str) -> UpstreamBase:
        url = URL(upstream)
        raw_path = url.raw_path or "/"
        default_port = {"http": 80, "https": 443}[url.scheme]
        host = url.raw_host or ""
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        host_header = host if url.port in (None, default_port) else f"{host}:{url.port}"
        return cls(
            origin=f"{url.scheme}://{host_header}",
            host_header=host_header,
            base_path=raw_path if raw_path.endswith("/") else raw_path + "/",
            exact_path=raw_path,
        )

    def url_for(self, remainder: str, query: str, *, exact: bool) -> str:
        path = self.exact_path if exact else self.base_path + remainder
        return f"{self.origin}{path}?{query}" if query else f"{self.origin}{path}"


class Router(Generic[T]):
    """First match in file order. Each route carries a value of the caller's
    (the forwarder keeps its per-route runtime state there)."""

    def __init__(self, routes: Sequence[tuple[RouteConfig, T]]) -> None:
        self._routes = tuple(routes)
        # The routes with their prefixes normalised, for route_for: a prefix
        # written "/%7Euser/" or "/caf%c3%a9/" must meet a normalised path.
        self._canonical = tuple(
            (replace(route, path_prefix=canonical_path(route.path_prefix)), i)
            if route.path_prefix is not None
            else (route, i)
            for i, (route, _) in enumerate(self._routes)
        )
        # A prefix not in normalised form ("/%7Euser/") can read as a plain
        # path ("/~user/"): then every path is checked, not only the ones
        # that could read otherwise themselves.
        self._check_all = any(
            route.path_prefix is not None and canonical_path(route.path_prefix) != route.path_prefix
            for route, _ in self._routes
        )
        # Prefixes that end in "/", without it: "/acme/admin" for "/acme/admin/".
        # nginx redirects such a path to the prefix, Spring and others serve it
        # as the same resource: a broader route must not carry it (round 11).
        self._bare = frozenset(
            route.path_prefix[:-1]
            for route, _ in self._canonical
            if route.path_prefix is not None and len(route.path_prefix) > 1
            and route.path_prefix.endswith("/")
        )  # fmt: skip

    @property
    def entries(self) -> tuple[tuple[RouteConfig, T], ...]:
        """Every (route, value), in match order."""
        return self._routes

    def match(self, target: RequestTarget) -> tuple[RouteConfig, T] | None:
        """The first route whose host and/or path prefix match ``target``.

        Absolute-form targets only match routes that name a host: the proxy must
        never send an app's request for ``http://elsewhere/`` to a path-only route.
        """
        found = _first(self._routes, target)
        return None if found is None else self._routes[found]

    def route_for(self, target: RequestTarget) -> tuple[RouteConfig, T] | None:
        """:meth:`match`, refusing a path whose decoded, normalised form
        (:func:`canonical_path`) another route serves: ``/acme/%61dmin/``
        or ``/acme/./admin/`` must not reach ``/acme/admin/``'s partner
        path through ``/acme/``, past the guards (``allow_from``,
        ``inbound_auth``) of the route that serves it (issue 11, seventh
        outside round). Raises AmbiguousPath."""
        index = _first(self._routes, target)
        if index is None:
            return None
        plain = not (self._check_all or may_read_otherwise(target.path))
        if self._bare and not target.path.endswith("/"):
            bare = target.path if plain else canonical_path(target.path)
            if bare in self._bare:
                other = _first(self._canonical, target.replace(path=bare + "/"))
                if other is not None and self._canonical[other][1] != index:
                    raise AmbiguousPath(
                        f"the path is route {self._routes[self._canonical[other][1]][0].name!r}'s "
                        f"prefix without its trailing slash, which a partner may serve as "
                        f"{bare[:200] + '/'!r}; route {self._routes[index][0].name!r} does not "
                        "carry it: send it with the slash"
                    )
        if plain:
            return self._routes[index]
        canonical = canonical_path(target.path)
        other = _first(self._canonical, target.replace(path=canonical))
        if other is not None and self._canonical[other][1] != index:
            raise AmbiguousPath(
                f"the path reads as {canonical[:200]!r} once decoded and normalised, which "
                f"route {self._routes[self._canonical[other][1]][0].name!r} serves, not "
                f"{self._routes[index][0].name!r}; send it as that"
            )
        return self._routes[index]


def _first(routes: Sequence[tuple[RouteConfig, object]], target: RequestTarget) -> int | None:
    """The index of the first route whose host and/or path prefix match."""
    for i, (route, _) in enumerate(routes):
        if route.host is not None:
            if route.host != target.host:
                continue
        elif target.absolute:
            continue
        if route.path_prefix is not None and not prefix_matches(route.path_prefix, target.path):
            continue
        return i
    return None


def upstream_url(route: RouteConfig, base: UpstreamBase, target: RequestTarget) -> str:
    """The raw upstream URL for ``target`` on ``route``; raises PathEscapesRoute.

    ``/acme/orders/7?x=%2F`` on prefix ``/acme/`` and upstream
    ``https://api.acme.example/v2/`` gives ``https://api.acme.example/v2/orders/7?x=%2F``.
    """
    remainder = remainder_after(route.path_prefix, target.path)
    if climbs_out(remainder):
        raise PathEscapesRoute.at(
            route.name,
            "the path climbs out of the route after dot-segment removal",
            client=route.client,
        )
    prefix = route.path_prefix
    exact = prefix is not None and not prefix.endswith("/") and target.path == prefix
    return base.url_for(remainder, target.query, exact=exact)
