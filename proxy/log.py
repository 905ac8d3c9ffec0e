"""Structured logging: structlog, one JSON object a line.

Secrets are kept out by construction (nothing logs a token, a secret or an
Authorization value) and, as a second line of defence, :func:`redact_secrets`
drops any field whose name says it holds one. Tracebacks are rendered as plain
text without local variables: structlog's rich/dict tracebacks can print
locals, and locals hold tokens.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Final, TextIO

import structlog

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


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Route structlog to ``stream`` (stderr by default) as JSON lines.

    Safe to call again (tests and reloads do); the last call wins.
    """
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            redact_secrets,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
