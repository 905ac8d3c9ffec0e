"""proxy.yaml: parsed once, validated, and turned into frozen dataclasses.

This module is the only place that knows YAML exists. Every error it raises is a
:class:`~proxy.errors.ConfigError` whose message names the file, the line (when
YAML tells it) and the dotted key, e.g.
``proxy.yaml:14: routes[0].timeout: expected a duration like 30s, got 'soon'``.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import ssl
import stat
from collections.abc import Callable, Mapping
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import yaml
from yarl import URL

from proxy.config.keys import (
    KEY_ALGORITHMS,
    SECRET_ALGORITHMS,
    certificate_thumbprints,
    load_dpop_key,
    load_private_key,
)
from proxy.config.model import (
    AUTH_METHODS,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_EXPIRY_MARGIN,
    DEFAULT_FAILURE_COOLDOWN,
    DEFAULT_LEAF_LIFETIME,
    DEFAULT_LIFETIME,
    DEFAULT_LISTEN,
    DEFAULT_LOCK_TTL,
    DEFAULT_MINT_ATTEMPTS,
    DEFAULT_REFRESH_AHEAD,
    DEFAULT_REMINT_MIN_INTERVAL,
    DEFAULT_REPLAY_LIMIT,
    DEFAULT_ROUTE_TIMEOUT,
    DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_TOKEN_TIMEOUT,
    DEFAULT_TUNNEL_CONNECT_TIMEOUT,
    DEFAULT_TUNNEL_IDLE_TIMEOUT,
    DEFAULT_WATCH_INTERVAL,
    ENGINES,
    INTERCEPT_PORT,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_WORKERS,
    SECRET_METHODS,
    TLS_METHODS,
    TOKEN_REQUEST_FORMATS,
    AdminConfig,
    AuthMethod,
    CacheBackend,
    CacheConfig,
    ClientConfig,
    Config,
    DpopConfig,
    EgressConfig,
    Engine,
    ExpiredTokenRule,
    InboundAuth,
    InboundLimits,
    InterceptConfig,
    LogConfig,
    LogFormat,
    LogLevel,
    RouteConfig,
    SentinelTarget,
    TokenRequestFormat,
    TracingConfig,
    TunnelEntry,
)
from proxy.errors import ConfigError
from proxy.units import b64url, parse_duration, parse_share, parse_size

DEFAULT_CONFIG_PATH: Final = "proxy.yaml"
CONFIG_ENV_VAR: Final = "AUTHPROXY_CONFIG"

T = TypeVar("T")

# The keys of each section that has required ones, so that a misspelt key is
# reported (with a suggestion) before the key it was meant to be is missing.
# _Reader.raw asserts that every key a parser reads is declared here.
_TOP_KEYS: Final = frozenset(
    {"listen", "clients", "routes", "admin", "workers", "cache", "shutdown_grace",
     "watch_interval", "log", "access_log", "inbound", "engine", "egress", "tracing",
     "trust_forwarded_headers"}
)  # fmt: skip
_TLS_KEYS: Final = frozenset({"ca_file", "client_cert_file", "client_key_file"})
_CLIENT_KEYS: Final = _TLS_KEYS | frozenset(
    {"token_url", "client_id", "client_secret", "client_secret_file", "auth_method", "scope",
     "params", "expiry_margin", "refresh_ahead", "default_lifetime", "remint_min_interval",
     "timeout", "warm", "private_key_file", "certificate_file", "key_id", "algorithm",
     "assertion_audience", "token_headers", "token_request_format", "mint_attempts",
     "failure_cooldown", "dpop", "certificate_bound"}
)  # fmt: skip
_DPOP_KEYS: Final = frozenset({"key_file", "alg"})
_ROUTE_KEYS: Final = _TLS_KEYS | frozenset(
    {"name", "match", "upstream", "client", "scope", "timeout", "connect_timeout",
     "replay_limit", "expired_token", "token_header", "token_prefix", "max_body",
     "max_concurrent", "retry_idempotent", "allow_from", "inbound_auth"}
)  # fmt: skip
_MATCH_KEYS: Final = frozenset({"host", "path_prefix"})
_ADMIN_KEYS: Final = frozenset({"listen", "auth_token_file", "allow_unauthenticated"})
_INBOUND_AUTH_KEYS: Final = frozenset({"header", "keys_file"})
_EGRESS_KEYS: Final = frozenset(
    {"intercept", "tunnel", "tunnel_idle_timeout", "tunnel_connect_timeout"}
)
_INTERCEPT_KEYS: Final = frozenset({"ca_cert_file", "ca_key_file", "leaf_lifetime"})


class _LineMap(dict[str, Any]):
    """A YAML mapping that remembers the line of each of its keys (1-based)."""

    lines: dict[str, int]
    line: int


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineMap:
    loader.flatten_mapping(node)
    result = _LineMap()
    result.lines = {}
    result.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise ConfigError(
                f"{key_node.start_mark.line + 1}: keys must be text, got {_shown(key)}"
            )
        if key in result:
            raise ConfigError(f"{key_node.start_mark.line + 1}: duplicate key {key!r}")
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
    return result


_LineLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def expand_env(value: str, environ: Mapping[str, str]) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; ``$$`` is a literal ``$``.

    Raises ``KeyError(name)`` for an unset variable without a default.
    """

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise KeyError(name)

    return _ENV_REF.sub(substitute, value)


