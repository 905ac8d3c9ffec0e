"""Log rendering: JSON lines by default, a console format for people, secrets redacted."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.log import LineWriter, access, common_access, configure_logging, get_logger


def test_json_lines_redact_secret_fields() -> None:
    stream = io.StringIO()
    configure_logging("info", stream)
    get_logger("t").info("hello", route="r", authorization="Bearer tok-1", password="pw")
    get_logger("t").debug("hidden")
    (line,) = stream.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "hello" and event["route"] == "r" and event["level"] == "info"
    assert event["authorization"] == "[redacted]" and event["password"] == "[redacted]"
    assert "tok-1" not in line and 'pw"' not in line


def test_console_format_is_for_people() -> None:
    stream = io.StringIO()
    configure_logging("debug", stream, log_format="console")
    get_logger("t").debug("hello", route="r", token="tok-2")
    text = stream.getvalue()
    assert "hello" in text and "route" in text and "=r" in text
    assert "tok-2" not in text
    assert not text.lstrip().startswith("{")
    assert "\x1b[" not in text  # no colours when not a terminal


def _count_writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The bytes of every os.write proxy.log makes from now on (still written)."""
    calls: list[bytes] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        calls.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr("proxy.log.os.write", counting_write)
    return calls


def test_each_line_is_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers share one stderr pipe: a line and its newline in two writes
    could interleave with another worker's line."""
    calls = _count_writes(monkeypatch)
    read, write = os.pipe()
    try:
        with os.fdopen(write, "w", closefd=False) as stream:
            LineWriter(stream).msg("x" * 1000)
        assert calls == [b"x" * 1000 + b"\n"]
        assert os.read(read, 4096) == b"x" * 1000 + b"\n"
    finally:
        os.close(read)
        os.close(write)


def test_lines_of_one_loop_turn_are_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside the event loop, the lines of one turn go out in one write
    (issue 16: one system call for many access lines), whole lines, at
    most PIPE_BUF bytes a write, in order, by the loop's next turn; a line
    longer than PIPE_BUF goes alone; flush_logs writes what is gathered."""
    from proxy.log import PIPE_BUF

    calls = _count_writes(monkeypatch)
    read, write = os.pipe()
    os.set_blocking(read, False)
    line = "y" * 1000

    async def turn() -> None:
        writer = LineWriter(os.fdopen(write, "w", closefd=False), gather=True)
        for n in range(4):
            writer.msg(f"{n}{line}")
        assert calls == []  # gathered, not written yet
        writer.msg(f"4{line}")  # would not fit: the four go now
        assert calls == [b"".join(f"{n}{line}\n".encode() for n in range(4))]
        await asyncio.sleep(0)
        assert calls[1:] == [f"4{line}\n".encode()]
        assert all(len(call) <= PIPE_BUF for call in calls)
        calls.clear()
        writer.msg("z" * (PIPE_BUF + 1))  # too long to gather: written at once
        assert calls == [b"z" * (PIPE_BUF + 1) + b"\n"]

    try:
        asyncio.run(turn())
        got = b""
        while chunk := _read_some(read):
            got += chunk
        assert got.decode().splitlines() == [
            *(f"{n}{line}" for n in range(5)),
            "z" * (PIPE_BUF + 1),
        ]
    finally:
        os.close(read)
        os.close(write)


def test_gathered_lines_keep_their_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long line after short ones of the same turn goes after them; a
    line from outside any loop goes after what an ended loop gathered; a
    second loop's lines after the first's (two asyncio.run in a row)."""
    calls: list[bytes] = []
    monkeypatch.setattr(
        "proxy.log.os.write", lambda fd, data: calls.append(bytes(data)) or len(data)
    )
    writer = LineWriter(io.TextIOWrapper(io.BytesIO()), gather=True)
    writer._fd = 99  # never written: os.write is the fake above

    async def turn(tag: str, long: bool = False) -> None:
        writer.msg(f"{tag}-short")
        if long:
            writer.msg(tag + "-" + "L" * 5000)

    asyncio.run(turn("a", long=True))
    assert calls == [b"a-short\n", b"a-" + b"L" * 5000 + b"\n"]
    calls.clear()
    loop = asyncio.new_event_loop()
    loop.call_soon(lambda: (writer.msg("b-short"), loop.stop()))
    loop.run_forever()  # its flush never runs
    loop.close()
    asyncio.run(turn("c"))  # another loop: the ended one's line first
    assert calls == [b"b-short\n", b"c-short\n"]
    calls.clear()
    loop = asyncio.new_event_loop()
    loop.call_soon(lambda: (writer.msg("d-short"), loop.stop()))
    loop.run_forever()
    loop.close()
    writer.msg("e-no-loop")
    assert calls == [b"d-short\n", b"e-no-loop\n"]


