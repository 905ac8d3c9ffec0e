"""A fake :class:`proxy.ops.admin.Operated` for the admin app's own tests: the
admin listener without a proxy behind it, with realistic status data that
also carries secrets in fields the page must never show."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from proxy.metrics import Metrics

ADMIN_TOKEN = "adm1n-T0ken-7c1d9e"  # what admin_app is given
# Values the fake puts where a careless page would show them.
SECRETS = (
    "S3cr3t-client-acme-4411",  # a client secret
    "eyJhbGciOiJSUzI1NiJ9.live-access-token",  # a token in hand
    "R3disPassw0rd-99",  # the password in the Redis URL
    "UpstreamPassw0rd-12",  # user-info in an upstream URL
    "private-key-PEM-BODY-xyz",  # a private key
)
CLIENT_SECRET, ACCESS_TOKEN, REDIS_PASSWORD, UPSTREAM_PASSWORD, PRIVATE_KEY = SECRETS


def realistic_status() -> dict[str, Any]:
    """Two routes, two clients; acme's token at 30 % of its life, globex's
    circuit open after its credentials were refused."""
    return {
        "version": "0.3.0",
        "generated_at": "2026-12-01T13:20:00+00:00",
        "uptime_s": 600.0,
        "ready": True,
        "ready_reason": None,
        "routes": [
            {
                "name": "acme-orders",
                "client": "acme",
                "upstream": "https://api.acme.example/v2/",
                "requests": 1200,
                "errors": 6,
                "replays": 3,
            },
            {
                "name": "globex-billing",
                "client": "globex",
                "upstream": f"https://svc:{UPSTREAM_PASSWORD}@billing.globex.example/api/",
                "requests": 48,
                "errors": 48,
                "replays": 0,
                "authorization": f"Bearer {ACCESS_TOKEN}",  # not a field of the page
            },
        ],
        "clients": [
            {
                "name": "acme",
                "circuit": "closed",
                "circuit_reason": None,
                "circuit_open_for_s": None,
                "client_secret": CLIENT_SECRET,  # not a field of the page
                "private_key": PRIVATE_KEY,  # nor this
                "tokens": [
                    {
                        "scope": "orders.read",
                        "cached": True,
                        "expires_in_s": 1071.0,  # 30 % of 3570
                        "lifetime_s": 3570.0,
                        "minted_at": "2026-12-01T12:50:30+00:00",
                        "last_mint_outcome": "success",
                        "last_error": None,
                        "rotation_pending": False,
                        "access_token": ACCESS_TOKEN,  # never shown
                    }
                ],
            },
            {
                "name": "globex",
                "circuit": "open",
                "circuit_reason": "credentials rejected (invalid_client)",
                "circuit_open_for_s": 24.5,
                "tokens": [
                    {
                        "scope": None,
                        "cached": False,
                        "expires_in_s": None,
                        "lifetime_s": None,
                        "minted_at": None,
                        "last_mint_outcome": "error",
                        "last_error": "token endpoint refused the client: invalid_client",
                        "rotation_pending": True,
                    }
                ],
            },
        ],
        "workers_configured": 2,
        "workers": [
            {"name": "1", "pid": 4242, "this": True},
            {"name": "2", "pid": 4243, "this": False},
        ],
        "cache": {
            "backend": "redis",
            "url": f"redis://authproxy:{REDIS_PASSWORD}@10.0.0.5:6379/0",
            "up": True,
        },
        "config": {
            "source": "/etc/authproxy/proxy.yaml",
            "stamp": "3f9a1c0d2b7e",
            "loaded_at": "2026-12-01T13:10:00+00:00",
            "last_reload_at": "2026-12-01T13:10:00+00:00",
            "last_reload_outcome": "success",
        },
    }


@dataclass
class FakeReload:
    ok: bool
    message: str

    def as_json(self) -> dict[str, Any]:
        return {"reloaded": self.ok, "message": self.message}


class FakeOperated:
    """Answers the admin app the way :class:`proxy.server.ProxyServer` does."""

    def __init__(self, status: dict[str, Any] | None = None) -> None:
        self.metrics = Metrics()
        self.data = realistic_status() if status is None else status
        self.tokens_held = {"acme": 2, "globex": 0}
        self.drops: list[str] = []
        self.reloads = 0
        self.reason: str | None = None

    def ready_reason(self) -> str | None:
        return self.reason

    async def refresh_gauges(self) -> None:
        pass

    async def token_report(self) -> list[dict[str, Any]]:
        return [{"client": name, "cached": held > 0} for name, held in self.tokens_held.items()]

    def request_reload(self) -> FakeReload:
        self.reloads += 1
        return FakeReload(True, "proxy.yaml: 2 routes, 2 clients")

    async def drop_tokens(self, client: str) -> dict[str, Any]:
        if client not in self.tokens_held:
            raise KeyError(client)
        self.drops.append(client)
        dropped, self.tokens_held[client] = self.tokens_held[client], 0
        return {"client": client, "dropped": dropped}

    async def status(self) -> dict[str, Any]:
        return copy.deepcopy(self.data)
