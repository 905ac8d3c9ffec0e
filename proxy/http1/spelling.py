"""aiohttp's Python request parser, keeping a method's spelling.

A module of its own, never compiled (setup.py): mypyc resolves the base
class ``HttpRequestParserPy`` through aiohttp's alias to the name
``HttpRequestParser``, which at run time is the C parser, so a compiled
subclass would parse with llhttp (issue 16).
"""

from __future__ import annotations

from aiohttp.http_parser import HttpRequestParserPy, RawRequestMessage


class SpellingParser(HttpRequestParserPy):
    """aiohttp's Python request parser, keeping a method's spelling. Both of
    aiohttp's parsers upper-case the method ("get" -> GET), but a method is
    case-sensitive (RFC 9110 §9.1): "get" is another one. The request line
    is whole here, wherever the TCP reads cut it or the message before it."""

    def parse_message(self, lines: list[bytes]) -> RawRequestMessage:
        message = super().parse_message(lines)
        spelled = lines[0].split(b" ", 1)[0].decode("ascii")  # a token: ASCII (checked)
        if spelled != message.method and spelled.upper() == message.method:
            message = message._replace(method=spelled)
        return message