class _Reader:
    """Walks one mapping of the YAML tree, turning each value into a typed one."""

    def __init__(
        self,
        data: object,
        path: str,
        source: str,
        environ: Mapping[str, str],
        line: int = 0,
        known: frozenset[str] | None = None,
    ) -> None:
        self.source = source
        self.path = path
        self.environ = environ
        if not isinstance(data, dict):
            raise self._error(path, line, f"expected a mapping, got {_kind(data)}")
        self.data: dict[str, Any] = data
        self.lines: dict[str, int] = getattr(data, "lines", {})
        # the line of this mapping's key (a missing key's error points at
        # its parent), else where the mapping starts
        self.line: int = line or getattr(data, "line", 0)
        self.seen: set[str] = set()
        self.known = known
        if known is not None:  # unknown keys before missing or wrong ones
            unknown = [k for k in data if k not in known]
            if unknown:
                name = min(unknown, key=lambda k: self.lines.get(k, 0))
                raise self._unknown(name, sorted(known))

    def _error(self, key: str, line: int, message: str) -> ConfigError:
        where = f"{self.source}:{line}" if line else self.source
        return ConfigError(f"{where}: {key}: {message}")

    def warning(self, key: str, message: str) -> str:
        """A message for something allowed but unwise, in the errors' format."""
        return str(self._error(self.key_path(key), self.lines.get(key, self.line), message))

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> ConfigError:
        if message.startswith("is required") and key not in self.data and self.known is None:
            typo = self._typo_of(key)
            if typo is not None:  # unknown keys before missing ones: name the typo
                key, message = typo, f"unknown key (did you mean {key!r}?)"
        return self._error(self.key_path(key), self.lines.get(key, self.line), message)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str) -> object:
        assert self.known is None or key in self.known, f"{self.key_path(key)} is not declared"
        self.seen.add(key)
        return self.data.get(key)

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.raw(key)
        if value is None:
            if required:
                raise self.error(key, "is required")
            return default
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(key, f"expected text, got {_kind(value)}")
        try:
            return expand_env(str(value), self.environ)
        except KeyError as exc:
            raise self.error(
                key, f"environment variable {exc.args[0]} is not set (use ${{VAR:-default}})"
            ) from None

    def convert(self, key: str, parse: Callable[[object], T], default: T) -> T:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, str):
            value = self.string(key)
        try:
            return parse(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_shown(value)}")
        return value

    def child(self, key: str, known: frozenset[str] | None = None, *, what: str = "") -> _Reader:
        """The mapping under ``key``. Missing or empty, the error points at
        the line of the key, or of this mapping when the key is absent."""
        value = self.raw(key)
        if value is None:
            missing = key not in self.data
            if missing and (typo := self._typo_of(key)) is not None:
                raise self._unknown(typo, [key])
            if missing:
                raise self.error(key, f"is required{what and f' ({what})'}")
            raise self.error(key, f"is empty{what and f'; {what}'}")
        return _Reader(
            value,
            self.key_path(key),
            self.source,
            self.environ,
            self.lines.get(key, self.line),
            known,
        )

    def _unknown(self, name: str, known: list[str]) -> ConfigError:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return self.error(name, f"unknown key{hint}")

    def _typo_of(self, key: str) -> str | None:
        """An unread key of this mapping that looks like a misspelt ``key``."""
        unread = [
            k
            for k in self.data
            if k not in self.seen and isinstance(k, str) and k not in (self.known or ())
        ]
        close = difflib.get_close_matches(key, unread, n=1, cutoff=0.75)
        return close[0] if close else None

    def finish(self, known: tuple[str, ...] = ()) -> None:
        unknown = sorted(set(self.data) - self.seen, key=lambda k: self.lines.get(k, 0))
        if unknown:
            raise self._unknown(str(unknown[0]), sorted(self.seen | set(known)))


def _shown(value: object) -> str:
    """A value for a message: text quoted, a number as it is, anything else
    in plain words ("a mapping", "a list")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (int, float)):
        return str(value)
    return _kind(value)


def _kind(value: object) -> str:
    """What a YAML value is, in plain words (never a Python type name)."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, (int, float)):
        return "a number"
    return "text"


def _parse_listen(value: object) -> tuple[str, int]:
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ValueError(f"expected host:port like 127.0.0.1:8080, got {_shown(value)}")
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port like 127.0.0.1:8080, got {text!r}")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - ":8080" asks for every interface
    return host, int(port)


