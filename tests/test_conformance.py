"""The wire-level conformance suite: every case of tests/conformance_cases.py
through the real proxy on real sockets, between the fake token endpoint and a
recording partner that keeps the exact bytes it receives (tests/wire.py).

Each forwarded case runs twice on one proxy: first on a fresh upstream
connection, then again from a new app connection over the pooled keep-alive
one; both runs must match the table and each other. Body-bearing cases come in
a small (read whole) and a large (streamed) size, and chunked ones stream
whatever their size. CI runs the file on every engine the proxy has.

Below the table: isolation and deadline tests that need their own config.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from conformance_cases import CASES, CASES_BY_NAME, authproxy_yaml
from fakes import FakeTokenEndpoint
from wire import (
    AppConnection,
    Outcome,
    RecordingPartner,
    Reply,
    check_outcome,
    outcome_signature,
    render_bytes,
    run_case,
)

from proxy.config.load import parse_config
from proxy.server import ProxyServer


@dataclass
class Rig:
    tokens: FakeTokenEndpoint
    partner: RecordingPartner
    proxy: ProxyServer
    log: io.StringIO

    @property
    def minted(self) -> list[bytes]:
        return [token.encode() for token in self.tokens.issued]

    def check(self, case_name: str, outcome: Outcome) -> list[str]:
        problems = check_outcome(
            CASES_BY_NAME[case_name],
            outcome,
            authority=self.partner.authority,
            tokens=self.minted,
        )
        secret = CASES_BY_NAME[case_name].secret
        if secret and secret.decode("latin-1") in self.log.getvalue():
            problems.append(f"a log line holds the app's secret bytes {secret!r}")
        return problems


async def start_rig(log: io.StringIO, extra_routes: str = "") -> tuple[Rig, list[object]]:
    tokens = FakeTokenEndpoint()
    await tokens.start()
    partner = RecordingPartner()
    await partner.start()
    config = parse_config(
        authproxy_yaml(tokens.token_url, partner.url, extra_routes), "conformance.yaml"
    )
    proxy = ProxyServer(config)
    await proxy.start()
    return Rig(tokens, partner, proxy, log), [proxy, partner, tokens]


@pytest.fixture
async def rig(log_stream: io.StringIO) -> AsyncIterator[Rig]:
    made, running = await start_rig(log_stream)
    yield made
    for server in running:
        await server.stop()  # type: ignore[attr-defined]


def closes_upstream(name: str) -> bool:
    """Whether the case's partner ends its connections itself (close-delimited
    answers, Connection: close), so that a second run needs a new one."""
    case = CASES_BY_NAME[name]
    if case.status or case.spoils_upstream:
        return True  # an answer the proxy refused or cut: that connection is not trusted again
    for reply in case.replies:
        data = (
            reply
            if isinstance(reply, bytes)
            else b"".join(s for s in reply if isinstance(s, bytes))
        )
        if b"\r\nConnection: close\r\n" in data or (b" 204 " in data and b"Content-Length" in data):
            return True  # the partner ends it, or the proxy does not trust it again
        if (
            b"Content-Length" not in data
            and b"Transfer-Encoding" not in data
            and b" 204 " not in data
            and b" 304 " not in data
            and not case.send[0].startswith(b"HEAD")
        ):
            return True
    return False


FORWARDED = sorted(c.name for c in CASES if not c.local)
LOCAL = sorted(c.name for c in CASES if c.local)


@pytest.mark.parametrize("name", FORWARDED)
async def test_forwarded_exactly_on_a_fresh_and_a_pooled_connection(rig: Rig, name: str) -> None:
    case = CASES_BY_NAME[name]
    fresh = await run_case(case, rig.proxy.port, rig.partner)
    problems = [f"fresh upstream connection: {p}" for p in rig.check(name, fresh)]
    if fresh.received and fresh.new_connections < 1:
        problems.append("fresh run: the partner saw no new connection")
    await asyncio.sleep(0.05)  # the first run's upstream connection is back in the pool
    pooled = await run_case(case, rig.proxy.port, rig.partner)
    problems += [f"pooled connection: {p}" for p in rig.check(name, pooled)]
    if pooled.received and pooled.new_connections and not closes_upstream(name):
        problems.append(
            f"pooled run: the proxy opened {pooled.new_connections} new upstream connection(s) "
            "instead of reusing the idle one"
        )
    if not problems and not case.status and outcome_signature(fresh) != outcome_signature(pooled):
        problems.append("the fresh and the pooled run were answered differently")
    assert not problems, f"{name} ({case.why}):\n" + "\n".join(problems)


@pytest.mark.parametrize("name", LOCAL)
async def test_answered_by_the_proxy_without_the_partner(rig: Rig, name: str) -> None:
    case = CASES_BY_NAME[name]
    outcome = await run_case(case, rig.proxy.port, rig.partner)
    problems = rig.check(name, outcome)
    finals = [m for m in outcome.answers if not m.interim]
    if finals and finals[0].status in case.status and finals[0].content:
        try:
            document = json.loads(finals[0].content)
        except ValueError:
            problems.append(f"not the JSON error shape: {render_bytes(finals[0].content, 200)}")
        else:
            if not isinstance(document, dict) or not document.get("error"):
                problems.append(f"no error code in {document!r}")
    if rig.partner.garbage and case.secret:
        problems += ["the partner got the secret" for g in rig.partner.garbage if case.secret in g]
    assert not problems, f"{name} ({case.why}):\n" + "\n".join(problems)
    assert rig.tokens.mint_count <= 1


def test_the_table_covers_the_issue() -> None:
    names = set(CASES_BY_NAME)
    for needed in (
        "method_trace_refused",
        "method_extension_FOOBAR",
        "isolation_request_trailer_not_a_header_of_next_sequential",
        "isolation_response_trailer_not_a_header_for_another_app",
        "interim_103_early_hints",
        "pipelined_17_gets",
        "limit_501_transfer_coding_gzip_chunked",
        "limit_414_request_line",
        "limit_431_long_authorization_never_echoed",
        "limit_505_http_2_0",
        "headers_obs_text_request",
        "headers_response_spelling_kept",
    ):
        assert needed in names
    assert len(CASES) >= 80


# ------------------------------------------------- isolation and deadlines


async def test_a_partial_body_never_reaches_the_next_request(rig: Rig) -> None:
    for size, sent in ((10, 5), (200_000, 70_000)):
        rig.partner.reset()
        rig.partner.script([Reply.of(b"HTTP/1.1 200 OK\r\nDate: x\r\nContent-Length: 2\r\n\r\nok")])
        quitter = await AppConnection.open(rig.proxy.port)
        await quitter.send(
            b"POST /acme/upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size
            + b"p" * sent
        )
        await asyncio.sleep(0.2)
        await quitter.close()
        await asyncio.sleep(0.1)
        app = await AppConnection.open(rig.proxy.port)
        await app.send(b"GET /acme/next HTTP/1.1\r\nHost: a\r\n\r\n")
        answer = (await app.response())[-1]
        await app.close()
        assert answer.status == 200, render_bytes(answer.raw)
        whole = [r.message for r in rig.partner.requests]
        assert [m.start_line for m in whole] == [b"GET /v2/next HTTP/1.1"], [m.head for m in whole]
        assert whole[0].content == b"" and b"ppp" not in whole[0].raw


async def test_a_route_timeout_holds_on_a_pooled_connection_of_another_route(
    log_stream: io.StringIO,
) -> None:
    """issue 11 (5.): two routes to one origin share its pool; the slow route's
    1 s deadline applies though the connection was last used by the fast one."""
    extra = "\n".join(
        (
            "  - {name: fast, match: {path_prefix: /fast/}, upstream: PARTNER/v2/, client: demo}",
            "  - {name: slow, match: {path_prefix: /slow/}, upstream: PARTNER/v2/, client: demo, timeout: 1s}",
        )
    )
    tokens = FakeTokenEndpoint()
    await tokens.start()
    partner = RecordingPartner()
    await partner.start()
    config = parse_config(
        authproxy_yaml(tokens.token_url, partner.url, extra.replace("PARTNER", partner.url) + "\n"),
        "conformance.yaml",
    )
    proxy = ProxyServer(config)
    await proxy.start()
    ok = b"HTTP/1.1 200 OK\r\nDate: x\r\nContent-Length: 2\r\n\r\nok"
    partner.answer = lambda m: Reply((5.0, ok)) if b"/late" in m.target else Reply((ok,))
    try:
        app = await AppConnection.open(proxy.port)
        await app.send(b"GET /fast/first HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await app.response())[-1].status == 200
        await app.close()
        await asyncio.sleep(0.05)
        app = await AppConnection.open(proxy.port)
        started = time.monotonic()
        await app.send(b"GET /slow/late HTTP/1.1\r\nHost: a\r\n\r\n")
        answer = (await app.response(timeout=8))[-1]
        elapsed = time.monotonic() - started
        await app.close()
        assert partner.connections == 1, "the two routes did not share the pooled connection"
        assert answer.status == 504, f"{elapsed:.1f} s: {render_bytes(answer.raw, 300)}"
        assert elapsed < 2.0, f"504 after {elapsed:.1f} s; the route's timeout is 1 s"
    finally:
        await proxy.stop()
        await partner.stop()
        await tokens.stop()


@pytest.fixture
def jammed_port() -> Iterator[int]:
    """A loopback port whose accept queue is full: it listens with backlog 0
    and never accepts, and is filled first, so a new connect hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.05)
    probe = socket.socket()
    probe.settimeout(0.3)
    try:
        probe.connect(("127.0.0.1", port))
        pytest.fail("the accept queue did not fill; cannot make a connect hang here")
    except TimeoutError:
        pass
    finally:
        probe.close()
    yield port
    for filler in fillers:
        filler.close()
    listener.close()


