"""``authproxy token CLIENT``: mint once and describe the token, for ops
debugging a partner. The token itself is never printed; a JWT's claims are
(they are readable by anyone holding the token and carry no secret of ours),
its signature is not.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from proxy.config.model import Config
from proxy.errors import TokenError
from proxy.tokens.minter import ClientCredentialsMinter
from proxy.tokens.session import token_session
from proxy.tokens.token import Token, iso_time, jwt_claims


def describe(client: str, token: Token) -> dict[str, Any]:
    claims = jwt_claims(token.access_token)
    info: dict[str, Any] = {
        "client": client,
        "token_type": "Bearer",
        "lifetime_s": round(token.lifetime, 3),
        "minted_at": iso_time(token.minted_at),
        "usable_until": iso_time(token.expires_at),
        "refresh_from": iso_time(token.refresh_at),
        "scopes_granted": token.scope.split() if token.scope else [],
        "length": len(token.access_token),
        "jwt": claims is not None,
    }
    if claims is not None:
        info["jwt_claims"] = claims
    return info


async def inspect_token(config: Config, client_name: str, scope: str | None) -> int:
    client = config.clients.get(client_name)
    if client is None:
        known = ", ".join(sorted(config.clients))
        print(f"authproxy: no client named {client_name!r} (clients: {known})", file=sys.stderr)
        return 1
    async with token_session() as session:
        minter = ClientCredentialsMinter(client, session, time.time)
        try:
            token = await minter.mint(scope or client.scope)
        except TokenError as exc:
            print(f"authproxy: {exc.message}", file=sys.stderr)
            return 1
    print(json.dumps(describe(client_name, token), indent=2, default=str))
    return 0
