import pytest

from proxy.config.model import RouteConfig
from proxy.errors import AmbiguousPath, BadRequest, MethodNotAllowed, PathEscapesRoute
from proxy.routing.router import (
    Router,
    UpstreamBase,
    canonical_path,
    climbs_out,
    parse_target,
    prefix_matches,
    split_host,
    upstream_url,
    valid_authority,
)


def route(
    name: str = "r",
    *,
    host: str | None = None,
    prefix: str | None = None,
    upstream: str = "https://api.acme.example/v2/",
) -> RouteConfig:
    return RouteConfig(name=name, upstream=upstream, client="c", host=host, path_prefix=prefix)


def forward(r: RouteConfig, raw: str, host: str | None = "proxy.local") -> str:
    return upstream_url(r, UpstreamBase.parse(r.upstream), parse_target("GET", raw, host))


def test_issue_example_maps_byte_for_byte() -> None:
    r = route(prefix="/acme/")
    assert forward(r, "/acme/orders/7?x=%2F") == "https://api.acme.example/v2/orders/7?x=%2F"


@pytest.mark.parametrize(
    ("prefix", "upstream", "raw", "expected"),
    [
        ("/acme/", "https://h/v2/", "/acme/", "https://h/v2/"),
        ("/acme/", "https://h/v2", "/acme/a", "https://h/v2/a"),
        ("/acme", "https://h/v2", "/acme", "https://h/v2"),
        ("/acme", "https://h/v2/", "/acme/a/b", "https://h/v2/a/b"),
        ("/acme/", "https://h/", "/acme//double//slash", "https://h//double//slash"),
        (
            "/acme/",
            "https://h:8443/x/",
            "/acme/%7Euser?a=b&a=c",
            "https://h:8443/x/%7Euser?a=b&a=c",
        ),
        ("/acme/", "http://h:80/", "/acme/q?", "http://h/q"),
        ("/acme/", "https://h/", "/acme/a/./b/../c", "https://h/a/./b/../c"),
    ],
)
def test_mapping(prefix: str, upstream: str, raw: str, expected: str) -> None:
    assert forward(route(prefix=prefix, upstream=upstream), raw) == expected


def test_host_only_route_forwards_whole_path() -> None:
    r = route(host="orders.acme.example", upstream="https://api.acme.example/v2/")
    assert (
        forward(r, "/orders/7?q=1", "orders.acme.example")
        == "https://api.acme.example/v2/orders/7?q=1"
    )


@pytest.mark.parametrize(
    "raw",
    [
        "/acme/../admin",
        "/acme/a/../../x",
        "/acme/%2e%2e/x",
        "/acme/%2E./x",
        "/acme/a%2f..%2f..%2fx",
        "/acme/..\\x",
        "/acme/a/..%5c..%5cx",
    ],
)
def test_escaping_paths_are_rejected(raw: str) -> None:
    with pytest.raises(PathEscapesRoute, match="'r'"):
        forward(route(prefix="/acme/"), raw)


def test_climbs_out() -> None:
    assert climbs_out("..")
    assert not climbs_out("a/..")
    assert not climbs_out("a/b/../../")
    assert climbs_out("a/b/../../..")
    assert not climbs_out("..a/b")


def test_prefix_ends_on_a_segment_boundary() -> None:
    assert prefix_matches("/acme", "/acme")
    assert prefix_matches("/acme", "/acme/x")
    assert not prefix_matches("/acme", "/acmex")
    assert prefix_matches("/acme/", "/acme/x")
    assert not prefix_matches("/acme/", "/acme")


def test_absolute_form_uses_target_authority() -> None:
    target = parse_target("GET", "http://Partner.Example:8080/a/b?c=d", "other.example")
    assert target.absolute and target.host == "partner.example"
    assert target.authority == "Partner.Example:8080"
    assert (target.path, target.query) == ("/a/b", "c=d")
    target = parse_target("GET", "http://partner.example", None)
    assert target.path == "/"
    target = parse_target("GET", "http://partner.example?x=1", None)
    assert (target.path, target.query) == ("/", "x=1")


