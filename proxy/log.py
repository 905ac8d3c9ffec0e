"""Structured logging: structlog, one JSON object a line.

Secrets are kept out by construction (nothing logs a token, a secret or an
Authorization value) and, as a second line of defence, :func:`redact_secrets`
drops any field whose name says it holds one. Tracebacks are rendered as plain
text without local variables: structlog's rich/dict tracebacks can print
locals, and locals hold tokens.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import re
import select
import sys
import time
import traceback
from collections.abc import Callable, MutableMapping
from typing import Any, Final, TextIO

import structlog

from proxy.compiled import mypyc_attr

PIPE_BUF: Final = getattr(select, "PIPE_BUF", 512)  # one write this size is atomic on a pipe
SECRET_FIELDS: Final = frozenset(
    {"authorization", "access_token", "token", "client_secret", "secret", "password"}
)
REDACTED: Final = "[redacted]"


def redact_secrets(
    _logger: object, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in event_dict.keys() & SECRET_FIELDS:
        event_dict[key] = REDACTED
    return event_dict


def _add_worker(fields: dict[str, Any]) -> Any:
    def add(
        _logger: object, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict.update(fields)
        return event_dict

    return add


class LineWriter:
    """Writes rendered lines to the stream, whole lines in each ``write(2)``.

    Several workers share one stderr pipe; a line written in two calls (as
    ``print`` does) can interleave with another worker's. One write of up to
    PIPE_BUF bytes is atomic on a pipe. With ``gather`` (the server's
    writer), inside a running event loop the
    lines of one loop iteration are gathered and written together, up to
    PIPE_BUF bytes a write (one system call for many access lines under
    load, issue 16); a line waits at most until the loop's next turn, and
    :meth:`flush` (at stop and at exit) writes what is gathered. A line
    longer than PIPE_BUF goes alone, in one write that a pipe does not keep
    whole against another writer's. Gathering assumes one thread runs an
    event loop (the server's); a thread without a loop writes at once.
    """

    def __init__(self, stream: TextIO, gather: bool = False) -> None:
        self._stream = stream
        self._gather = gather
        try:
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.StringIO in tests
            self._fd = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._flush_at: asyncio.AbstractEventLoop | None = None  # the loop a flush is due on

    def msg(self, message: str) -> None:
        if self._fd is None:
            self._stream.write(message + "\n")
            return
        data = (message + "\n").encode("utf-8", "replace")
        if not self._gather:
            self._write(data)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop here (start-up, the CLI, another thread): now
            due = self._flush_at
            if due is not None and not due.is_running():  # an ended loop's lines go first
                self.flush()
            self._write(data)
            return
        size = len(data)
        if self._pending_size + size > PIPE_BUF:
            self._drain()  # (the flush due stays due: it writes what comes next)
        if size > PIPE_BUF:  # alone, in as many writes as it takes
            self._write(data)
            return
        if self._flush_at is not loop:
            if self._flush_at is not None:  # a loop that ended before its flush ran
                self.flush()
            loop.call_soon(self.flush)
            self._flush_at = loop
        self._pending.append(data)
        self._pending_size += size

    def flush(self) -> None:
        """Write the gathered lines now (one write: they fit in PIPE_BUF)."""
        self._flush_at = None
        self._drain()

    def _drain(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        self._write(data)

    def _write(self, data: bytes) -> None:
        fd = self._fd
        assert fd is not None
        while data:
            try:
                written = os.write(fd, data)
            except BlockingIOError:
                continue
            except OSError:
                return  # nowhere to log to (stderr closed): never fail a request for it
            data = data[written:]

    # structlog calls the method named by the level; each writes the line
    # (explicit methods: mypyc compiles no aliases in a class body).
    def debug(self, message: str) -> None:
        self.msg(message)

    def info(self, message: str) -> None:
        self.msg(message)

    def warning(self, message: str) -> None:
        self.msg(message)

    def warn(self, message: str) -> None:
        self.msg(message)

    def error(self, message: str) -> None:
        self.msg(message)

    def critical(self, message: str) -> None:
        self.msg(message)

    def exception(self, message: str) -> None:
        self.msg(message)


class AccessLog:
    """The access log's JSON line, rendered without structlog's processor
    chain (about 32 µs a line there, a third of a proxied request; issue
    16): the object structlog would write for ``log.info("access", ...)``
    — the fields, ``event``, the worker's fields, ``level``, ``ts`` — with
    the same redaction, through the same :class:`LineWriter`, one write a
    line."""

    def __init__(self, writer: LineWriter, extra: dict[str, Any]) -> None:
        self._writer = writer
        self._extra = extra
        self._extra_json: str | None = None  # the worker's fields as JSON, made once
        self._second = -1
        self._prefix = ""

    def _ts(self) -> str:
        # The fraction rounded to the microsecond, as datetime (structlog's)
        # rounds it: int() of it read 1.000012 as .000011.
        now = time.time()
        second = int(now)
        micro = round((now - second) * 1e6)
        if micro >= 1_000_000:
            second, micro = second + 1, micro - 1_000_000
        if second != self._second:  # the date and time, formatted once a second
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        # datetime.isoformat, which structlog uses, leaves out a zero fraction
        if not micro:
            return self._prefix + "Z"
        return self._prefix + "." + str(1_000_000 + micro)[1:] + "Z"  # six digits, zeros kept

    def write_common(
        self,
        request_id: str,
        route: str | None,
        method: str,
        path: str,
        status: int,
        upstream_status: int | None,
        duration_ms: float,
        replayed: bool,
        waited_for_mint: bool,
        client: str,
    ) -> None:
        """The line :meth:`write` makes for the usual request's fields (an
        origin-form target, ``client`` the only extra fact), character for
        character, from one format string instead of a dict and the JSON
        encoder (32,000 instructions a line there, issue 16). None of these
        keys is a secret one; every string is escaped as ``json.dumps`` does.
        tests/test_log.py holds the two to the same output."""
        esc = _ESCAPE
        if self._extra and self._extra_json is None:
            self._extra_json = "".join(f", {esc(k)}: {_ENCODE(v)}" for k, v in self._extra.items())
        # Every piece a str and no conversion (!r) in the f-string: compiled,
        # it is one join; otherwise each field goes through str.format.
        rt = "null" if route is None else esc(route)
        up = "null" if upstream_status is None else str(int(upstream_status))
        code = str(int(status))
        took = repr(float(duration_ms))
        again = "true" if replayed else "false"
        waited = "true" if waited_for_mint else "false"
        extra = self._extra_json or ""
        self._writer.msg(
            f'{{"request_id": {esc(request_id)}, "route": {rt}, '
            f'"method": {esc(method)}, "path": {esc(path)}, "status": {code}, '
            f'"upstream_status": {up}, "duration_ms": {took}, '
            f'"replayed": {again}, "waited_for_mint": {waited}, '
            f'"client": {esc(client)}, "event": "access"{extra}, '
            f'"level": "info", "ts": "{self._ts()}"}}'
        )

    def write(self, fields: dict[str, Any]) -> None:
        for key in fields.keys() & SECRET_FIELDS:
            fields[key] = REDACTED
        fields["event"] = "access"
        if self._extra:
            fields.update(self._extra)
        fields["level"] = "info"
        fields["ts"] = self._ts()
        self._writer.msg(_ENCODE(fields))


def _encoder() -> Callable[[Any], str]:
    """``json.dumps(obj, default=repr)`` for the access line, the C encoder
    made once: ``JSONEncoder.encode`` makes one per call (half its 4 µs)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python without the _json accelerator
        return json.JSONEncoder(default=repr).encode
    encode = make(
        None, repr, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )
    return lambda fields: "".join(encode(fields, 0))