def test_reconfiguring_writes_what_the_last_writer_gathered() -> None:
    read, write = os.pipe()
    os.set_blocking(read, False)
    try:
        with os.fdopen(write, "w", closefd=False) as stream:
            configure_logging("info", stream, gather=True)
            loop = asyncio.new_event_loop()

            def last() -> None:
                get_logger("t").info("before reload")
                configure_logging("info", io.StringIO())  # a reload: the old writer flushes
                loop.stop()

            loop.call_soon(last)
            loop.run_forever()
            loop.close()
            assert json.loads(_read_some(read))["event"] == "before reload"
    finally:
        configure_logging("info", io.StringIO())
        os.close(read)
        os.close(write)


def test_log_time_keeps_the_fraction_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.log import AccessLog

    log = AccessLog(LineWriter(io.StringIO()), {})
    for now, text in ((1.000012, "1970-01-01T00:00:01.000012Z"), (2.5, "1970-01-01T00:00:02.500000Z"),
                      (3.0, "1970-01-01T00:00:03Z")):  # fmt: skip
        monkeypatch.setattr("proxy.log.time.time", lambda now=now: now)
        assert log._ts() == text


def test_flush_logs_writes_what_a_stopped_loop_gathered() -> None:
    """A line gathered in a turn the loop never finishes (the process
    stops) is written by flush_logs (at stop and at exit)."""
    from proxy.log import flush_logs

    read, write = os.pipe()
    os.set_blocking(read, False)
    try:
        with os.fdopen(write, "w", closefd=False) as stream:
            configure_logging("info", stream, gather=True)
            loop = asyncio.new_event_loop()

            def last() -> None:
                get_logger("t").info("last words")
                loop.stop()  # this turn is the loop's last: the flush queued is never run

            loop.call_soon(last)
            loop.run_forever()
            loop.close()
            assert _read_some(read) == b""
            flush_logs()
            assert json.loads(_read_some(read))["event"] == "last words"
    finally:
        configure_logging("info", io.StringIO())
        os.close(read)
        os.close(write)