async def test_a_connect_timeout_is_a_502_naming_connect_timeout(
    log_stream: io.StringIO, jammed_port: int
) -> None:
    """issue 11 (13.); docs/configuration.md: 502 when connect_timeout is exceeded."""
    extra = (
        f"  - {{name: jam, match: {{path_prefix: /jam/}}, upstream: http://127.0.0.1:{jammed_port}/,"
        " client: demo, connect_timeout: 500ms}\n"
    )
    made, running = await start_rig(log_stream, extra)
    try:
        app = await AppConnection.open(made.proxy.port)
        started = time.monotonic()
        await app.send(b"GET /jam/x HTTP/1.1\r\nHost: a\r\n\r\n")
        answer = (await app.response(timeout=10))[-1]
        elapsed = time.monotonic() - started
        await app.close()
        assert answer.status == 502, render_bytes(answer.raw, 400)
        assert b"connect_timeout" in answer.content, render_bytes(answer.content, 400)
        assert elapsed < 2.5, f"{elapsed:.1f} s for two connects of at most 0.5 s each"
    finally:
        for server in running:
            await server.stop()  # type: ignore[attr-defined]


async def test_good_requests_before_a_malformed_one_in_one_read_are_answered_first(
    rig: Rig,
) -> None:
    """black-box round 2 (3.): a whole GET, then a malformed request, in one
    write: the GET is forwarded and answered, then the 400, then the close
    (RFC 9112 §9.3.2: answers in order; both parsers drop a refused read's
    messages, so the listener parses it again)."""
    rig.partner.reset()
    rig.partner.script([Reply.of(b"HTTP/1.1 200 OK\r\nDate: x\r\nContent-Length: 3\r\n\r\none")])
    app = await AppConnection.open(rig.proxy.port)
    await app.send(
        b"GET /acme/first HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /acme/second HTTP/1.1\r\nHost: a\r\nBad Name: b\r\n\r\n"
    )
    first = (await app.response())[-1]
    second = (await app.response())[-1]
    assert (first.status, first.content) == (200, b"one"), render_bytes(first.raw)
    assert second.status == 400, render_bytes(second.raw)
    assert await app.closed()
    await app.close()
    assert [r.message.start_line for r in rig.partner.requests] == [b"GET /v2/first HTTP/1.1"]


