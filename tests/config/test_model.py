"""The configuration model validates itself at construction and stays
read-only: a Config built in code (tests, embedding) is held to the rules the
loader enforces, and nothing can change one after it is built."""

from __future__ import annotations

import dataclasses

import pytest

from proxy.config.model import (
    CacheConfig,
    ClientConfig,
    Config,
    InboundLimits,
    LogConfig,
    RouteConfig,
)
from proxy.errors import ConfigError


def client(**changes: object) -> ClientConfig:
    fields: dict[str, object] = {
        "name": "acme",
        "token_url": "http://127.0.0.1:1/token",
        "client_id": "id",
        "client_secret": "s3cret",
    }
    fields.update(changes)
    return ClientConfig(**fields)  # type: ignore[arg-type]


def route(**changes: object) -> RouteConfig:
    fields: dict[str, object] = {
        "name": "r",
        "upstream": "http://127.0.0.1:2/",
        "client": "acme",
        "path_prefix": "/r/",
    }
    fields.update(changes)
    return RouteConfig(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (lambda: client(auth_method="password"), "client 'acme': auth_method 'password'"),
        (lambda: client(client_secret=None), "needs a client_secret"),
        (lambda: client(mint_attempts=0), "mint_attempts"),
        (lambda: client(refresh_ahead=1.0), "refresh_ahead"),
        (lambda: client(token_request_format="xml"), "token_request_format"),
        (lambda: route(path_prefix=None), "route 'r': needs a host or a path_prefix"),
        (lambda: route(timeout=0), "timeout"),
        (lambda: CacheConfig(backend="memcached"), "backend 'memcached'"),  # type: ignore[arg-type]
        (lambda: CacheConfig(backend="redis"), "redis needs a url"),
        (lambda: InboundLimits(max_headers=0), "max_headers"),
        (lambda: LogConfig(level="loud"), "level 'loud'"),  # type: ignore[arg-type]
        (
            lambda: Config("127.0.0.1", 0, {"acme": client()}, (route(client="other"),)),
            "client 'other' is not defined",
        ),
        (
            lambda: Config("127.0.0.1", 0, {"acme": client()}, (route(), route())),
            "unique",
        ),
        (lambda: Config("127.0.0.1", 0, {}, (), workers=0), "workers"),
    ],
)
def test_a_model_built_in_code_is_validated(build: object, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        build()  # type: ignore[operator]


def test_a_config_cannot_be_changed_after_it_is_built() -> None:
    clients = {"acme": client()}
    config = Config("127.0.0.1", 0, clients, (route(),))
    clients["intruder"] = client(name="intruder")  # the caller's dict is not the config's
    assert list(config.clients) == ["acme"]
    with pytest.raises(TypeError):
        config.clients["other"] = client(name="other")  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.routes = ()  # type: ignore[misc]