def _read_some(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""


def _fields() -> dict[str, object]:
    return {"request_id": "r1", "route": "partner", "status": 200, "duration_ms": 1.5,
            "replayed": False, "path": None, "authorization": "Bearer tok-9"}  # fmt: skip


@pytest.mark.parametrize("worker", [None, "3"])
def test_the_fast_access_line_is_structlogs_line(
    monkeypatch: pytest.MonkeyPatch, worker: str | None
) -> None:
    """The access log skips structlog's processor chain (issue 16): its
    line is the one structlog writes, key for key and in order, redaction
    and a worker's fields included; only the time differs."""
    if worker is not None:
        monkeypatch.setenv("AUTHPROXY_WORKER_ID", worker)
    stream = io.StringIO()
    configure_logging("info", stream)
    access(_fields())
    get_logger("proxy.access").info("access", **_fields())
    fast, slow = (json.loads(line) for line in stream.getvalue().splitlines())
    assert list(fast) == list(slow)
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?Z")
    assert stamp.fullmatch(fast.pop("ts")) and stamp.fullmatch(slow.pop("ts"))
    assert fast == slow
    assert fast["authorization"] == "[redacted]" and "tok-9" not in stream.getvalue()


_TEXT = st.text(max_size=40)  # any code point: quotes, controls, non-ASCII, surrogates


@settings(max_examples=300, deadline=None)
@given(
    request_id=_TEXT,
    route=st.none() | _TEXT,
    method=_TEXT,
    path=_TEXT,
    status=st.integers(100, 599),
    upstream_status=st.none() | st.integers(100, 599),
    duration_ms=st.floats(min_value=0, max_value=1e17, allow_nan=False, allow_infinity=False),
    replayed=st.booleans(),
    waited=st.booleans(),
    client=_TEXT,
    worker=st.sampled_from([None, "0", "7"]),
)
def test_the_common_access_line_is_the_general_line(
    request_id: str,
    route: str | None,
    method: str,
    path: str,
    status: int,
    upstream_status: int | None,
    duration_ms: float,
    replayed: bool,
    waited: bool,
    client: str,
    worker: str | None,
) -> None:
    """AccessLog.write_common (the usual request's line from one format
    string, issue 16) writes what AccessLog.write writes for the same facts,
    character for character but the time."""
    os.environ.pop("AUTHPROXY_WORKER_ID", None)
    if worker is not None:
        os.environ["AUTHPROXY_WORKER_ID"] = worker
    try:
        stream = io.StringIO()
        configure_logging("info", stream)
        log = common_access()
        assert log is not None
        facts = {"request_id": request_id, "route": route, "method": method, "path": path,
                 "status": status, "upstream_status": upstream_status,
                 "duration_ms": duration_ms, "replayed": replayed,
                 "waited_for_mint": waited, "client": client}  # fmt: skip
        log.write(dict(facts))
        log.write_common(request_id, route, method, path, status, upstream_status,
                         duration_ms, replayed, waited, client)  # fmt: skip
    finally:
        os.environ.pop("AUTHPROXY_WORKER_ID", None)
    general, common = stream.getvalue().splitlines()
    stamp = re.compile(r'"ts": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?Z"}$')
    assert stamp.search(general) and stamp.search(common)
    assert stamp.sub("", common) == stamp.sub("", general)


def test_the_access_log_follows_the_level_and_format() -> None:
    stream = io.StringIO()
    configure_logging("warning", stream)
    access(_fields())
    assert stream.getvalue() == ""  # an info line, below the level
    configure_logging("info", stream, log_format="console")
    access(_fields())
    text = stream.getvalue()
    assert "access" in text and not text.lstrip().startswith("{") and "tok-9" not in text


def test_library_records_are_json_lines_without_the_exception_text() -> None:
    """Round 11 (N2): aiohttp's "Error handling request" went to Python's
    last-resort handler, a plain-text traceback quoting the refused line (an
    Authorization value). A library's record is one JSON line; its exception
    is named by type and place, never by its message."""
    stream = io.StringIO()
    configure_logging("info", stream)
    refused = "Authorization: Bearer " + "lib-secret-55"
    try:
        raise ValueError(refused)  # the traceback's source line is code, not data
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "10.0.0.9")
    logging.getLogger("asyncio").info("chatter below WARNING stays out")
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["event"] == "Error handling request from 10.0.0.9"
    assert line["logger"] == "aiohttp.server" and line["error"] == "ValueError"
    assert "test_log.py" in line["where"]
    assert "lib-secret-55" not in stream.getvalue()


def test_asyncio_records_never_carry_exception_text_or_callback_arguments() -> None:
    """Review of round 11's bridge: asyncio's own messages hold the
    exception's repr ("Task exception was never retrieved ... exception=
    ValueError('...')") and a callback's arguments."""
    stream = io.StringIO()
    configure_logging("info", stream)
    secret = "Authorization: Bearer " + "sekrit-123"

    async def fails() -> None:
        raise ValueError(secret)

    def callback(data: bytes) -> None:
        raise ValueError("boom")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(fails())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        del task  # never retrieved: asyncio logs it when the task is collected
        gc.collect()
        loop.call_soon(callback, secret.encode())
        await asyncio.sleep(0.01)

    asyncio.run(main())
    lines = [json.loads(text) for text in stream.getvalue().splitlines()]
    events = {line["event"] for line in lines if line.get("logger") == "asyncio"}
    assert "Task exception was never retrieved" in events, lines
    assert any(e.startswith("Exception in callback") for e in events), events
    assert "sekrit-123" not in stream.getvalue()