def _http_url(text: object) -> str:
    if not isinstance(text, str):
        raise ValueError(f"expected a URL, got {_shown(text)}")
    url = URL(text)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"expected an http:// or https:// URL, got {text!r}")
    if url.user or url.password:
        raise ValueError("credentials in the URL are not allowed; use client_id/client_secret")
    return text


def _readable_file(text: object) -> str:
    if not isinstance(text, str) or not text:
        raise ValueError(f"expected a file path, got {_shown(text)}")
    if not os.access(text, os.R_OK) or not Path(text).is_file():
        raise ValueError(f"cannot read file {text!r}")
    return text


def _regex(flags: int = re.IGNORECASE) -> Callable[[object], re.Pattern[str]]:
    def parse(value: object) -> re.Pattern[str]:
        try:
            return re.compile(str(value), flags)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from None

    return parse


def _bytes_regex(value: object) -> re.Pattern[bytes]:
    try:
        return re.compile(str(value).encode(), re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None


def _check_private(path: str, reader: _Reader, key: str, warnings: list[str]) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.append(
            reader.warning(
                key,
                f"{path!r} is readable by group or others (mode {stat.S_IMODE(mode):04o}); "
                "chmod 600 it",
            )
        )


def _loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this machine can connect."""
    if host.lower() == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:  # another host name: it may resolve anywhere
        return False


def _parse_admin(top: _Reader, warnings: list[str]) -> AdminConfig:
    """``admin: HOST:PORT`` or ``admin: {listen, auth_token_file,
    allow_unauthenticated}``. Without a token file the admin port stays on
    loopback unless ``allow_unauthenticated`` says otherwise."""
    value = top.raw("admin")
    if value is None:
        raise top.error(
            "admin", "is empty; give host:port, or {listen: host:port, auth_token_file: path}"
        )
    if not isinstance(value, dict):
        host, port = top.convert("admin", _parse_listen, ("", 0))
        token_file: str | None = None
        open_anyway = False
        reader = top
        key = "admin"
    else:
        reader = top.child("admin", _ADMIN_KEYS)
        host, port = reader.convert("listen", _parse_listen, ("", 0))
        if not host:
            raise reader.error("listen", "is required (host:port of the admin listener)")
        token_file = reader.convert("auth_token_file", _readable_file, None)
        open_anyway = reader.boolean("allow_unauthenticated", False)
        reader.finish()
        key = "auth_token_file"
    if token_file is not None:
        try:  # read to check it, never kept: the server reads the file itself
            empty = not Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            raise reader.error(key, f"cannot read {token_file!r} as text") from None
        if empty:
            raise reader.error(key, f"{token_file!r} is empty")
        _check_private(token_file, reader, key, warnings)
    elif not _loopback(host):
        if not open_anyway:
            raise top.error(
                "admin",
                f"listens on {host}, beyond loopback, with no auth_token_file: set "
                "admin.auth_token_file (or admin.allow_unauthenticated: true)",
            )
        warnings.append(
            top.warning(
                "admin",
                f"unauthenticated admin port on {host}: whoever reaches it can reload "
                "and drop tokens; set admin.auth_token_file",
            )
        )
    return AdminConfig(host, port, token_file, open_anyway)


def _parse_client(name: str, reader: _Reader, warnings: list[str]) -> ClientConfig:
    token_url = reader.convert("token_url", _http_url, None)
    if token_url is None:
        raise reader.error("token_url", "is required")
    client_id = reader.string("client_id", required=True)
    assert client_id is not None
    raw_secret = reader.raw("client_secret")
    secret = reader.string("client_secret")
    if isinstance(raw_secret, str) and raw_secret and "${" not in raw_secret:
        warnings.append(
            reader.warning(
                "client_secret",
                "a literal secret in the config file; use ${VAR} or client_secret_file",
            )
        )
    secret_file = reader.string("client_secret_file")
    if secret is not None and secret_file is not None:
        raise reader.error(
            "client_secret_file", "give client_secret or client_secret_file, not both"
        )
    if secret_file is not None:
        try:
            secret = Path(secret_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise reader.error(
                "client_secret_file", f"cannot read {secret_file!r}: {exc.strerror}"
            ) from None
        if not secret:
            raise reader.error("client_secret_file", f"{secret_file!r} is empty")
        _check_private(secret_file, reader, "client_secret_file", warnings)
    auth_method = reader.string("auth_method", "client_secret_basic")
    assert auth_method is not None
    if auth_method not in AUTH_METHODS:
        raise reader.error(
            "auth_method", f"expected one of {', '.join(sorted(AUTH_METHODS))}, got {auth_method!r}"
        )
    if secret is None and auth_method in SECRET_METHODS:
        raise reader.error("client_secret", f"is required for auth_method {auth_method}")
    private_key_file = reader.string("private_key_file")
    private_key = None
    assertion_headers: tuple[tuple[str, str], ...] = ()
    algorithm = reader.string("algorithm")
    if auth_method == "private_key_jwt":
        algorithm = algorithm or "RS256"
        if algorithm not in KEY_ALGORITHMS:
            raise reader.error("algorithm", f"expected RS256, PS256 or ES256, got {algorithm!r}")
        if private_key_file is None:
            raise reader.error("private_key_file", "is required for auth_method private_key_jwt")
        try:
            private_key = load_private_key(private_key_file, algorithm)
        except ValueError as exc:
            raise reader.error("private_key_file", str(exc)) from None
        _check_private(private_key_file, reader, "private_key_file", warnings)
        certificate = reader.string("certificate_file")
        if certificate is not None:
            try:
                assertion_headers = certificate_thumbprints(certificate)
            except ValueError as exc:
                raise reader.error("certificate_file", str(exc)) from None
    elif auth_method == "client_secret_jwt":
        algorithm = algorithm or "HS256"
        if algorithm not in SECRET_ALGORITHMS:
            raise reader.error(
                "algorithm", f"expected HS256 for client_secret_jwt, got {algorithm!r}"
            )
        if secret is not None and len(secret.encode()) < 32:
            # RFC 7518 §3.2: an HS256 key must be at least 256 bits.
            raise reader.error(
                "client_secret", "client_secret_jwt (HS256) needs a secret of at least 32 bytes"
            )
    elif algorithm is not None or private_key_file is not None:
        key = "algorithm" if algorithm is not None else "private_key_file"
        raise reader.error(
            key, f"applies to client_secret_jwt and private_key_jwt, not {auth_method}"
        )
    params: list[tuple[str, str]] = []
    if reader.has("params"):
        params_reader = reader.child("params")
        for key in params_reader.data:
            value = params_reader.string(key)
            if key in ("grant_type", "client_id", "client_secret", "scope"):
                raise params_reader.error(key, "is set by the proxy; use the client's own key")
            params.append((key, value or ""))
    margin = reader.convert("expiry_margin", parse_duration, DEFAULT_EXPIRY_MARGIN)
    lifetime = reader.convert("default_lifetime", parse_duration, DEFAULT_LIFETIME)
    if lifetime <= 0:
        raise reader.error("default_lifetime", "must be greater than 0")
    timeout = reader.convert("timeout", parse_duration, DEFAULT_TOKEN_TIMEOUT)
    if timeout <= 0:
        raise reader.error("timeout", "must be greater than 0")
    ca_file = reader.convert("ca_file", _readable_file, None)
    cert_file, key_file, tls_stamp = _tls_files(reader, ca_file)
    if auth_method in TLS_METHODS and cert_file is None:
        raise reader.error("client_cert_file", f"is required for auth_method {auth_method}")
    certificate_bound = reader.boolean("certificate_bound", False)
    thumbprint = ""
    if certificate_bound and auth_method not in TLS_METHODS:
        raise reader.error(
            "certificate_bound",
            "needs auth_method tls_client_auth or self_signed_tls_client_auth (RFC 8705 §3)",
        )
    if cert_file is not None:
        thumbprint = _x5t_s256(cert_file)
    token_headers: list[tuple[str, str]] = []
    if reader.has("token_headers"):
        headers_reader = reader.child("token_headers")
        for name in headers_reader.data:
            try:
                _header_name(name)
                text = _header_text(headers_reader.string(name))
            except ValueError as exc:
                raise headers_reader.error(name, str(exc)) from None
            if name.lower() in ("authorization", "content-type"):
                raise headers_reader.error(name, "is set by the proxy")
            token_headers.append((name, text))
    token_format = reader.string("token_request_format", "form") or "form"
    if token_format not in TOKEN_REQUEST_FORMATS:
        raise reader.error("token_request_format", f"expected form or json, got {token_format!r}")
    cooldown = reader.convert("failure_cooldown", parse_duration, DEFAULT_FAILURE_COOLDOWN)
    if cooldown <= 0:
        raise reader.error("failure_cooldown", "must be greater than 0")
    dpop = None
    if reader.has("dpop"):
        sub = reader.child("dpop", _DPOP_KEYS, what="key_file")
        dpop_file = sub.string("key_file")
        if dpop_file is None:
            raise sub.error("key_file", "is required (the client's DPoP private key, PEM)")
        try:
            pem, alg, jwk = load_dpop_key(dpop_file, sub.string("alg"))
        except ValueError as exc:
            raise sub.error("key_file", str(exc)) from None
        _check_private(dpop_file, sub, "key_file", warnings)
        sub.finish()
        dpop = DpopConfig(dpop_file, alg, pem, jwk)
    client = ClientConfig(
        name=name,
        token_url=token_url,
        client_id=client_id,
        client_secret=secret,
        auth_method=cast(AuthMethod, auth_method),  # checked above
        scope=reader.string("scope") or None,
        params=tuple(params),
        expiry_margin=margin,
        refresh_ahead=reader.convert("refresh_ahead", parse_share, DEFAULT_REFRESH_AHEAD),
        default_lifetime=lifetime,
        remint_min_interval=reader.convert(
            "remint_min_interval", parse_duration, DEFAULT_REMINT_MIN_INTERVAL
        ),
        timeout=timeout,
        ca_file=ca_file,
        client_cert_file=cert_file,
        client_key_file=key_file,
        tls_stamp=tls_stamp,
        token_headers=tuple(token_headers),
        token_request_format=cast(TokenRequestFormat, token_format),  # checked above
        warm=reader.boolean("warm", False),
        private_key=private_key,
        private_key_file=private_key_file,
        key_id=reader.string("key_id"),
        algorithm=algorithm,
        assertion_audience=reader.convert("assertion_audience", _http_url, None),
        assertion_headers=assertion_headers,
        mint_attempts=reader.convert("mint_attempts", _attempts, DEFAULT_MINT_ATTEMPTS),
        failure_cooldown=cooldown,
        dpop=dpop,
        certificate_bound=certificate_bound,
        certificate_thumbprint=thumbprint,
    )
    reader.finish()
    return client


def _attempts(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10:
        raise ValueError(f"expected a whole number from 1 to 10, got {_shown(value)}")
    return value


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2


def _header_name(value: object) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ValueError(f"expected a header name like X-Api-Token, got {_shown(value)}")
    if value.lower() in ("host", "content-length", "transfer-encoding", "connection"):
        raise ValueError(f"{value} is not a header the token can go in")
    return value


def _header_text(value: object) -> str:
    text = "" if value is None else str(value)
    if any(c in text for c in "\r\n\x00"):
        raise ValueError("must not contain CR, LF or NUL")
    return text


def _x5t_s256(path: str) -> str:
    """RFC 8705 §3.1: base64url(SHA-256(DER)) of the first certificate in ``path``."""
    text = Path(path).read_text(errors="replace")
    start = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", start)
    der = ssl.PEM_cert_to_DER_cert(text[start : end + len("-----END CERTIFICATE-----")])
    return b64url(hashlib.sha256(der).digest())


def _tls_files(reader: _Reader, ca_file: str | None) -> tuple[str | None, str | None, str]:
    """``client_cert_file`` and ``client_key_file`` (both or neither), checked by
    loading them, and a digest of the CA/cert/key contents for reloads."""
    cert = reader.convert("client_cert_file", _readable_file, None)
    key = reader.convert("client_key_file", _readable_file, None)
    if (cert is None) != (key is None):
        missing = "client_key_file" if key is None else "client_cert_file"
        raise reader.error(missing, "client_cert_file and client_key_file go together")
    if cert is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or "unreadable"
            if reason == "KEY_VALUES_MISMATCH":
                reason = "the key does not belong to the certificate"
            raise reader.error(
                "client_cert_file", f"cannot load the certificate and key: {reason}"
            ) from None
    digest = hashlib.sha256()
    for path in (ca_file, cert, key):
        if path is not None:
            digest.update(Path(path).read_bytes())
    return cert, key, digest.hexdigest()[:16] if (ca_file or cert) else ""


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number of at least 1, got {_shown(value)}")
    return value


def _networks(value: object) -> tuple[IPv4Network | IPv6Network, ...]:
    items = value if isinstance(value, list) else [value]
    networks = []
    for item in items:
        try:
            networks.append(ip_network(str(item), strict=False))
        except ValueError:
            raise ValueError(
                f"expected CIDRs like 10.0.0.0/8 or ::1/128, got {_shown(item)}"
            ) from None
    return tuple(networks)


def inbound_key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _parse_inbound_auth(reader: _Reader, warnings: list[str]) -> InboundAuth:
    header = reader.string("header", "X-Proxy-Key") or "X-Proxy-Key"
    if header.lower() in ("authorization", "host", "proxy-authorization"):
        raise reader.error("header", f"{header} is the proxy's own to set; choose another name")
    path = reader.string("keys_file", required=True)
    assert path is not None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise reader.error("keys_file", f"cannot read {path!r}: {exc.strerror}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not keys:
        raise reader.error("keys_file", f"{path!r} holds no keys")
    _check_private(path, reader, "keys_file", warnings)
    reader.finish()
    return InboundAuth(header, tuple(inbound_key_digest(k) for k in keys), path)


def _normalise_host(value: object) -> str:
    if not isinstance(value, str) or not value or "/" in value or " " in value:
        raise ValueError(f"expected a host name like api.example.com, got {_shown(value)}")
    return value.lower().rstrip(".")


def _path_prefix(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"expected a path starting with /, got {_shown(value)}")
    if "?" in value or "#" in value:
        raise ValueError(f"a path prefix cannot hold a query or fragment, got {value!r}")
    return value


def _parse_route(
    index: int,
    reader: _Reader,
    clients: Mapping[str, ClientConfig],
    names: set[str],
    warnings: list[str],
) -> RouteConfig:
    name = reader.string("name") or f"route-{index}"
    if name in names:
        raise reader.error("name", f"duplicate route name {name!r}")
    names.add(name)
    client_name = reader.string("client", required=True)
    assert client_name is not None
    if client_name not in clients:
        known = ", ".join(sorted(clients)) or "none defined"
        raise reader.error("client", f"no client named {client_name!r} (clients: {known})")
    upstream = reader.convert("upstream", _http_url, None)
    if upstream is None:
        raise reader.error("upstream", "is required")
    if URL(upstream).query_string:
        raise reader.error("upstream", "cannot carry a query string")
    match = reader.child("match", _MATCH_KEYS, what="path_prefix, host, or both")
    host = match.convert("host", _normalise_host, None)
    prefix = match.convert("path_prefix", _path_prefix, None)
    if host is None and prefix is None:
        raise reader.error("match", "needs path_prefix, host, or both")
    match.finish()
    rule = ExpiredTokenRule()
    if reader.has("expired_token"):
        rule_reader = reader.child("expired_token")
        rule = ExpiredTokenRule(
            www_authenticate=rule_reader.convert("www_authenticate", _regex(), None),
            body=rule_reader.convert("body", _bytes_regex, None),
        )
        rule_reader.finish()
    route_ca = reader.convert("ca_file", _readable_file, None)
    route_cert, route_key, route_stamp = _tls_files(reader, route_ca)
    client = clients[client_name]
    if client.auth_method in TLS_METHODS and route_cert is None:
        # RFC 8705 §3: a partner that checks a certificate-bound token against
        # the certificate of its TLS connection gets the client's own. TLS
        # sends it only to a server that asks for one.
        assert client.client_cert_file is not None
        route_cert, route_key = client.client_cert_file, client.client_key_file
        route_stamp = hashlib.sha256((route_stamp + client.tls_stamp).encode()).hexdigest()[:16]
    elif client.certificate_bound and route_cert is not None:
        if _x5t_s256(route_cert) != client.certificate_thumbprint:
            raise reader.error(
                "client_cert_file",
                f"client {client_name!r} has certificate-bound tokens: the route must present "
                "the client's own certificate (leave client_cert_file out to use it)",
            )
    route = RouteConfig(
        name=name,
        upstream=upstream,
        client=client_name,
        host=host,
        path_prefix=prefix,
        scope=reader.string("scope") or clients[client_name].scope,
        timeout=reader.convert("timeout", parse_duration, DEFAULT_ROUTE_TIMEOUT),
        connect_timeout=reader.convert("connect_timeout", parse_duration, DEFAULT_CONNECT_TIMEOUT),
        ca_file=route_ca,
        client_cert_file=route_cert,
        client_key_file=route_key,
        tls_stamp=route_stamp,
        replay_limit=reader.convert("replay_limit", parse_size, DEFAULT_REPLAY_LIMIT),
        expired_token=rule,
        token_header=reader.convert("token_header", _header_name, "Authorization"),
        token_prefix=reader.convert("token_prefix", _header_text, "Bearer "),
        max_body=reader.convert("max_body", parse_size, None),
        max_concurrent=reader.convert("max_concurrent", _positive_int, None),
        retry_idempotent=reader.boolean("retry_idempotent", True),
        allow_from=reader.convert("allow_from", _networks, ()),
        inbound_auth=_parse_inbound_auth(
            reader.child("inbound_auth", _INBOUND_AUTH_KEYS, what="keys_file"), warnings
        )
        if reader.has("inbound_auth")
        else None,
    )
    reader.finish()
    return route


def check_workers(value: object) -> int:
    """``workers:`` (and ``--workers``): 1 to MAX_WORKERS, or ValueError."""
    return _worker_count(value)


def check_log_level(value: object) -> LogLevel:
    """``log.level`` (and ``--log-level``), lower-cased, or ValueError."""
    level = str(value).lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(sorted(LOG_LEVELS))}, got {level!r}")
    return cast(LogLevel, level)


def check_log_format(value: object) -> LogFormat:
    """``log.format`` (and ``--log-format``): json or console, or ValueError."""
    if value not in LOG_FORMATS:
        raise ValueError(f"expected json or console, got {_shown(value)}")
    return cast(LogFormat, value)


def _worker_count(value: object) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ValueError(
            f"expected a whole number of workers from 1 to {MAX_WORKERS}, got {_shown(value)}"
        )
    return value


def _redis_url(value: object) -> str:
    text = str(value)
    scheme = text.split("://", 1)[0] if "://" in text else ""
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        SentinelTarget.parse(text)  # its errors never quote the URL
    elif scheme not in ("redis", "rediss", "unix"):
        # Never echo the URL back: it may carry a password.
        raise ValueError(
            "expected a redis://, rediss://, unix:// or redis+sentinel://host:port,.../SERVICE URL"
        )
    return text


def _parse_cache(reader: _Reader) -> CacheConfig:
    backend = reader.string("backend", "memory")
    if backend not in ("memory", "redis"):
        raise reader.error("backend", f"expected memory or redis, got {backend!r}")
    url = reader.convert("url", _redis_url, None)
    if backend == "redis" and url is None:
        raise reader.error("url", "is required for backend redis")
    lock_ttl = reader.convert("lock_ttl", parse_duration, DEFAULT_LOCK_TTL)
    if lock_ttl <= 0:
        raise reader.error("lock_ttl", "must be greater than 0")
    prefix = reader.string("key_prefix", "authproxy") or "authproxy"
    if "{" in prefix or "}" in prefix:
        raise reader.error(
            "key_prefix", "must not contain { or } (the key's hash tag is the proxy's)"
        )
    cluster = reader.boolean("cluster", False)
    if cluster and url is not None and "+sentinel://" in url:
        raise reader.error(
            "cluster", "is for Redis Cluster; a redis+sentinel:// URL is a Sentinel set"
        )
    reader.finish()
    return CacheConfig(
        backend=cast(CacheBackend, backend),
        url=url,
        key_prefix=prefix,
        lock_ttl=lock_ttl,
        cluster=cluster,
    )


def _parse_inbound(reader: _Reader) -> InboundLimits:
    d = InboundLimits()

    def positive(key: str, parse: Callable[[object], Any], default: Any) -> Any:
        value = reader.convert(key, parse, default)
        if value <= 0:
            raise reader.error(key, "must be greater than 0")
        return value

    limits = InboundLimits(
        max_header_size=positive("max_header_size", parse_size, d.max_header_size),
        max_headers=positive("max_headers", _positive_int, d.max_headers),
        header_timeout=positive("header_timeout", parse_duration, d.header_timeout),
        body_timeout=positive("body_timeout", parse_duration, d.body_timeout),
        idle_timeout=positive("idle_timeout", parse_duration, d.idle_timeout),
    )
    reader.finish()
    return limits


def _tunnel_entry(value: object) -> TunnelEntry:
    """``host:port`` or ``"*.domain:port"``; the port is part of the entry."""
    if not isinstance(value, str):
        raise ValueError(f"expected host:port like pypi.org:443, got {_shown(value)}")
    host, sep, port = value.strip().lower().rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port like pypi.org:443, got {value!r}")
    host = host.rstrip(".")
    if host.startswith("[") or host.replace(".", "").isdigit():
        raise ValueError(f"{value!r}: IP addresses are refused; name the host")
    try:
        return TunnelEntry(host, int(port))
    except ConfigError:
        raise ValueError(f"{value!r}: expected a host name (or *.domain) and a port") from None


def _parse_egress(
    reader: _Reader, routes: tuple[RouteConfig, ...], warnings: list[str]
) -> EgressConfig:
    intercept = None
    if reader.has("intercept"):
        sub = reader.child("intercept", _INTERCEPT_KEYS, what="ca_cert_file and ca_key_file")
        cert = sub.convert("ca_cert_file", _readable_file, None)
        if cert is None:
            raise sub.error("ca_cert_file", "is required (the CA certificate, PEM)")
        key = sub.convert("ca_key_file", _readable_file, None)
        if key is None:
            raise sub.error("ca_key_file", "is required (the CA's private key, PEM)")
        _check_private(key, sub, "ca_key_file", warnings)
        lifetime = sub.convert("leaf_lifetime", parse_duration, DEFAULT_LEAF_LIFETIME)
        if lifetime < 60:
            raise sub.error("leaf_lifetime", "must be 1m or more")
        sub.finish()
        digest = hashlib.sha256(Path(cert).read_bytes() + Path(key).read_bytes())
        where = reader.warning("intercept", "").removesuffix(": ")
        intercept = InterceptConfig(cert, key, lifetime, digest.hexdigest()[:16], where)
    entries: list[TunnelEntry] = []
    raw = reader.raw("tunnel")
    if raw is not None:
        if not isinstance(raw, list):
            raise reader.error("tunnel", f"expected a list of host:port, got {_kind(raw)}")
        for i, item in enumerate(raw):
            try:
                entries.append(_tunnel_entry(item))
            except ValueError as exc:
                raise reader.error("tunnel", f"entry {i + 1}: {exc}") from None
            for route in routes:
                if route.host is not None and entries[-1].covers(route.host, INTERCEPT_PORT):
                    raise reader.error(
                        "tunnel",
                        f"entry {i + 1} ({entries[-1]}) covers {route.host}, the host of route "
                        f"{route.name!r}: a tunnel host never gets a token; remove one of them",
                    )
    idle = reader.convert("tunnel_idle_timeout", parse_duration, DEFAULT_TUNNEL_IDLE_TIMEOUT)
    connect = reader.convert(
        "tunnel_connect_timeout", parse_duration, DEFAULT_TUNNEL_CONNECT_TIMEOUT
    )
    for key, value in (("tunnel_idle_timeout", idle), ("tunnel_connect_timeout", connect)):
        if value <= 0:
            raise reader.error(key, "must be greater than 0")
    reader.finish()
    return EgressConfig(intercept, tuple(entries), idle, connect)


def _ratio(value: object) -> float:
    """``1%`` to ``100%``, or a fraction from 0 to 1 (a sampling ratio)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            number = float(value.strip()[:-1]) / 100.0
        except ValueError:
            number = -1.0
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        number = -1.0
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"expected a ratio like 10% or 0.1 (0 to 100%), got {_shown(value)}")
    return number


