"""The token lifecycle's registry: one :class:`~proxy.tokens.source.SharedTokenSource`
per (client, scope), one circuit breaker per client, the credential
fingerprint that names a client's tokens in the cache, and the cache the
configuration asks for. Sources and their tokens survive a reload for
clients whose configuration did not change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from proxy.config.model import ClientConfig, Config
from proxy.metrics import Metrics
from proxy.tokens.breaker import MintGuard, State
from proxy.tokens.cache import (
    FallbackTokenCache,
    MemoryTokenCache,
    TokenCache,
    cache_key,
    credentials_fingerprint,
)
from proxy.tokens.minter import GuardedMinter
from proxy.tokens.source import SharedTokenSource
from proxy.tokens.token import Minter

CIRCUIT_GAUGE: Final = {State.CLOSED: 0, State.HALF_OPEN: 1, State.OPEN: 2}


class TokenSources:
    """One :class:`SharedTokenSource` per (client, scope), created on first use.

    Sources survive a reload for clients whose configuration did not change, so
    their cached tokens are kept. A client whose credentials changed gets a new
    cache key (its fingerprint), so no process adopts a token of the old ones.
    ``minter_for`` makes the minter that talks to a client's token endpoint
    (:class:`~proxy.tokens.minter.ClientCredentialsMinter` on the shared
    session); the registry wraps it with the client's breaker and retries.
    """

    def __init__(
        self,
        cache: TokenCache,
        minter_for: Callable[[ClientConfig], Minter],
        clock: Callable[[], float],
        metrics: Metrics,
    ) -> None:
        self._cache = cache
        self._minter_for = minter_for
        self._clock = clock
        self._metrics = metrics
        self._sources: dict[tuple[str, str], tuple[ClientConfig, SharedTokenSource]] = {}
        self._guards: dict[str, tuple[ClientConfig, MintGuard]] = {}

    def guard(self, client: ClientConfig) -> MintGuard:
        """One circuit breaker per client, shared by its scopes; a new one when
        the client's configuration changes (new credentials deserve a new try)."""
        known = self._guards.get(client.name)
        if known is not None and known[0] == client:
            return known[1]
        guard = MintGuard(cooldown=client.failure_cooldown)
        self._guards[client.name] = (client, guard)
        return guard

    def get(self, client: ClientConfig, scope: str | None) -> SharedTokenSource:
        name = (client.name, scope or "")
        known = self._sources.get(name)
        if known is not None and known[0] == client:
            return known[1]
        key = cache_key(client.name, scope, client_fingerprint(client))
        gauge = self._metrics.circuit_state.labels(client.name)
        minter = GuardedMinter(
            self._minter_for(client),
            self.guard(client),
            client=client.name,
            budget=client.timeout,
            attempts=client.mint_attempts,
            clock=self._clock,
            on_state=lambda guard: gauge.set(CIRCUIT_GAUGE[guard.state]),
        )
        source = SharedTokenSource(
            key,
            minter,
            self._cache,
            remint_min_interval=client.remint_min_interval,
            clock=self._clock,
            events=self._metrics.for_client(client.name),
        )
        if known is not None:
            previous = known[1]
            previous.close()
            held = previous.current
            if previous.key == key and held is not None:
                source.current = held  # same credentials: keep the token in hand
            elif held is not None and held.valid(self._clock()) and _same_key(known[0], client):
                # New credentials: make before break (issue 13). Not across a
                # new DPoP key: a token bound to the old one is refused with it.
                source.succeed(previous.key, held)
        self._sources[name] = (client, source)
        return source

    async def drop(self, client: str) -> int:
        """Drop every token of ``client`` (all its scopes), here and in the
        shared cache. Raises KeyError for a client no route uses."""
        sources = [source for (name, _), (_, source) in self._sources.items() if name == client]
        if not sources:
            raise KeyError(client)
        return sum([await source.drop() for source in sources])

    def keep_only(self, used: set[tuple[str, str]]) -> None:
        """Forget sources no route uses any more (after a reload)."""
        for name in list(self._sources):
            if name not in used:
                self._sources.pop(name)[1].close()

    def close(self) -> None:
        for _, source in self._sources.values():
            source.close()

    def all(self) -> list[tuple[ClientConfig, SharedTokenSource]]:
        return list(self._sources.values())

    def guards(self) -> dict[str, MintGuard]:
        return {name: guard for name, (_, guard) in self._guards.items()}


def _same_key(old: ClientConfig, new: ClientConfig) -> bool:
    """Whether tokens of ``old`` can still be sent by ``new``: the same DPoP
    key or none (RFC 9449), and the same client certificate when tokens are
    bound to it (RFC 8705 §3): a bound token is never bridged to another."""
    same_dpop = (old.dpop.thumbprint if old.dpop else None) == (
        new.dpop.thumbprint if new.dpop else None
    )
    bound = old.certificate_bound or new.certificate_bound
    return same_dpop and (not bound or old.certificate_thumbprint == new.certificate_thumbprint)


def client_fingerprint(client: ClientConfig) -> str:
    """What decides whose token it is; a change means a new token.

    The credentials are the secret, the private key and the TLS files:
    ``tls_stamp`` digests the contents of ``ca_file``, ``client_cert_file`` and
    ``client_key_file``, so a rotated certificate gets a new token, not only a
    new TLS context (issue 11).
    """
    return credentials_fingerprint(
        client.token_url,
        client.client_id,
        client.client_secret,
        client.auth_method,
        client.params,
        client.private_key,
        client.tls_stamp,
        # RFC 9449: a token is bound to the DPoP key; another key, another token
        *((client.dpop.thumbprint,) if client.dpop is not None else ()),
    )


def build_cache(
    config: Config,
    runtime_dir: str | None,
    clock: Callable[[], float],
    on_state: Callable[[bool], None] | None = None,
) -> TokenCache:
    """The token cache the config asks for.

    ``memory`` with one worker is a dict; with several workers (``runtime_dir``
    set by the supervisor) a file cache shared by the host's workers, so that
    N workers never silently become N tokens. ``redis`` falls back to memory
    while Redis is down.
    """
    settings = config.cache
    if settings.backend == "redis":
        from proxy.tokens.redis_cache import RedisTokenCache

        assert settings.url is not None
        primary = RedisTokenCache(
            settings.url,
            key_prefix=settings.key_prefix,
            lock_ttl=settings.lock_ttl,
            clock=clock,
            cluster=settings.cluster,
        )
        return FallbackTokenCache(primary, MemoryTokenCache(clock), on_state=on_state)
    if runtime_dir is not None:
        from proxy.tokens.file_cache import FileTokenCache

        return FileTokenCache(runtime_dir, clock)
    return MemoryTokenCache(clock)