@pytest.mark.parametrize("raw", ["http://user:pw@h/x", "http:///x", "*", "x/y", "/a#frag"])
def test_bad_targets(raw: str) -> None:
    with pytest.raises(BadRequest):
        parse_target("GET", raw, "h")


def test_connect_inside_a_tunnel_is_refused() -> None:
    # The forwarder plans a CONNECT (proxy/egress/policy.py); one that reaches
    # the router came inside an intercepted tunnel.
    with pytest.raises(MethodNotAllowed, match="inside an intercepted CONNECT"):
        parse_target("CONNECT", "h:443", "h:443")


def test_router_first_match_wins_and_absolute_needs_host() -> None:
    a = route("a", prefix="/x/")
    b = route("b", host="h.example")
    c = route("c", host="h.example", prefix="/x/")
    router = Router([(a, 1), (b, 2), (c, 3)])

    def pick(raw: str, host: str | None) -> int | None:
        found = router.match(parse_target("GET", raw, host))
        return None if found is None else found[1]

    assert pick("/x/1", "anything") == 1
    assert pick("/y", "h.example:8080") == 2
    assert pick("/y", "H.EXAMPLE.") == 2
    assert pick("http://h.example/x/1", None) == 2
    assert pick("http://other.example/x/1", None) is None
    assert pick("/y", "other") is None
    assert Router([(c, 3)]).match(parse_target("GET", "http://h.example/x/1", None)) is not None
    assert Router([(c, 3)]).match(parse_target("GET", "http://h.example/y", None)) is None


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/acme/./admin/users", "/acme/admin/users"),
        ("/acme//admin/users", "/acme/admin/users"),
        ("/acme/%61dmin/users", "/acme/admin/users"),
        ("/acme/admin%2Fusers", "/acme/admin/users"),
        ("/acme/admin;jsessionid=1/users", "/acme/admin/users"),
        ("/acme/x/../admin/", "/acme/admin/"),
        ("/acme/admin/.", "/acme/admin/"),
        ("/acme/%20x", "/acme/%20x"),  # not unreserved: kept encoded
        ("/acme/%3fx", "/acme/%3Fx"),
        # round 10 (F1): a segment of parameters only is an empty one, merged
        ("/acme/;/admin/x", "/acme/admin/x"),
        ("/acme/;a=b/admin/x", "/acme/admin/x"),
        ("/acme//;/admin/x", "/acme/admin/x"),
        ("/acme/x/;/../admin/x", "/acme/admin/x"),
        ("/acme/admin/;", "/acme/admin/"),
        ("/acme/admin//", "/acme/admin/"),
        ("/", "/"),
        ("//", "/"),
    ],
)
def test_canonical_path_is_what_a_partner_stack_may_read(raw: str, canonical: str) -> None:
    assert canonical_path(raw) == canonical


@pytest.mark.parametrize(
    "raw",
    ["/acme/./admin/users", "/acme//admin/users", "/acme/%61dmin/users", "/acme/admin%2Fusers",
     "/acme/admin;x/users", "/acme/x/../admin/users",
     "/acme/x%5C..%5Cadmin/users", "/acme/x%5c%2e%2e%5cadmin/users"],  # round 8 (N2)
)  # fmt: skip
def test_a_path_another_route_serves_once_normalised_is_refused(raw: str) -> None:
    """Round 7 (F1): the broad route must not carry a request for the guarded
    route's path; nginx matches its locations on the normalised path too."""
    admin, broad = route("admin", prefix="/acme/admin/"), route("broad", prefix="/acme/")
    router = Router([(admin, 1), (broad, 2)])
    with pytest.raises(AmbiguousPath) as refused:
        router.route_for(parse_target("GET", raw, "h"))
    assert refused.value.status == 400 and "'admin'" in refused.value.message
    assert router.route_for(parse_target("GET", "/acme/admin/users", "h")) == (admin, 1)
    for same in ("/acme/./other", "/acme/%61bc", "/acme/a//b"):  # the same route either way
        assert router.route_for(parse_target("GET", same, "h")) == (broad, 2)