def _parse_tracing(reader: _Reader) -> TracingConfig:
    enabled = reader.boolean("enabled", False)
    ratio = reader.convert("sample_ratio", _ratio, None)
    name = reader.string("service_name")
    reader.finish()
    return TracingConfig(enabled=enabled, sample_ratio=ratio, service_name=name or None)


def _parse_log(reader: _Reader) -> LogConfig:
    default = LogConfig()
    level = reader.convert("level", check_log_level, default.level)
    form = reader.convert("format", check_log_format, default.format)
    reader.finish()
    return LogConfig(level=level, format=form)


def parse_config(
    text: str, source: str = "<memory>", environ: Mapping[str, str] | None = None
) -> Config:
    """Validate the YAML ``text`` into a :class:`Config`; raise ConfigError otherwise."""
    env = os.environ if environ is None else environ
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:  # a key problem, "LINE: message"
        raise ConfigError(f"{source}:{exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    if data is None:
        raise ConfigError(f"{source}: the file is empty")
    top = _Reader(data, "", source, env, known=_TOP_KEYS)
    listen = top.convert("listen", _parse_listen, _parse_listen(DEFAULT_LISTEN))

    warnings: list[str] = []
    clients: dict[str, ClientConfig] = {}
    clients_reader = top.child("clients", what="define at least one client")
    if not clients_reader.data:
        raise top.error("clients", "define at least one client")
    for name in clients_reader.data:
        client_reader = clients_reader.child(
            name, _CLIENT_KEYS, what="expected token_url, client_id and its other keys"
        )
        clients[name] = _parse_client(name, client_reader, warnings)
        clients_reader.seen.add(name)

    raw_routes = top.raw("routes")
    if raw_routes is None:
        state = "is empty" if top.has("routes") else "is required"
        raise top.error("routes", f"{state}; give a list of routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        raise top.error("routes", f"expected a non-empty list of routes, got {_kind(raw_routes)}")
    names: set[str] = set()
    routes = tuple(
        _parse_route(
            i,
            _Reader(
                item,
                f"routes[{i}]",
                source,
                env,
                getattr(item, "line", top.lines["routes"]),  # the item's "- " line
                _ROUTE_KEYS,
            ),
            clients,
            names,
            warnings,
        )
        for i, item in enumerate(raw_routes)
    )
    workers = top.convert("workers", _worker_count, 1)
    cache = _parse_cache(top.child("cache")) if top.has("cache") else CacheConfig()
    admin_config = _parse_admin(top, warnings) if top.has("admin") else None
    if (
        admin_config is not None
        and (admin_config.host, admin_config.port) == listen
        and admin_config.port != 0
    ):
        raise top.error("admin", "must not be the same address as listen")
    grace = top.convert("shutdown_grace", parse_duration, DEFAULT_SHUTDOWN_GRACE)
    watch = top.convert("watch_interval", parse_duration, DEFAULT_WATCH_INTERVAL)
    engine = top.string("engine", "lean")
    if engine == "aiohttp":
        raise top.error(
            "engine",
            "the aiohttp engine was removed in authproxy 0.2 (one engine, one behaviour: "
            "docs/design.md); delete this key",
        )
    if engine not in ENGINES:
        raise top.error("engine", f"expected one of {', '.join(ENGINES)}, got {engine!r}")
    config = Config(
        listen_host=listen[0],
        listen_port=listen[1],
        clients=clients,
        routes=routes,
        trust_forwarded_headers=top.boolean("trust_forwarded_headers", False),
        workers=workers,
        cache=cache,
        admin=admin_config,
        shutdown_grace=grace,
        watch_interval=watch,
        log=_parse_log(top.child("log")) if top.has("log") else LogConfig(),
        tracing=_parse_tracing(top.child("tracing")) if top.has("tracing") else TracingConfig(),
        access_log=top.boolean("access_log", True),
        inbound=_parse_inbound(top.child("inbound")) if top.has("inbound") else InboundLimits(),
        engine=cast(Engine, engine),
        egress=_parse_egress(top.child("egress", _EGRESS_KEYS), routes, warnings)
        if top.has("egress")
        else EgressConfig(),
        source=source,
        warnings=tuple(warnings),
    )
    top.finish()
    return config


def config_path(explicit: str | None, environ: Mapping[str, str] | None = None) -> str:
    """``--config``, else ``$AUTHPROXY_CONFIG``, else ``./proxy.yaml``."""
    env = os.environ if environ is None else environ
    return explicit or env.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config file is not UTF-8 text") from None
    return parse_config(text, path, environ)