# Typed as functions of str: a compiled f-string joins a str directly, but
# formats an Any through format() (1,500 instructions a field, issue 16).
_ENCODE: Final[Callable[[Any], str]] = _encoder()
_ESCAPE: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii  # as json.dumps does
_access: AccessLog | None = None  # set by configure_logging for JSON at info or below
_access_fallback: Any = structlog.get_logger("proxy.access")  # until configure_logging runs


def access(fields: dict[str, Any]) -> None:
    """One access log line of ``fields`` (the dict is the callee's)."""
    if _access is not None:
        _access.write(fields)
    elif _access_fallback is not None:
        _access_fallback.info("access", **fields)


def common_access() -> AccessLog | None:
    """The access log for :meth:`AccessLog.write_common`, when lines are
    JSON (None: build the fields and call :func:`access`)."""
    return _access


_writer: LineWriter | None = None  # the configured one


def flush_logs() -> None:
    """Write the lines the configured writer has gathered (at stop, at exit)."""
    if _writer is not None:
        _writer.flush()


atexit.register(flush_logs)


def configure_logging(
    level: str = "info",
    stream: TextIO | None = None,
    log_format: str = "json",
    gather: bool = False,
) -> None:
    """Route structlog to ``stream`` (stderr by default): JSON lines for
    machines, or structlog's console renderer for a person at a terminal.

    ``gather``: lines written in one event-loop turn go out in one write
    (:class:`LineWriter`; the server's choice, where lines are many and
    nothing else writes to the stream between them). Safe to call again
    (tests and reloads do); the last call wins.
    """
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    out = stream or sys.stderr
    renderer: Any
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(
            colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    else:
        renderer = structlog.processors.JSONRenderer()
    processors: list[Any] = [structlog.contextvars.merge_contextvars]
    worker = os.environ.get("AUTHPROXY_WORKER_ID")
    extra: dict[str, Any] = {}
    if worker is not None:  # one of several workers: say which
        extra = {"worker": int(worker), "pid": os.getpid()}
        processors.append(_add_worker(extra))
    processors += [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        redact_secrets,
    ]
    if log_format != "console":
        processors.append(structlog.processors.format_exc_info)
    processors.append(renderer)
    global _writer
    if _writer is not None:  # the lines the last configuration gathered
        _writer.flush()
    writer = _writer = LineWriter(out, gather)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=False,
    )
    _bridge_libraries(numeric)
    global _access, _access_fallback
    # Nothing binds context variables for an access line (merge_contextvars
    # adds none), so the fast line is structlog's line; the console format
    # stays structlog's.
    fast = log_format != "console" and numeric <= logging.INFO
    _access = AccessLog(writer, extra) if fast else None
    _access_fallback = None if fast else get_logger("proxy.access")  # filtered by level there


