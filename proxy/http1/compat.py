"""The aiohttp internals the lean engine (and the admin port's handler) rely on,
checked once at start.

proxy/http1/listener.py and proxy/http1/upstream.py build on aiohttp's C parsers and
protocol classes rather than its public server and client (docs/design.md,
"One engine"). Those are private members, so aiohttp is pinned to the minor
versions the whole suite has passed on (pyproject.toml), and :func:`check`
stops the proxy at start, naming the aiohttp version and the member that is
missing, instead of failing on the first request. How to move the pin:
docs/design.md, "Moving the aiohttp pin".
"""

from __future__ import annotations

import re
from typing import Final

import aiohttp

from proxy.errors import ConfigError

# The versions the suite has passed on: [first, past-the-end).
TESTED: Final = ((3, 14, 5), (3, 15, 0))
# (module, attribute path) pairs the lean engine reads, overrides or calls.
REQUIRED: Final = (
    ("aiohttp.http_parser", "HttpRequestParserC"),
    ("aiohttp.http_parser", "HttpRequestParserPy"),
    ("aiohttp.http_parser", "HttpRequestParserPy.feed_data"),
    ("aiohttp.http", "HttpRequestParser.feed_data"),
    ("aiohttp.http", "HttpRequestParser.message_consumed"),
    ("aiohttp.http_exceptions", "BadHttpMethod"),
    ("aiohttp.http_exceptions", "LineTooLong"),
    ("aiohttp.web_protocol", "RequestPayloadError"),
    ("aiohttp.base_protocol", "BaseProtocol._drain_helper"),
    ("aiohttp.base_protocol", "BaseProtocol._pause_reading_for_buffer"),
    ("aiohttp.base_protocol", "BaseProtocol._resume_reading_for_buffer"),
    ("aiohttp.base_protocol", "BaseProtocol._pause_transport_reading"),
    ("aiohttp.base_protocol", "BaseProtocol._resume_transport_reading"),
    ("aiohttp.client_proto", "ResponseHandler.set_response_params"),
    ("aiohttp.client_proto", "ResponseHandler._reschedule_timeout"),
    ("aiohttp.client_proto", "ResponseHandler._drop_timeout"),
    ("aiohttp.client_proto", "ResponseHandler._on_read_timeout"),
    ("aiohttp.client_proto", "ResponseHandler.start_timeout"),
    ("aiohttp.client_proto", "ResponseHandler.read"),
    ("aiohttp.client_proto", "ResponseHandler.should_close"),
    ("aiohttp.client_proto", "ResponseHandler.force_close"),
    # The admin port's connection handler overrides this (proxy/ops/admin.py).
    ("aiohttp.web_protocol", "RequestHandler.handle_error"),
    ("aiohttp.web_protocol", "RequestHandler._make_error_handler"),  # parse errors reach it so
    ("aiohttp.web_server", "Server.connection_made"),  # the runner's server as its manager
)


def version_tuple(text: str) -> tuple[int, ...]:
    """``"3.14.5"`` -> ``(3, 14, 5)``; a pre-release tail ("5rc1") ends it."""
    parts = []
    for part in text.split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(part):
            break
    return tuple(parts)


def problems(version: str = aiohttp.__version__) -> list[str]:
    """What is wrong with the installed aiohttp for the lean engine; [] when fine."""
    found = []
    low, high = TESTED
    if not low <= version_tuple(version) < high:
        found.append(
            f"aiohttp {version} is installed; authproxy is tested with "
            f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
        )
    for module_name, path in REQUIRED:
        try:
            target: object = __import__(module_name, fromlist=["_"])
            for name in path.split("."):
                target = getattr(target, name)
        except (ImportError, AttributeError):
            found.append(f"aiohttp {version} has no {module_name}.{path}")
    from aiohttp.http import HttpRequestParser
    from aiohttp.http_parser import HttpRequestParserC

    if HttpRequestParser is not HttpRequestParserC:
        found.append(
            f"aiohttp {version} runs without its C parser (AIOHTTP_NO_EXTENSIONS or a "
            "build without extensions); the lean engine needs it"
        )
    return found


def check() -> None:
    """Raise ConfigError (the start fails with its message) when the installed
    aiohttp is not one the lean engine was tested with."""
    found = problems()
    if found:
        raise ConfigError(
            "; ".join(found) + ". Install the tested range (pip install 'aiohttp>=3.14.5,<3.15'); "
            "docs/design.md says how to move the pin."
        )
