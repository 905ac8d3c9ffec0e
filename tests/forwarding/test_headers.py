import re

import pytest

from proxy.forwarding.headers import (
    connection_named,
    downstream_response_headers,
    message_head,
    request_id,
    upstream_request_headers,
)


def build(headers: list[tuple[str, str]], trust: bool = False) -> list[tuple[str, str]]:
    return upstream_request_headers(
        headers,
        upstream_host="api.example",
        authorization="Bearer T",
        request_id="rid-1",
        client_ip="10.1.2.3",
        inbound_host="proxy.local:8080",
        inbound_proto="http",
        trust_forwarded=trust,
    )


def test_owned_and_hop_by_hop_headers_are_replaced() -> None:
    out = build(
        [
            ("Host", "proxy.local:8080"),
            ("Authorization", "Basic app"),
            ("Connection", "close, X-Drop-Me"),
            ("X-Drop-Me", "1"),
            ("Transfer-Encoding", "chunked"),
            ("TE", "trailers"),
            ("Trailer", "X"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic x"),
            ("Proxy-Connection", "keep-alive"),
            ("Keep-Alive", "5"),
            ("Expect", "100-continue"),
            ("Accept", "a/b"),
            ("Cookie", "a=1"),
            ("Cookie", "b=2"),
            ("X-Request-Id", "from-app"),
        ]
    )
    assert out == [
        ("Host", "api.example"),
        ("Accept", "a/b"),
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
        ("Authorization", "Bearer T"),
        ("X-Request-Id", "rid-1"),
        ("X-Forwarded-For", "10.1.2.3"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "proxy.local:8080"),
        ("Via", "1.1 authproxy"),
    ]


def test_forged_forwarding_headers_are_dropped_unless_trusted() -> None:
    forged = [
        ("X-Forwarded-For", "6.6.6.6"),
        ("Forwarded", "for=6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
        ("X-Forwarded-Host", "evil"),
        ("Via", "1.0 lb"),
    ]
    out = dict(build(forged))
    assert out["X-Forwarded-For"] == "10.1.2.3"
    assert out["X-Forwarded-Host"] == "proxy.local:8080"
    assert "Forwarded" not in out and "X-Real-IP" not in out
    assert out["Via"] == "1.0 lb, 1.1 authproxy"
    trusted = dict(build(forged, trust=True))
    assert trusted["X-Forwarded-For"] == "6.6.6.6, 10.1.2.3"
    assert trusted["Forwarded"] == "for=6.6.6.6"
    assert trusted["X-Forwarded-Host"] == "proxy.local:8080"


def test_response_headers() -> None:
    out = downstream_response_headers(
        [
            ("Set-Cookie", "a=1"),
            ("Connection", "X-H"),
            ("X-H", "v"),
            ("Transfer-Encoding", "chunked"),
            ("Set-Cookie", "b=2"),
            ("Content-Encoding", "gzip"),
            ("Proxy-Authenticate", "Basic"),
        ]
    )
    assert out == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Content-Encoding", "gzip")]


def test_connection_named() -> None:
    assert connection_named([("connection", " A , b,,"), ("CONNECTION", "c")]) == {"a", "b", "c"}


def test_request_id_is_kept_when_sane_else_generated() -> None:
    assert request_id("abc-123:x/y") == "abc-123:x/y"
    for bad in (None, "", "has space", "x" * 129, "new\nline", 'quote"'):
        generated = request_id(bad)
        assert generated != bad and re.fullmatch("[0-9a-f]{32}", generated)
    assert request_id(None) != request_id(None)


def test_message_head_frames_and_refuses_line_breaks() -> None:
    assert message_head("GET / HTTP/1.1", [("A", "1"), ("B", "2")], "X: y\r\n") == (
        b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nX: y\r\n\r\n"
    )
    for name, value in (("A", "1\r\nInjected: 1"), ("A", "1\n"), ("A\r", "1")):
        with pytest.raises(ValueError, match="CR or LF"):
            message_head("GET / HTTP/1.1", [(name, value)])
    with pytest.raises(ValueError):
        message_head("GET /\r\nX: 1 HTTP/1.1", [])


def test_the_underscore_spelling_of_a_dropped_field_is_dropped_too() -> None:
    """What CGI-style stacks read as a dropped field (round 10, F2: an
    inbound key header); a name that is not dropped keeps its "_"."""
    headers = [("X_Proxy_Key", "k"), ("Proxy_Authorization", "p"), ("X_Trace_Id", "t")]
    out = upstream_request_headers(
        headers,
        upstream_host="api.example",
        authorization="Bearer T",
        request_id="rid-1",
        client_ip=None,
        inbound_host=None,
        inbound_proto="http",
        trust_forwarded=True,
        drop=frozenset({"x-proxy-key"}),
    )
    names = [name for name, _ in out]
    assert "X_Proxy_Key" not in names and "Proxy_Authorization" not in names
    assert ("X_Trace_Id", "t") in out
    # The fields this hop sets, even behind a trusted balancer (review of round 10's fix).
    for name in ("X_Request_Id", "X_Forwarded_Host", "X_Forwarded_Proto", "X_Forwarded_For"):
        assert name not in [n for n, _ in build([(name, "x")], trust=True)]


@pytest.mark.parametrize(
    "name",
    ["X_Forwarded_For", "X_Real_IP", "CF-Connecting-IP", "Fastly-Client-IP", "X-Cluster-Client-IP",
     "Client-IP", "X-Forwarded", "Forwarded-For", "X-Originating-IP", "X-Remote-IP",
     "X-Remote-Addr", "X-Forwarded-Ssl", "Front-End-Https", "X-Url-Scheme",
     "X-Forwarded-Client-Cert", "WL-Proxy-Client-IP", "Proxy-Client-IP", "X-Original-URI",
     "X-Forwarded-Uri", "X-Envoy-Original-Path", "X-Forwarded-Protocol", "X-Scheme", "X-Host"],
)  # fmt: skip
def test_other_client_address_and_scheme_spellings_are_dropped_unless_trusted(name: str) -> None:
    """Issue 11, fifth outside round: what CDNs and client-IP libraries read."""
    assert name.lower() not in {n.lower() for n, _ in build([(name, "6.6.6.6")])}
    if name.startswith("X_") and name != "X_Forwarded_For":
        # behind a trusted balancer the field is the balancer's; X-Forwarded-For
        # is this hop's to extend, and its "_" spelling would read as a second one
        assert (name, "6.6.6.6") in build([(name, "6.6.6.6")], trust=True)