@pytest.mark.parametrize("prefix", ["/caf%c3%a9/", "/%7Euser/", "/a;v2/", "/x%2Fy/"])
def test_a_prefix_written_unnormalised_still_serves_its_own_paths(prefix: str) -> None:
    """Review of round 7's F1 fix: the normalised path is compared with the
    normalised prefixes, so a route whose prefix is written with escapes or
    parameters is not refused in favour of a catch-all after it."""
    own, everything = route("own", prefix=prefix), route("all", prefix="/")
    router = Router([(own, 1), (everything, 2)])
    assert router.route_for(parse_target("GET", prefix + "x", "h")) == (own, 1)


@pytest.mark.parametrize(("prefix", "plain"), [("/%7Euser/", "/~user/x"), ("/api;v=2/", "/api/x")])
def test_a_plain_path_that_reads_as_an_unnormalised_prefix_is_refused(
    prefix: str, plain: str
) -> None:
    """Round 9 (R3): "/~user/x" is "/%7Euser/x" (RFC 3986 §6.2.2.2): the
    catch-all must not carry it past the guarded route's rules."""
    own, everything = route("own", prefix=prefix), route("all", prefix="/")
    router = Router([(own, 1), (everything, 2)])
    with pytest.raises(AmbiguousPath):
        router.route_for(parse_target("GET", plain, "h"))
    assert router.route_for(parse_target("GET", "/other", "h")) == (everything, 2)


@pytest.mark.parametrize(
    ("authority", "host"),
    [
        ("Orders.Acme.Example", "orders.acme.example"),
        ("orders.acme.example.", "orders.acme.example"),  # fully qualified: the same name
        ("orders.acme.example.:8080", "orders.acme.example"),
        ("orders.acme.example..", "orders.acme.example."),  # no name: matches no route
        ("[::1]:8080", "[::1]"),
    ],
)
def test_split_host_takes_one_trailing_dot(authority: str, host: str) -> None:
    assert split_host(authority) == host


def test_request_target_is_a_value() -> None:
    """RequestTarget (a plain class since issue 16, not a frozen
    dataclass): equal by its parts, hashable, and replace() changes only
    the parts it is given."""
    target = parse_target("GET", "http://Api.Example:8080/a/b?q=1", None)
    assert (target.host, target.authority, target.path, target.query, target.absolute) == (
        "api.example",
        "Api.Example:8080",
        "/a/b",
        "q=1",
        True,
    )
    same = parse_target("GET", "http://Api.Example:8080/a/b?q=1", None)
    assert target == same and hash(target) == hash(same) and len({target, same}) == 1
    moved = target.replace(path="/c")
    assert moved != target and moved.path == "/c"
    assert (moved.host, moved.authority, moved.query, moved.absolute) == (
        target.host,
        target.authority,
        target.query,
        target.absolute,
    )
    assert target.replace(host=None).host is None  # None is a value, not "unchanged"
    assert target.replace().path == "/a/b" and target.replace() == target
    assert (target == "not a target") is False
    assert "path='/a/b'" in repr(target)


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("", True),
        ("api.example:8443", True),
        ("[::1]:80", True),
        ("a%2Eb", True),
        ("host:65535", True),
        ("host:65536", False),
        ("host:123456", False),
        ("user@host", False),
        ("a b", False),
        ("a%2", False),
        ("[::1", False),
    ],
)
def test_a_host_is_host_and_port_every_time_it_is_asked(value: str, valid: bool) -> None:
    # The second answer comes from the memo of values seen lately (issue 16).
    assert valid_authority(value) is valid
    assert valid_authority(value) is valid


def test_the_memo_of_checked_hosts_stays_bounded() -> None:
    from proxy.routing import router

    for n in range(3 * router._CHECKED_MOST):
        assert valid_authority(f"h{n}.example")
    assert not valid_authority("h1.example:99999")
    assert 0 < len(router._CHECKED) <= router._CHECKED_MOST
    long_host = "a" * 300
    assert valid_authority(long_host)
    assert long_host not in router._CHECKED  # long values are checked each time, not kept
