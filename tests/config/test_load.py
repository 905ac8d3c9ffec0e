"""proxy.yaml validation: good files become frozen objects, bad ones one clear message."""

import dataclasses
import os
import re
from pathlib import Path

import pytest

from proxy.config.load import config_path, expand_env, load_config, parse_config
from proxy.config.model import AdminConfig
from proxy.errors import ConfigError

GOOD = """\
listen: 127.0.0.1:8080
clients:
  acme:
    token_url: https://auth.acme.example/oauth2/token
    client_id: ${ACME_ID}
    client_secret: ${ACME_SECRET:-fallback}
    auth_method: client_secret_post
    scope: orders.read
    params: {audience: https://api.acme.example}
    expiry_margin: 45s
    refresh_ahead: 20%
    default_lifetime: 5m
    remint_min_interval: 2s
    timeout: 1500ms
routes:
  - name: acme-orders
    match: {path_prefix: /acme/, host: Orders.Acme.Example}
    upstream: https://api.acme.example/v2/
    client: acme
    scope: orders.read orders.write
    timeout: 30s
    connect_timeout: 2s
    replay_limit: 512KiB
    expired_token:
      www_authenticate: 'error="token_expired"'
      body: '"code":\\s*"TOKEN_EXPIRED"'
  - match: {path_prefix: /b}
    upstream: http://b.example
    client: acme
"""

ENV = {"ACME_ID": "id-1"}

BASE = """\
listen: 127.0.0.1:8080
clients:
  acme:
    token_url: https://auth.example/token
    client_id: id
    client_secret: ${S:-s}
routes:
  - match: {path_prefix: /a/}
    upstream: https://api.example/
    client: acme
"""


def test_good_config_parses_into_frozen_objects() -> None:
    config = parse_config(GOOD, "proxy.yaml", ENV)
    client = config.clients["acme"]
    assert client.client_id == "id-1" and client.client_secret == "fallback"
    assert client.auth_method == "client_secret_post"
    assert client.params == (("audience", "https://api.acme.example"),)
    assert (client.expiry_margin, client.refresh_ahead, client.default_lifetime) == (45, 0.2, 300)
    assert (client.remint_min_interval, client.timeout) == (2, 1.5)
    first, second = config.routes
    assert first.host == "orders.acme.example" and first.path_prefix == "/acme/"
    assert first.scope == "orders.read orders.write"
    assert first.replay_limit == 512 * 1024 and first.connect_timeout == 2
    assert first.expired_token.www_authenticate is not None
    assert first.expired_token.body is not None and first.expired_token.body.search(
        b'"code": "TOKEN_EXPIRED"'
    )
    assert second.name == "route-1" and second.scope == "orders.read"  # the client's scope
    assert (second.timeout, second.replay_limit) == (30, 1024 * 1024)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.timeout = 1  # type: ignore[misc]
    assert "fallback" not in repr(client)


def test_operations_keys() -> None:
    config = parse_config(GOOD, "proxy.yaml", ENV)
    assert config.admin is None and config.access_log is True
    assert config.shutdown_grace == 20 and config.log.level == "info"
    text = GOOD.replace("    timeout: 1500ms\n", "    timeout: 1500ms\n    warm: true\n")
    text += "admin: 127.0.0.1:9090\nshutdown_grace: 5s\naccess_log: false\n"
    text += "log: {level: WARNING, format: console}\n"
    config = parse_config(text, "proxy.yaml", ENV)
    assert config.admin == AdminConfig("127.0.0.1", 9090) and config.shutdown_grace == 5
    assert config.access_log is False and config.clients["acme"].warm is True
    assert (config.log.level, config.log.format) == ("warning", "console")


