"""The client session for token endpoints: no cookie jar, no proxy or netrc
from the environment (the partners' client is :mod:`proxy.http1.upstream`).
"""

from __future__ import annotations

from typing import Final

import aiohttp

# Below the usual 60 s idle timeout of identity providers' load balancers, as
# for partners: a kept connection is never one the far side has just closed.
TOKEN_KEEPALIVE: Final = 30.0
TOKEN_CONNECTIONS: Final = 16  # to all token endpoints together; mints are rare and single-flight


def token_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=TOKEN_CONNECTIONS, keepalive_timeout=TOKEN_KEEPALIVE)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=None),
    )
