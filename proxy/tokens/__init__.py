"""The token lifecycle, in one place: the :class:`~proxy.tokens.token.Token`
value and its expiry rules, the minter that talks to a token endpoint, the
circuit breaker in front of it, the caches (memory, file, Redis), the
single-flight :class:`~proxy.tokens.source.SharedTokenSource` that wraps a
minter and a cache, and the per-(client, scope) registry of sources.
"""