def replace(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            replace("    timeout: 30s\n", "    timeout: soon\n"),
            r"proxy.yaml:21: routes\[0\].timeout: expected a duration",
        ),
        (
            replace("    scope: orders.read\n", "    scope: orders.read\n    colour: blue\n"),
            r"proxy.yaml:9: clients.acme.colour: unknown key",
        ),
        (
            replace(
                "client: acme\n    scope: orders.read orders.write", "client: nobody\n    scope: x"
            ),
            r"routes\[0\].client: no client named 'nobody' \(clients: acme\)",
        ),
        (
            replace("${ACME_ID}", "${MISSING_VAR}"),
            r":5: clients.acme.client_id: environment variable MISSING_VAR is not set",
        ),
        (replace("client_secret_post", "magic"), r"clients.acme.auth_method: expected one of"),
        (
            replace("https://api.acme.example/v2/", "ftp://x/"),
            r"routes\[0\].upstream: expected an http",
        ),
        (
            replace("match: {path_prefix: /b}", "match: {}"),
            r"routes\[1\].match: needs path_prefix, host, or both",
        ),
        (
            replace("match: {path_prefix: /b}", "match: {path_prefix: b}"),
            r"routes\[1\].match.path_prefix: expected a path starting with /",
        ),
        (
            replace("refresh_ahead: 20%", "refresh_ahead: 150%"),
            r"clients.acme.refresh_ahead: expected a share",
        ),
        (replace("listen: 127.0.0.1:8080", "listen: nowhere"), r"listen: expected host:port"),
        (
            replace("replay_limit: 512KiB", "replay_limit: huge"),
            r"routes\[0\].replay_limit: expected a size",
        ),
        (
            replace('body: \'"code":\\s*"TOKEN_EXPIRED"\'', "body: '(('"),
            r"routes\[0\].expired_token.body: invalid regular expression",
        ),
        ("clients: {}\nroutes: []\n", r"clients: define at least one client"),
        ("listen: [1\n", r"proxy.yaml:\d+: not valid YAML"),
        ("", r"the file is empty"),
        (replace("    client_id: ${ACME_ID}\n", ""), r"clients.acme.client_id: is required"),
        (
            replace(
                "  - match: {path_prefix: /b}",
                "  - name: acme-orders\n    match: {path_prefix: /b}",
            ),
            r"duplicate route name 'acme-orders'",
        ),
        (GOOD + "admin: 127.0.0.1:8080\n", r"proxy.yaml:\d+: admin: must not be the same"),
        (GOOD + "admin: somewhere\n", r"admin: expected host:port"),
        (GOOD + "log: {level: loud}\n", r"log.level: expected one of debug, error, info"),
        (GOOD + "log: {format: xml}\n", r"log.format: expected json or console, got 'xml'"),
        (GOOD + "access_log: maybe\n", r"access_log: expected true or false"),
        (GOOD + "shutdown_grace: forever\n", r"shutdown_grace: expected a duration"),
        (replace("    timeout: 1500ms\n", "    timeout: 1500ms\n    warm: 1\n"), r"warm: expected"),
    ],
)
def test_bad_configs_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text, "proxy.yaml", ENV)


def test_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    text = replace("client_secret: ${ACME_SECRET:-fallback}", f"client_secret_file: {secret}")
    assert parse_config(text, "p.yaml", ENV).clients["acme"].client_secret == "s3cret"
    missing = replace(
        "client_secret: ${ACME_SECRET:-fallback}", f"client_secret_file: {tmp_path}/nope"
    )
    with pytest.raises(ConfigError, match=r"clients.acme.client_secret_file: cannot read"):
        parse_config(missing, "p.yaml", ENV)


def test_env_expansion() -> None:
    assert expand_env("a${X}b${Y:-d}$$", {"X": "1"}) == "a1bd$"
    with pytest.raises(KeyError):
        expand_env("${NOPE}", {})


def test_config_path_precedence() -> None:
    assert config_path("a.yaml", {"AUTHPROXY_CONFIG": "b.yaml"}) == "a.yaml"
    assert config_path(None, {"AUTHPROXY_CONFIG": "b.yaml"}) == "b.yaml"
    assert config_path(None, {}) == "proxy.yaml"


def test_shipped_example_is_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "ACME_CLIENT_ID": "id", "ACME_CLIENT_SECRET": "secret"}
    config = load_config(str(root / "proxy.yaml"), env)
    assert config.routes
    assert all(re.match(r"^[a-z0-9-]+$", r.name) for r in config.routes)


def test_unreadable_file() -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config("/nonexistent/proxy.yaml")


