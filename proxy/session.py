"""TLS contexts for every remote, and the client session for token endpoints.

The partner APIs' client lives in :mod:`proxy.upstream`. The token session has
the same safety settings: no cookie jar, no proxy/netrc from the environment.
"""

from __future__ import annotations

import functools
import ssl

import aiohttp

from .upstream import KEEPALIVE_TIMEOUT


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


def token_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=16, keepalive_timeout=KEEPALIVE_TIMEOUT)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=None),
    )