_LEVELS: Final = frozenset({"debug", "info", "warning", "error", "critical"})


@mypyc_attr(native_class=False)  # a logging.Handler: a Python class when compiled
class LibraryLogBridge(logging.Handler):
    """Libraries' records (aiohttp, asyncio: the stdlib ``logging`` tree) as
    this process's lines: one JSON object each, never Python's bare
    "last resort" text. A library's words can quote what it handled (the
    bytes a parser refused, an exception's text, a callback's arguments in
    asyncio's "Exception in callback cb(...)"): the line keeps the first
    line of the message up to the first quote, bracket or "=", and names an
    exception by its type and where it was raised, never by its text."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                fields["error"] = type(exc).__name__
                fields["where"] = "".join(traceback.format_tb(exc.__traceback__)[-3:]).strip()
            method = record.levelname.lower()
            if method not in _LEVELS:
                method = "error"
            getattr(structlog.get_logger("library"), method)(_summary(record), **fields)
        except Exception:  # a log line must never raise into the code that logs
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """Nothing: logging's default prints the record, arguments and all."""


_QUOTING: Final = re.compile(r"[(\[{<'\"=]")


def _summary(record: logging.LogRecord) -> str:
    try:
        text = record.getMessage()
    except Exception:  # bad %-arguments: the template is still worth a line
        text = str(record.msg)
    first = text.split("\n", 1)[0]
    found = _QUOTING.search(first)
    return (first[: found.start()] if found else first).strip()[:200] or record.name


def _bridge_libraries(level: int) -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, LibraryLogBridge)]:
        root.removeHandler(handler)
    bridge = LibraryLogBridge(level=max(level, logging.WARNING))  # libraries' chatter is not ours
    root.addHandler(bridge)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