def test_admin_long_form_and_its_rules(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text("t0ken\n")
    token.chmod(0o600)
    text = GOOD + f"admin: {{listen: 0.0.0.0:9090, auth_token_file: {token}}}\n"
    config = parse_config(text, "proxy.yaml", ENV)
    assert config.admin == AdminConfig("0.0.0.0", 9090, str(token), False)  # noqa: S104
    with pytest.raises(ConfigError, match="beyond loopback, with no auth_token_file"):
        parse_config(text.replace(f", auth_token_file: {token}", ""), "proxy.yaml", ENV)
    opened = parse_config(
        text.replace(f"auth_token_file: {token}", "allow_unauthenticated: true"), "proxy.yaml", ENV
    )
    assert opened.admin is not None and opened.admin.allow_unauthenticated
    assert any("unauthenticated admin port" in w for w in opened.warnings)
    with pytest.raises(ConfigError, match="beyond loopback"):
        parse_config(
            text.replace(f"{{listen: 0.0.0.0:9090, auth_token_file: {token}}}", "0.0.0.0:9090"),
            "proxy.yaml",
            ENV,
        )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            GOOD.replace("token_url:", "token_ulr:"),
            "proxy.yaml:4: clients.acme.token_ulr: unknown key (did you mean 'token_url'?)",
        ),
        (
            GOOD.replace("    scope: orders.read\n", "    scopee: orders.read\n", 1),
            "proxy.yaml:8: clients.acme.scopee: unknown key (did you mean 'scope'?)",
        ),
        (
            "listen: 127.0.0.1:1\nclients:\nroutes: []\n",
            "proxy.yaml:2: clients: is empty; define at least one client",
        ),
        (
            "listen: 127.0.0.1:1\nclients: [1]\nroutes: []\n",
            "proxy.yaml:2: clients: expected a mapping, got a list",
        ),
        # unknown keys first, even when a required key is missing too
        (
            BASE.replace("    client_id: id\n", "    colour: blue\n"),
            "proxy.yaml:5: clients.acme.colour: unknown key",
        ),
        (
            BASE.replace("listen:", "listne:"),
            "proxy.yaml:1: listne: unknown key (did you mean 'listen'?)",
        ),
        (
            BASE.replace("clients:", "client:").replace("routes:", "rutes:"),
            "proxy.yaml:2: client: unknown key (did you mean 'clients'?)",
        ),
        (
            BASE.replace("    upstream:", "    upstrem:"),
            "proxy.yaml:9: routes[0].upstrem: unknown key (did you mean 'upstream'?)",
        ),
        (
            BASE.replace("{path_prefix: /a/}", "{path_prefx: /a/}"),
            "proxy.yaml:8: routes[0].match.path_prefx: unknown key (did you mean 'path_prefix'?)",
        ),
        # a missing or empty section points at the line of its key, or of its parent
        (
            "listen: 127.0.0.1:1\nroutes: []\n",
            "proxy.yaml:1: clients: is required (define at least one client)",
        ),
        (
            BASE.split("routes:")[0],
            "proxy.yaml:1: routes: is required; give a list of routes",
        ),
        (
            BASE.split("  - match")[0],
            "proxy.yaml:7: routes: is empty; give a list of routes",
        ),
        (
            BASE.replace("    token_url: https://auth.example/token\n", "", 1)
            .replace("    client_id: id\n", "")
            .replace("    client_secret: ${S:-s}\n", ""),
            "proxy.yaml:3: clients.acme: is empty; expected token_url, client_id and its other keys",
        ),
        (
            BASE.replace("    token_url: https://auth.example/token\n", ""),
            "proxy.yaml:3: clients.acme.token_url: is required",
        ),
        (
            BASE.replace("  - match: {path_prefix: /a/}\n    upstream", "  - upstream"),
            "proxy.yaml:8: routes[0].match: is required (path_prefix, host, or both)",
        ),
        (
            BASE.replace("{path_prefix: /a/}", ""),
            "proxy.yaml:8: routes[0].match: is empty; path_prefix, host, or both",
        ),
        # wrong types, in plain words
        (
            BASE.replace(
                "routes:\n  - match: {path_prefix: /a/}\n    upstream: https://api.example/\n"
                "    client: acme\n",
                "routes: {a: 1}\n",
            ),
            "proxy.yaml:7: routes: expected a non-empty list of routes, got a mapping",
        ),
        (
            BASE.replace(
                "  - match: {path_prefix: /a/}\n    upstream: https://api.example/\n"
                "    client: acme\n",
                "  - /a/\n",
            ),
            "proxy.yaml:7: routes[0]: expected a mapping, got text",
        ),
        (
            BASE.replace("token_url: https://auth.example/token", "token_url: [a]"),
            "proxy.yaml:4: clients.acme.token_url: expected a URL, got a list",
        ),
        (
            BASE.replace("client_id: id", "client_id: {a: 1}"),
            "proxy.yaml:5: clients.acme.client_id: expected text, got a mapping",
        ),
        (
            BASE.replace("client_id: id", "client_id:"),
            "proxy.yaml:5: clients.acme.client_id: is required",
        ),
        (
            BASE + "workers: {n: 2}\n",
            "proxy.yaml:11: workers: expected a whole number of workers from 1 to 64, got a mapping",
        ),
        (
            BASE + "workers: 0\n",
            "proxy.yaml:11: workers: expected a whole number of workers from 1 to 64, got 0",
        ),
        (
            BASE.replace("listen: 127.0.0.1:8080", "listen: [1]"),
            "proxy.yaml:1: listen: expected host:port like 127.0.0.1:8080, got a list",
        ),
        (
            BASE + "access_log: [yes]\n",
            "proxy.yaml:11: access_log: expected true or false, got a list",
        ),
        (BASE + "log: verbose\n", "proxy.yaml:11: log: expected a mapping, got text"),
        (
            BASE + "log: {level: verbose}\n",
            "proxy.yaml:11: log.level: expected one of debug, error, info, warning, got 'verbose'",
        ),
        (BASE + "1: x\n", "proxy.yaml:11: keys must be text, got 1"),
        (BASE + "workers: 2\nworkers: 3\n", "proxy.yaml:12: duplicate key 'workers'"),
    ],
)
def test_errors_name_the_typo_and_the_line_in_plain_words(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "proxy.yaml", ENV)
    assert str(raised.value) == message
    assert not re.search(r"NoneType|\b(dict|str|int|float|bool)\b", str(raised.value))


