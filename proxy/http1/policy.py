"""The HTTP/1.1 rules this proxy applies on both of its sides (RFC 9110,
RFC 9112): what a request head may be, the status each refusal gets, how a
status line and a head are written, how a body is framed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, ClassVar, Final

from aiohttp import hdrs
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from proxy.config.model import InboundLimits
from proxy.errors import (
    BadRequest,
    HeaderTooLarge,
    NotImplementedByProxy,
    RequestFailed,
    UriTooLong,
    VersionNotSupported,
    malformed_reason,
)
from proxy.forwarding.headers import message_head, transfer_codings
from proxy.forwarding.seams import Body, Fields
from proxy.routing.router import valid_authority

# RFC 9110 §9.1: a method is any token. llhttp knows a fixed table of them;
# a request with another one is parsed by aiohttp's Python parser instead.
METHOD_START: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ ")
_HEADER_NAME: Final = re.compile(rb"(?:^|\n)([!#$%&'*+.^_`|~0-9A-Za-z-]{1,64})[ \t]*:[ \t]*$")
_REASONS: Final = {status.value: status.phrase for status in HTTPStatus}


class DateHeader:
    """The ``Date`` header value, formatted at most once a second."""

    second: ClassVar[int] = -1
    value: ClassVar[str] = ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.second = second
            cls.value = formatdate(second, usegmt=True)
        return cls.value


# RFC 9112 §4: reason-phrase = 1*( HTAB / SP / VCHAR / obs-text ); obs-text
# arrives surrogate-escaped from the parsers.
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def response_head(status: int, reason: str | None, headers: Sequence[tuple[str, str]]) -> bytes:
    """Status line and header block; a CR or LF in any header is refused. A
    reason phrase with a control byte is replaced by the status's own."""
    if reason is None or _CONTROL.search(reason):
        reason = _REASONS.get(status, "Unknown")
    return message_head(f"HTTP/1.1 {status} {reason}", headers)


