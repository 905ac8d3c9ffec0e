"""Parsing of the duration and size notations used in proxy.yaml (pure)."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_SCALE = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}

_SHARE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_duration(value: object) -> float:
    """Seconds from ``30s``, ``5m``, ``250ms``, ``1h`` or a plain number of seconds.

    Raises ``ValueError`` with a human message for anything else, negatives included.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s, 5m or 250ms, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _DURATION_SCALE[match.group(2)]
    raise ValueError(f"expected a duration like 30s, 5m or 250ms, got {value!r}")


def parse_size(value: object) -> int:
    """Bytes from ``1MiB``, ``512KiB``, ``64KB`` or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 1MiB or 512KiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value!r}")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(match.group(1)) * _SIZE_SCALE[match.group(2)]
    raise ValueError(f"expected a size like 1MiB or 512KiB, got {value!r}")


def parse_share(value: object) -> float:
    """A share of a whole in [0, 1) from ``10%`` or a fraction such as ``0.1``."""
    share: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        share = float(value)
    elif isinstance(value, str):
        match = _SHARE.match(value)
        if match:
            share = float(match.group(1)) / 100.0
    if share is None or not 0.0 <= share < 1.0:
        raise ValueError(f"expected a share like 10% (0% to 99%), got {value!r}")
    return share


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2): JOSE values and thumbprints."""
    import base64

    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")