@pytest.mark.parametrize(
    ("admin", "message"),
    [
        (
            "admin:",
            "proxy.yaml:11: admin: is empty; give host:port, or "
            "{listen: host:port, auth_token_file: path}",
        ),
        (
            "admin: {listen: 127.0.0.1:9090, auth_token: x}",
            "proxy.yaml:11: admin.auth_token: unknown key (did you mean 'auth_token_file'?)",
        ),
        (
            "admin: {allow_unauthenticated: true}",
            "proxy.yaml:11: admin.listen: is required (host:port of the admin listener)",
        ),
        (
            "admin: {listen: 127.0.0.1:9090, allow_unauthenticated: maybe}",
            "proxy.yaml:11: admin.allow_unauthenticated: expected true or false, got 'maybe'",
        ),
        (
            "admin: {listen: 127.0.0.1:9090, auth_token_file: /nonexistent/token}",
            "proxy.yaml:11: admin.auth_token_file: cannot read file '/nonexistent/token'",
        ),
        (
            "admin: :9090",
            "proxy.yaml:11: admin: listens on 0.0.0.0, beyond loopback, with no "
            "auth_token_file: set admin.auth_token_file (or admin.allow_unauthenticated: true)",
        ),
        (
            "admin:\n  listen: 127.evil.example:9090",
            "proxy.yaml:11: admin: listens on 127.evil.example, beyond loopback, with no "
            "auth_token_file: set admin.auth_token_file (or admin.allow_unauthenticated: true)",
        ),
        (
            "admin: {listen: '[::]:9090', allow_unauthenticated: false}",
            "proxy.yaml:11: admin: listens on ::, beyond loopback, with no "
            "auth_token_file: set admin.auth_token_file (or admin.allow_unauthenticated: true)",
        ),
    ],
)
def test_admin_errors(admin: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(BASE + admin + "\n", "proxy.yaml", ENV)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:9090", "127.8.9.10:9090", "localhost:9090", "[::1]:9090"]
)
def test_admin_on_loopback_needs_no_token(listen: str) -> None:
    for text in (f"admin: '{listen}'", f"admin: {{listen: '{listen}'}}"):
        config = parse_config(BASE + text + "\n", "proxy.yaml", ENV)
        assert config.admin is not None and config.admin.auth_token_file is None
        assert config.warnings == ()


def test_admin_token_file_is_checked_and_kept_as_a_path(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text("  \n")
    text = BASE + f"admin:\n  listen: 0.0.0.0:9090\n  auth_token_file: {token}\n"
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "proxy.yaml", ENV)
    assert str(raised.value) == f"proxy.yaml:13: admin.auth_token_file: '{token}' is empty"
    token.write_text("s3cret-admin-token\n")
    token.chmod(0o644)
    config = parse_config(text, "proxy.yaml", ENV)
    assert config.admin == AdminConfig("0.0.0.0", 9090, str(token), False)  # noqa: S104
    assert "s3cret-admin-token" not in repr(config)  # the server reads the file itself
    assert config.warnings == (
        f"proxy.yaml:13: admin.auth_token_file: '{token}' is readable by group or others "
        "(mode 0644); chmod 600 it",
    )
    token.chmod(0o600)
    assert parse_config(text, "proxy.yaml", ENV).warnings == ()


def test_unauthenticated_admin_beyond_loopback_is_a_warning() -> None:
    text = BASE + "admin: {listen: 10.0.0.7:9090, allow_unauthenticated: true}\n"
    config = parse_config(text, "proxy.yaml", ENV)
    assert config.admin == AdminConfig("10.0.0.7", 9090, None, True)
    assert config.warnings == (
        "proxy.yaml:11: admin: unauthenticated admin port on 10.0.0.7: whoever reaches it "
        "can reload and drop tokens; set admin.auth_token_file",
    )