def without_length(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """RFC 9110 §8.6: no Content-Length in a 1xx or 204 answer (it would
    frame a body that answer cannot have)."""
    return [(name, value) for name, value in headers if name.lower() != "content-length"]


def refusal_for(exc: HttpProcessingError, recent: bytes, limits: InboundLimits) -> RequestFailed:
    """The answer to a request the parser refused: the status the RFCs name
    for the fault (414, 431, 505, else 400) and a message that names a field
    and its size, never the bytes (an over-long ``Authorization`` is a secret).
    ``recent`` is the bytes read last, where a field's name is looked up."""
    if isinstance(exc, LineTooLong):
        seen = bytes(exc.args[0]) if exc.args else b""
        if _is_method(seen, recent):  # RFC 9112 §3: longer than any implemented: 501
            return NotImplementedByProxy(
                f"the request method is longer than {limits.max_header_size} bytes "
                "(inbound.max_header_size)"
            )
        if _in_request_line(seen, recent):
            return UriTooLong(
                f"the request line is longer than {limits.max_header_size} bytes "
                "(inbound.max_header_size)"
            )
        return HeaderTooLarge(
            f"header field {_field_name(seen, recent)} is longer than "
            f"{limits.max_header_size} bytes (inbound.max_header_size)"
        )
    text = str(getattr(exc, "message", "") or "")
    if "Too many headers" in text:
        return HeaderTooLarge(f"more than {limits.max_headers} header fields (inbound.max_headers)")
    if "Invalid HTTP version" in text or "PRI/Upgrade" in text:
        return VersionNotSupported("only HTTP/1.0 and HTTP/1.1 are served on this port")
    if type(exc).__name__ == "InvalidURLError":  # yarl's, quoting the whole target: never shown
        return BadRequest("malformed request: the request target is not a valid URL")
    reason = malformed_reason(exc)
    if "header value" in text:  # llhttp names the fault, not the field; find it (round 11)
        name = _field_with_bad_value(recent)
        if name is not None:
            reason = f"{reason} (field {name})"
    return BadRequest(reason)


_BAD_VALUE_BYTE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _field_with_bad_value(recent: bytes) -> str | None:
    """The name of the first field in ``recent`` whose value holds a control
    character (a NUL, a bare CR: RFC 9110 §5.5), when its name is a token."""
    for line in recent.split(b"\n")[1:]:
        name, colon, value = line.removesuffix(b"\r").partition(b":")
        if colon and _BAD_VALUE_BYTE.search(value) and _FIELD_NAMES.fullmatch(name):
            return repr(name.decode("ascii"))
    return None


def _is_method(seen: bytes, recent: bytes) -> bool:
    """Whether the over-long bytes are a request line's first word: they
    start the read's bytes, or follow a head that had no body, and hold no
    space (a target or a field would follow one)."""
    start = seen[:-3] if seen.endswith(b"...") else seen
    at = recent.find(start[:64]) if start else -1
    if at == -1 or b" " in start or b":" in start:
        return False
    return not recent[:at].strip(b"\r\n") or recent[:at].endswith(b"\r\n\r\n")


def _in_request_line(seen: bytes, recent: bytes) -> bool:
    """Whether the over-long bytes a parser reports (their first 100, then
    "...") are a request target: they follow ``METHOD SP`` at a line start."""
    start = seen[:-3] if seen.endswith(b"...") else seen
    at = recent.find(start[:64]) if start else -1
    if at == -1:
        return False
    line_start = recent.rfind(b"\n", 0, at) + 1
    if line_start == at:  # the Python parser reports the whole line, method first
        return METHOD_START.match(start) is not None
    return METHOD_START.fullmatch(recent[line_start:at]) is not None


def _field_name(seen: bytes, recent: bytes) -> str:
    """The name of the field whose (name or) value starts with ``seen``, when
    it can be found in ``recent``; a name is no secret, a value may be."""
    start = seen[:-3] if seen.endswith(b"...") else seen
    at = recent.find(start[:64]) if start else -1
    if at != -1:
        found = _HEADER_NAME.search(recent, max(0, at - 128), at)
        if found:
            return repr(found.group(1).decode("ascii"))
        if recent[at - 1 : at] in (b"\n", b""):
            return "(its name)"  # the name itself is over the limit
    return "(unnamed)"


MAX_CONTENT_LENGTH: Final = 2**63 - 1  # nginx's bound, and a signed 64-bit integer's


def framing_error(message: Any) -> RequestFailed | None:
    """What this hop refuses in a parsed request head, before any routing:
    RFC 9112 §2.3 versions, §3.2 Host, §6.1 transfer codings."""
    version = message.version
    if version[0] != 1:
        return VersionNotSupported(
            f"HTTP/{version[0]}.{version[1]} is not served on this port; speak HTTP/1.1"
        )
    headers = message.headers
    hosts = headers.getall(hdrs.HOST, ())
    if len(hosts) > 1 or (not hosts and version >= (1, 1)):
        # RFC 9112 §3.2: exactly one Host in HTTP/1.1; two are a smuggling attempt.
        return BadRequest(f"expected exactly one Host header, got {len(hosts)}")
    if hosts and not valid_authority(hosts[0]):
        # A Host that is no host[:port] would be copied into X-Forwarded-Host.
        return BadRequest("the Host header is not a host[:port] (RFC 9110 §7.2)")
    length = headers.get(hdrs.CONTENT_LENGTH)
    if length is not None and (not length.isdigit() or int(length) > MAX_CONTENT_LENGTH):
        # RFC 9110 §8.6: a numeral past 2^63-1 (what nginx accepts) is refused,
        # never copied: a partner that wraps it at 64 bits would read the
        # body's tail as a request of the app's making (issue 11, round 6).
        return BadRequest(f"Content-Length over {MAX_CONTENT_LENGTH} (RFC 9110 §8.6)")
    coding = headers.get(hdrs.TRANSFER_ENCODING)
    if coding is not None:
        if version < (1, 1):
            # RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
            return BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        codings = transfer_codings(headers.getall(hdrs.TRANSFER_ENCODING))
        if codings != ["chunked"]:
            others = ", ".join(c for c in codings if c != "chunked")
            return NotImplementedByProxy(
                f"transfer coding {others!r} is not implemented by the proxy "
                "(only chunked; RFC 9112 §6.1)"
            )
    return None


# RFC 9110 §8.6: methods that define a meaning for content get "Content-Length: 0"
# when they have none (some servers answer 411 otherwise); the rest go as the
# app sent them, without a framing field (as nginx does).
CONTENT_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})


