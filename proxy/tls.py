"""TLS contexts for every remote: token endpoints and partners."""

from __future__ import annotations

import functools
import ssl
import ssl as ssl_module


@functools.lru_cache(maxsize=64)
def ssl_context(
    ca_file: str | None,
    cert_file: str | None = None,
    key_file: str | None = None,
    stamp: str = "",
) -> ssl.SSLContext | bool:
    """Verification on; ``ca_file`` replaces the system trust store when given;
    ``cert_file``/``key_file`` present a client certificate (mTLS, RFC 8705).

    Contexts are cached so that connections to one partner share a pool;
    ``stamp`` (a digest of the files' contents, taken at config load) makes a
    reload with new certificates build a new context.
    """
    if ca_file is None and cert_file is None:
        return True
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


_DEFAULT_TLS: list[ssl_module.SSLContext] = []


def default_tls() -> ssl_module.SSLContext:
    """The system trust store, verification on; one context for every route."""
    if not _DEFAULT_TLS:
        _DEFAULT_TLS.append(ssl_module.create_default_context())
    return _DEFAULT_TLS[0]