async def test_body_timeout_is_a_gap_for_a_small_sized_body_too(rig: Rig) -> None:
    """black-box round 2 (7.): a 5-byte body sent a byte every 0.4 s under a
    1 s body_timeout is whole after 1.6 s with no gap over 0.4 s: 200, the
    bytes forwarded, as for a streamed body."""
    rig.partner.reset()
    rig.partner.script([Reply.of(b"HTTP/1.1 200 OK\r\nDate: x\r\nContent-Length: 2\r\n\r\nok")])
    app = await AppConnection.open(rig.proxy.port)
    await app.send(b"POST /acme/slow HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
    for byte in b"hello":
        await asyncio.sleep(0.4)
        await app.send(bytes([byte]))
    answer = (await app.response(method=b"POST"))[-1]
    await app.close()
    assert answer.status == 200, render_bytes(answer.raw)
    assert [r.message.content for r in rig.partner.requests] == [b"hello"]


async def first_head_of_reads(port: int, parts: tuple[bytes, ...]) -> bytes:
    """Send ``parts`` as separate TCP reads (0.15 s apart); the first answer's head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for part in parts:
        writer.write(part)
        await writer.drain()
        await asyncio.sleep(0.15)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    return head


@pytest.mark.parametrize(
    ("parts", "start_line"),
    [
        ((b"fooba", b"r /acme/x HTTP/1.1\r\nHost: a\r\n\r\n"), b"foobar /v2/x HTTP/1.1"),
        ((b"g", b"et /acme/x HTTP/1.1\r\nHost: a\r\n\r\n"), b"get /v2/x HTTP/1.1"),
        ((b"get /acme/x HTT", b"P/1.1\r\nHost: a\r\n\r\n"), b"get /v2/x HTTP/1.1"),
        ((b"G", b"ET /acme/x HTTP/1.1\r\nHost: a\r\n\r\n"), b"GET /v2/x HTTP/1.1"),
    ],
)
async def test_a_request_is_the_same_whatever_its_tcp_segmentation(
    rig: Rig, parts: tuple[bytes, bytes], start_line: bytes
) -> None:
    """RFC 9110 §9.1: a method is any token, case kept; a request split across
    reads is the request sent in one (issue 11, sixth outside round)."""
    head = await first_head_of_reads(rig.proxy.port, parts)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert rig.partner.requests[-1].message.start_line == start_line


async def test_a_lower_case_method_that_starts_in_the_read_of_a_body_keeps_its_case(
    rig: Rig,
) -> None:
    """RFC 9110 §9.1 (issue 11, sixth outside round's residual): on the
    Python parser, a method whose first bytes come in the read that ends the
    body before it, and whose rest comes in the next read, is forwarded as
    spelled ("abcget"), never upper-cased."""
    first = await first_head_of_reads(
        rig.proxy.port,
        (
            b"foobar /acme/a HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhiab",
            b"cget /acme/b HTTP/1.1\r\nHost: a\r\n\r\n",
        ),
    )
    assert first.startswith(b"HTTP/1.1 200"), first
    lines = [r.message.start_line for r in rig.partner.requests[-2:]]
    assert lines == [b"foobar /v2/a HTTP/1.1", b"abcget /v2/b HTTP/1.1"]


@pytest.mark.parametrize(
    ("reply", "named"),
    [
        (b"HTTP/1.1 2x0 tok-secret-7\r\nContent-Length: 0\r\n\r\n", b"Bad status line"),
        (b"HTTP/1.1 200 OK\r\nX-Echo tok-secret-7: v\r\n\r\n", b"Invalid header token"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: tok-secret-7\r\n\r\n", b"Content-Length"),
        (  # round 7 (F4): an apostrophe in the reason is no quoted excerpt
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n",
            b"Transfer-Encoding can't be present with Content-Length",
        ),
        (  # the limits a partner's answer is held to (docs/configuration.md)
            b"HTTP/1.1 200 OK\r\n"
            + b"".join(b"X-H%d: tok-secret-7\r\n" % i for i in range(129))
            + b"Content-Length: 0\r\n\r\n",
            b"Too many headers received",
        ),
        (
            b"HTTP/1.1 200 OK\r\nX-Long: tok-secret-7" + b"a" * 8190 + b"\r\n\r\n",
            b"a header line over 8190 bytes",
        ),
    ],
)
async def test_a_malformed_partner_answer_is_a_502_naming_the_fault_not_its_bytes(
    rig: Rig, reply: bytes, named: bytes
) -> None:
    """Bad input gets a clear answer: the 502 says what the parser found
    wrong (issue 11, sixth round's residual: it said only
    "HttpProcessingError"), and none of the partner's bytes, which could
    echo a credential."""
    rig.partner.reset()
    rig.partner.script([Reply.of(reply)])
    app = await AppConnection.open(rig.proxy.port)
    await app.send(b"GET /acme/bad HTTP/1.1\r\nHost: a\r\n\r\n")
    answer = (await app.response())[-1]
    await app.close()
    assert answer.status == 502, render_bytes(answer.raw, 400)
    assert named in answer.content, render_bytes(answer.content, 400)
    assert b"tok-secret-7" not in answer.content
    assert b"tok-secret-7" not in rig.log.getvalue().encode()
