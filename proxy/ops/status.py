"""The admin port's status page (``GET /``), for people who would rather look
than read: a pure renderer from plain data (:class:`Status`) to one HTML page.

The page has a little inline CSS, refreshes itself every
:data:`REFRESH_SECONDS`, loads nothing from anywhere (no script, no image, no
font, no link) and shows no secret: it renders only the fields of
:class:`Status` below, every value escaped, URLs with their user-info
removed. Keys it does not know are ignored, and a missing one renders as "-",
so an incomplete report is a page with gaps, never an error.

Rates are what the counters allow without history: totals since the process
started, divided by its uptime.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from typing import Any, Final, TypedDict
from urllib.parse import urlsplit, urlunsplit

REFRESH_SECONDS: Final = 5
# A Content-Security-Policy that lets the page load nothing but its own inline CSS.
CSP: Final = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


class RouteStatus(TypedDict):
    name: str
    client: str
    upstream: str  # the route's upstream URL (user-info is removed when shown)
    requests: int  # answered since this process started, every status
    errors: int  # ... of which the app got a 5xx
    replays: int  # expired-token 401s replayed with a fresh token


class TokenStatus(TypedDict):
    """One (client, scope) source."""

    scope: str | None
    cached: bool  # a valid token is in hand
    expires_in_s: float | None  # usable life left (None: no token)
    lifetime_s: float | None  # usable life it had when minted: expires_at - minted_at
    minted_at: str | None  # ISO 8601 (proxy.tokens.token.iso_time)
    last_mint_outcome: str | None  # "success", "error", or None before the first mint
    last_error: str | None  # the last mint error (TokenError.message), None after a success
    rotation_pending: bool  # new credentials not minted yet; the previous token serves


class ClientStatus(TypedDict):
    name: str
    circuit: str  # "closed", "half_open" or "open" (MintGuard.describe(now)["state"])
    circuit_reason: str | None  # MintGuard.describe(now).get("reason")
    circuit_open_for_s: float | None  # MintGuard.describe(now).get("open_for_s")
    tokens: list[TokenStatus]


class WorkerStatus(TypedDict):
    name: str  # "main", or the supervisor's worker number as a string
    pid: int
    this: bool  # the process answering this page


class CacheStatus(TypedDict):
    backend: str  # "memory", "file" (several workers on one host) or "redis"
    url: str | None  # redis URL; its password is never shown
    up: bool  # the shared cache answers (always True for memory)


class ConfigStatus(TypedDict):
    source: str  # the config file's path
    stamp: str  # what identifies its content, e.g. the first 12 hex digits of its sha256
    loaded_at: str | None  # ISO 8601: when the running config was read
    last_reload_at: str | None  # ISO 8601 of the last reload attempt, None: none yet
    last_reload_outcome: str | None  # "success" or "error"


class Status(TypedDict):
    """What ``Operated.status()`` returns (as a plain dict)."""

    version: str  # importlib.metadata.version("authproxy")
    generated_at: str  # ISO 8601, now
    uptime_s: float  # seconds since this process started
    ready: bool
    ready_reason: str | None  # ready_reason()
    routes: list[RouteStatus]
    clients: list[ClientStatus]
    workers_configured: int
    workers: list[WorkerStatus]  # the ones this process knows of (at least itself)
    cache: CacheStatus
    config: ConfigStatus


def render_status(data: Mapping[str, Any]) -> str:
    """The status page for ``data`` (shaped as :class:`Status`)."""
    uptime = _number(data.get("uptime_s")) or 0.0
    ready = data.get("ready") is True
    ready_text = "ready" if ready else f"not ready: {data.get('ready_reason') or 'unknown'}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>authproxy {_e(data.get('version'))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header>",
        f"<h1>authproxy <small>{_e(data.get('version'))}</small></h1>",
        f'<p><span class="pill {"ok" if ready else "bad"}" id="ready">{_e(ready_text)}</span>'
        f" up {_e(_duration(uptime))} &middot; generated {_e(data.get('generated_at'))}"
        f" &middot; refreshes every {REFRESH_SECONDS} s</p>",
        "</header>",
        _routes(_rows(data.get("routes")), uptime),
        _clients(_rows(data.get("clients"))),
        _workers(data),
        _config(_mapping(data.get("config")), _mapping(data.get("cache"))),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------ sections


def _routes(routes: list[Mapping[str, Any]], uptime: float) -> str:
    rows = []
    for route in routes:
        requests = _count(route.get("requests"))
        errors = _count(route.get("errors"))
        share = f"{100 * errors / requests:.1f} %" if requests else "-"
        rows.append(
            "<tr>"
            f'<td class="name">{_e(route.get("name"))}</td>'
            f"<td>{_e(route.get('client'))}</td>"
            f'<td class="url">{_e(_safe_url(route.get("upstream")))}</td>'
            f'<td class="n">{requests}</td><td class="n">{_rate(requests, uptime)}</td>'
            f'<td class="n">{errors}</td><td class="n">{_rate(errors, uptime)}</td>'
            f'<td class="n">{_e(share)}</td>'
            f'<td class="n">{_count(route.get("replays"))}</td>'
            "</tr>"
        )
    return _section(
        "Routes",
        "routes",
        [
            "route",
            "client",
            "upstream",
            "#requests",
            "#req/s",
            "#errors (5xx)",
            "#err/s",
            "#error share",
            "#replays",
        ],
        rows,
        "no routes",
    )


def _clients(clients: list[Mapping[str, Any]]) -> str:
    rows = []
    for client in clients:
        circuit = str(client.get("circuit") or "unknown")
        detail = []
        if _number(client.get("circuit_open_for_s")) is not None:
            detail.append(f"for {_duration(_number(client.get('circuit_open_for_s')) or 0.0)}")
        if client.get("circuit_reason"):
            detail.append(str(client["circuit_reason"]))
        circuit_cell = (
            f'<span class="pill circuit-{_e(circuit)}">{_e(circuit.replace("_", "-"))}</span>'
            + (f' <span class="muted">{_e(" · ".join(detail))}</span>' if detail else "")
        )
        tokens = _rows(client.get("tokens")) or [{}]
        for i, token in enumerate(tokens):
            first = i == 0
            span = f' rowspan="{len(tokens)}"' if first and len(tokens) > 1 else ""
            head = (
                f'<td class="name"{span}>{_e(client.get("name"))}</td><td{span}>{circuit_cell}</td>'
                if first
                else ""
            )
            rows.append(f'<tr class="client">{head}{_token_cells(token)}</tr>')
    return _section(
        "Clients",
        "clients",
        ["client", "circuit", "scope", "token life left", "last mint", "outcome"],
        rows,
        "no clients",
    )


def _token_cells(token: Mapping[str, Any]) -> str:
    if not token:
        return '<td colspan="4" class="muted">no token source yet</td>'
    left = _number(token.get("expires_in_s"))
    life = _number(token.get("lifetime_s"))
    cached = token.get("cached") is True and left is not None
    if cached and life and life > 0:
        pct = max(0.0, min(100.0, 100.0 * (left or 0.0) / life))
        width = f"{round(pct, 1):g}%"
        level = "low" if pct < 20 else "mid" if pct < 50 else "high"
        label = f"{_duration(left or 0.0)} of {_duration(life)}"
    else:
        width, level = "0%", "none"
        label = f"{_duration(left)} left" if cached and left is not None else "no token"
    bar = (
        f'<div class="bar" title="{_e(label)}">'
        f'<div class="fill {level}" style="width:{width}"></div></div>'
        f'<span class="muted">{_e(label)}</span>'
    )
    outcome = token.get("last_mint_outcome")
    outcome_text = str(outcome) if outcome else "no mint yet"
    klass = "ok" if outcome == "success" else "bad" if outcome == "error" else "muted"
    outcome_cell = f'<span class="pill {klass}">{_e(outcome_text)}</span>'
    if token.get("last_error"):
        outcome_cell += f' <span class="err">{_e(token["last_error"])}</span>'
    if token.get("rotation_pending"):
        outcome_cell += ' <span class="pill warn">rotation pending</span>'
    return (
        f"<td>{_e(token.get('scope') or '(none)')}</td>"
        f'<td class="life">{bar}</td>'
        f'<td class="t">{_e(token.get("minted_at") or "-")}</td>'
        f"<td>{outcome_cell}</td>"
    )


def _workers(data: Mapping[str, Any]) -> str:
    rows = [
        "<tr>"
        f'<td class="name">{_e(worker.get("name"))}</td>'
        f'<td class="n">{_e(worker.get("pid"))}</td>'
        f"<td>{'this page' if worker.get('this') is True else ''}</td>"
        "</tr>"
        for worker in _rows(data.get("workers"))
    ]
    configured = data.get("workers_configured")
    title = f"Workers ({_e(configured)} configured)" if configured is not None else "Workers"
    return _section(title, "workers", ["worker", "#pid", ""], rows, "no workers reported")


def _config(config: Mapping[str, Any], cache: Mapping[str, Any]) -> str:
    up = cache.get("up")
    reload_at = config.get("last_reload_at")
    reload_text = (
        f"{_e(reload_at)} ({_e(config.get('last_reload_outcome') or '-')})"
        if reload_at
        else "none since start"
    )
    items = [
        ("config file", _e(config.get("source"))),
        ("stamp", f"<code>{_e(config.get('stamp'))}</code>"),
        ("loaded at", _e(config.get("loaded_at"))),
        ("last reload", reload_text),
        ("token cache", _e(cache.get("backend"))),
    ]
    if cache.get("url"):
        items.append(("cache url", _e(_safe_url(cache.get("url")))))
    if up is not None:
        state = "up" if up is True else "down (per-process fallback)"
        items.append(("cache state", f'<span class="pill {"ok" if up else "bad"}">{state}</span>'))
    body = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in items)
    return f'<section id="config"><h2>Configuration</h2><dl>{body}</dl></section>'


def _section(title: str, ident: str, heads: list[str], rows: list[str], empty: str) -> str:
    """A titled table; a head written "#name" heads a right-aligned column of numbers."""
    head = "".join(
        f'<th class="n">{_e(h[1:])}</th>' if h.startswith("#") else f"<th>{_e(h)}</th>"
        for h in heads
    )
    body = "".join(rows) or f'<tr><td colspan="{len(heads)}" class="muted">{_e(empty)}</td></tr>'
    return (
        f'<section id="{ident}"><h2>{title}</h2>'
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></section>"
    )


# ------------------------------------------------------------------- values


def _e(value: object) -> str:
    """Escaped text of any value; ``None`` is "-"."""
    return html.escape("-" if value is None else str(value), quote=True)


def _safe_url(value: object) -> str:
    """A URL without its user-info (``redis://user:password@host`` -> ``redis://host``)."""
    if not isinstance(value, str):
        return "-"
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(unparsable URL)"
    if "@" not in parts.netloc:
        return value
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _rows(value: object) -> list[Mapping[str, Any]]:
    if not isinstance(value, Iterable) or isinstance(value, str | bytes | Mapping):
        return []
    return [item for item in value if isinstance(item, Mapping)]


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _count(value: object) -> int:
    number = _number(value)
    return int(number) if number is not None and number >= 0 else 0


def _rate(count: int, uptime: float) -> str:
    if uptime <= 0:
        return "-"
    rate = count / uptime
    return f"{rate:.2f}" if rate < 100 else f"{rate:.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    return f"{hours // 24}d {hours % 24}h"


_CSS: Final = """
:root{color-scheme:light;font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif}
body{margin:0 auto;padding:16px 24px;max-width:1400px;background:#f4f6f8;color:#1d2733}
h1{font-size:22px;margin:0 0 4px}h1 small{font-size:14px;color:#5b6b7c;font-weight:normal}
h2{font-size:16px;margin:20px 0 6px;color:#27435e}
header p{margin:0;color:#5b6b7c}
table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 2px #0002}
th,td{padding:6px 10px;border-bottom:1px solid #e3e8ee;text-align:left;vertical-align:middle}
th{background:#27435e;color:#fff;font-weight:600;font-size:12px;text-transform:uppercase}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
td.name{font-weight:600}td.life,td.t{white-space:nowrap}td.url{color:#5b6b7c;font-family:monospace;font-size:12px}
.bar{display:inline-block;vertical-align:middle;width:160px;height:12px;margin-right:8px;
background:#dfe5eb;border-radius:6px;overflow:hidden}
.fill{height:100%;border-radius:6px}.fill.high{background:#2e9e5b}
.fill.mid{background:#d9a400}.fill.low{background:#d3452f}.fill.none{background:none}
.pill{display:inline-block;padding:1px 8px;border-radius:9px;font-size:12px;font-weight:600;
background:#dfe5eb;color:#1d2733}
.pill.ok,.circuit-closed{background:#d4f1de;color:#17663a}
.pill.bad,.circuit-open{background:#fbdad4;color:#9b2514}
.pill.warn,.circuit-half_open{background:#fdf0c4;color:#7a5c00}
.muted{color:#7a8896;font-size:12px}.err{color:#9b2514;font-size:12px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;background:#fff;
padding:10px 14px;margin:0;box-shadow:0 1px 2px #0002}
dt{color:#5b6b7c}dd{margin:0}code{font-size:12px}
"""
