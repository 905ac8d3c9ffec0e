"""The aiohttp client sessions authproxy uses to talk to remotes.

One session for the partner APIs (pooled, shared by every route) and one for the
token endpoints. Both are built here so that their safety settings live in one
place: no cookie jar (a shared jar would hand one app's partner cookies to
another), no proxy/netrc from the environment, no decompression (the proxy is
transparent: compressed bodies pass through compressed).
"""

from __future__ import annotations

import functools
import ssl
from typing import Final

import aiohttp

UPSTREAM_POOL_SIZE: Final = 0  # no global cap: routes are bounded by the apps' own concurrency
UPSTREAM_POOL_PER_HOST: Final = 0
KEEPALIVE_TIMEOUT: Final = 30.0  # below the usual 60 s idle timeout of partner load balancers
DNS_CACHE_TTL: Final = 60  # seconds; no DNS lookup per request


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


def upstream_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=UPSTREAM_POOL_SIZE,
        limit_per_host=UPSTREAM_POOL_PER_HOST,
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        ttl_dns_cache=DNS_CACHE_TTL,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=None),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
    )


def token_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=16, keepalive_timeout=KEEPALIVE_TIMEOUT)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=None),
    )