def raw_fields(raw_headers: Sequence[tuple[bytes, bytes]]) -> Fields:
    """Header fields as the sender spelled them, in order, repeats kept. The
    parsers' ``headers`` multidict re-cases known names (``etag`` -> ``Etag``);
    its ``raw_headers`` keep the bytes, decoded here as the parsers decode
    values (UTF-8 with surrogate escapes, so obs-text goes back byte for byte)."""
    return [
        (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        for name, value in raw_headers
    ]


def request_head(
    method: str, target: str, headers: Sequence[tuple[str, str]], extra: str = ""
) -> bytes:
    """The request line and header block (``extra``: this hop's framing line);
    a CR or LF in the target or a header (a token endpoint's hostile "token",
    say) would split the head and is refused."""
    return message_head(f"{method} {target} HTTP/1.1", headers, extra)


def request_framing(
    method: str, headers: Sequence[tuple[str, str]], body: Body
) -> tuple[str, bool]:
    """The framing header to add, and whether the body goes chunked."""
    for name, _ in headers:
        if len(name) == 14 and name.lower() == "content-length":
            return "", False
    if body is None:
        return ("Content-Length: 0\r\n" if method in CONTENT_METHODS else ""), False
    if isinstance(body, bytes):
        return f"Content-Length: {len(body)}\r\n", False
    return "Transfer-Encoding: chunked\r\n", True


# Bytes read per socket read on both sides, and the queue a body may fill before
# reading pauses (aiohttp pauses past twice this): 64 KiB, as nginx's buffers.
READ_BUFFER: Final = 2**16

_FIELD_NAMES: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?::[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")
_LENGTH_LINE: Final = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)[ \t]*\r\n", re.IGNORECASE)
_CODING_LINE: Final = re.compile(rb"\r\ntransfer-encoding:", re.IGNORECASE)


def bad_field_name(raw_headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether a field name is not a token: ``Content-Length : 4`` (RFC 9112
    §5.1: a proxy MUST reject whitespace before the colon, or the next hop
    may frame the body differently) or a line that starts with whitespace
    (§2.2). llhttp lets both through in responses."""
    # One match over the names joined by ":", which no parsed name holds
    # (a name ends at its line's first colon).
    if not raw_headers:
        return False
    return _FIELD_NAMES.fullmatch(b":".join([name for name, _ in raw_headers])) is None


def starts_folded(data: bytes) -> bool:
    """Whether the line after the status line starts with whitespace (RFC
    9112 §2.2: reject, or ignore the line). llhttp strips the whitespace and
    keeps the field, which the next hop could read as part of the status line."""
    line_end = data.find(b"\n")
    return line_end != -1 and data[line_end + 1 : line_end + 2] in (b" ", b"\t")


def answer_end(data: bytes, head_only: bool) -> int | None:
    """Where the answer that starts ``data`` ends (after any 1xx before it),
    when its head is whole and its length is known from the head; ``None``
    otherwise (chunked, close-delimited, or not whole yet). A request is
    never pipelined upstream, so bytes after that point are no answer."""
    at = 0
    while data.startswith(b"HTTP/1.", at):
        end = data.find(b"\r\n\r\n", at)
        if end == -1:
            return None
        end += 4
        status = data[at + 9 : at + 12]
        if status[:1] == b"1" and status != b"101":
            at = end  # an interim answer; the final one follows
            continue
        if head_only or status in (b"204", b"304"):
            return end
        head = data[at:end]
        if _CODING_LINE.search(head):
            return _chunked_end(data, end)
        length = _LENGTH_LINE.search(head)
        return end + int(length.group(1)) if length else None
    return None


def _chunked_end(data: bytes, at: int) -> int | None:
    """Where a chunked body that starts at ``at`` ends (its last chunk and
    trailer section included), or ``None`` if it is not whole in ``data`` or
    does not parse (llhttp then says why)."""
    while True:
        line_end = data.find(b"\r\n", at)
        if line_end == -1:
            return None
        size_text = data[at:line_end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return None
        if size == 0:
            trailers_end = data.find(b"\r\n\r\n", line_end)
            if data.startswith(b"\r\n", line_end + 2):
                return line_end + 4  # no trailer fields
            return trailers_end + 4 if trailers_end != -1 else None
        at = line_end + 2 + size + 2
        if at > len(data):
            return None


# A quoted excerpt starts a line or follows a space ("line 'HTTP/1.1 x'",
# "b'...'"); an apostrophe inside a word ("can't") starts none.
_QUOTED: Final = re.compile(r"(?:^|\s+)b?'[^'\n]*'?")
_FIXED_FAULTS: Final = {
    "TransferEncodingError": "a malformed chunked body",
    "ContentLengthError": "a body shorter than its Content-Length",
    "ContentEncodingError": "a body its Content-Encoding does not decode",
    "LineTooLong": "a line longer than the parser's limit",
}


def partner_fault(exc: BaseException) -> str:
    """What was wrong with a partner's answer, for the app's 502 and the log:
    the parser's reason ("Bad status line: Invalid status code") without the
    bytes it quotes, which are the partner's and could echo a credential."""
    name = type(exc).__name__
    fixed = _FIXED_FAULTS.get(name)
    if fixed is not None:
        return f"{fixed} ({name})"
    text = str(getattr(exc, "message", "") or "")
    reason = []
    for line in text.splitlines():
        line = _QUOTED.sub("", line).strip().rstrip(":").strip()
        if not line:
            break  # llhttp's reason ends at a blank line; its excerpt follows
        reason.append(line)
    said = ": ".join(reason)
    too_long = re.match(r"Got more than (\d+) bytes when reading", said)
    if too_long:  # llhttp's words for a header line past max_field_size
        said = f"a header line over {too_long.group(1)} bytes"
    if not said or not re.fullmatch(r"[A-Za-z][A-Za-z0-9 ,.:()/'-]*", said):
        return name
    return f"{said} ({name})"
