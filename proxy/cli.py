"""The ``authproxy`` command: serve, check, token, ca, demo.

Exit codes: 0 success, 1 a configuration or bind error (the message names the
file, line and key, or the address), 2 a usage error (argparse's: an unknown
flag, or a flag value its YAML key would refuse, with that key's message).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import sys
from collections.abc import Callable, Coroutine, Sequence
from importlib import metadata
from typing import Any

from proxy import __version__
from proxy.config.load import (
    check_log_format,
    check_log_level,
    check_workers,
    config_path,
    load_config,
)
from proxy.config.model import MAX_WORKERS, Config, LogConfig
from proxy.errors import ConfigError
from proxy.http1 import compat
from proxy.log import configure_logging, flush_logs


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run, on uvloop when it is installed (``authproxy[speed]``);
    the lines the loop's last turn gathered are written before it returns."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        pass
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)
    finally:
        flush_logs()


def _as_key(check: Callable[[object], Any]) -> Callable[[str], Any]:
    """An argparse type that holds a flag to its YAML key's rule and message
    (refused, it is a usage error: exit 2, the message as for the key)."""

    def parse(text: str) -> Any:
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="authproxy",
        description="Authenticating egress proxy for OAuth 2.0 client-credentials partners.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"authproxy {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    help_config = "config file (default: $AUTHPROXY_CONFIG, then ./proxy.yaml)"
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("-c", "--config", help=help_config)
    serve.add_argument(
        "--log-level",
        type=_as_key(check_log_level),
        help="overrides log.level (debug, info, warning, error)",
    )
    serve.add_argument(
        "--log-format",
        type=_as_key(check_log_format),
        help="overrides log.format (json, console)",
    )
    serve.add_argument(
        "--workers",
        type=_as_key(check_workers),
        help=f"worker processes, 1 to {MAX_WORKERS} (overrides workers:)",
    )
    check = commands.add_parser("check", help="validate the config, print its warnings, exit")
    check.add_argument("-c", "--config", help=help_config)
    token = commands.add_parser(
        "token", help="mint one token for CLIENT and print its metadata (never the token)"
    )
    token.add_argument("client")
    token.add_argument("-c", "--config", help=help_config)
    token.add_argument("--scope", help="scope to ask for (default: the client's)")
    token.add_argument(
        "--log-format",
        type=_as_key(check_log_format),
        help="overrides log.format (json, console) for the lines on stderr",
    )
    token.add_argument(
        "--drop",
        action="store_true",
        help="instead: discard CLIENT's tokens in the running proxy and its shared cache "
        "(POST /tokens/CLIENT/drop on its admin port)",
    )
    commands.add_parser("demo", help="run a self-contained demo against local mock servers")
    ca = commands.add_parser("ca", help="the egress CA for HTTPS interception (docs/egress.md)")
    ca_commands = ca.add_subparsers(dest="ca_command", required=True)
    init = ca_commands.add_parser(
        "init", help="write a new CA: DIR/ca.pem, and DIR/ca.key (mode 0600)"
    )
    init.add_argument("--out", required=True, metavar="DIR", help="directory to write into")
    init.add_argument(
        "--permit",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name (and the names below it; .NAME: below it only) the CA may sign for; "
        "repeat it. The CA then carries critical name constraints: even its key cannot make "
        "a certificate apps accept for another name",
    )
    init.add_argument("--name", default="authproxy egress CA", help="the CA's common name")
    return parser


def _ca_init(args: argparse.Namespace) -> int:
    try:
        from proxy.egress.ca import create_ca
    except ImportError:
        print(
            "authproxy: ca init needs cryptography: pip install 'authproxy[egress]'",
            file=sys.stderr,
        )
        return 1
    try:
        cert, key = create_ca(args.out, permit=args.permit, name=args.name)
    except (ConfigError, OSError) as exc:
        print(f"authproxy: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {cert} (give it to the apps) and {key} (mode 0600: keep it secret)")
    if not args.permit:
        print(
            "authproxy: warning: no --permit: this CA can sign for any name; "
            "`ca init --permit HOST` limits it to the routed hosts",
            file=sys.stderr,
        )
    return 0


async def _drop(config: Config, client: str) -> int:
    """``authproxy token CLIENT --drop``: ask the running proxy's admin port."""
    import aiohttp

    if config.admin is None:
        print("authproxy: --drop needs the admin port (admin: in the config)", file=sys.stderr)
        return 1
    host = config.admin.host
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104 - any -> loopback
    url = f"http://{'[' + host + ']' if ':' in host else host}:{config.admin.port}"
    headers = {}
    if config.admin.auth_token_file is not None:
        with open(config.admin.auth_token_file, encoding="utf-8") as file:  # noqa: ASYNC230
            headers["Authorization"] = f"Bearer {file.read().strip()}"
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{url}/tokens/{client}/drop", headers=headers) as response,
        ):
            body = await response.text()
    except aiohttp.ClientError as exc:
        print(f"authproxy: cannot reach the admin port at {url}: {exc}", file=sys.stderr)
        return 1
    print(body)
    return 0 if response.status == 200 else 1


def version() -> str:
    """The installed package's version (pyproject.toml), else the source's."""
    try:
        return metadata.version("authproxy")
    except metadata.PackageNotFoundError:
        return __version__


def _with_flags(config: Config, args: argparse.Namespace) -> Config:
    """The config with the command line's overrides (already held to their
    YAML keys' rules by argparse)."""
    changes: dict[str, Any] = {}
    level, form = getattr(args, "log_level", None), getattr(args, "log_format", None)
    if level or form:
        changes["log"] = LogConfig(
            level=level or config.log.level, format=form or config.log.format
        )
    if getattr(args, "workers", None) is not None:
        changes["workers"] = args.workers
    return dataclasses.replace(config, **changes) if changes else config


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from proxy.demo import run_demo

        return int(_run(run_demo()))
    if args.command == "ca":
        return _ca_init(args)
    path = config_path(args.config)
    egress_warnings: tuple[str, ...] = ()
    try:
        if args.command in ("serve", "check"):
            compat.check()  # the lean engine's aiohttp internals, before anything runs
        config = _with_flags(load_config(path), args)
        if args.command in ("serve", "check"):
            from proxy.egress.policy import build_policy

            # The egress CA, read and held to the routes (serve's workers would
            # each refuse it later, one by one).
            egress_warnings = build_policy(config).warnings
    except ConfigError as exc:
        print(f"authproxy: {exc}", file=sys.stderr)
        return 1
    if args.command == "check":
        for warning in (*config.warnings, *egress_warnings):  # serve logs config_warning
            print(f"authproxy: warning: {warning}", file=sys.stderr)
        print(f"{path}: OK ({len(config.clients)} clients, {len(config.routes)} routes)")
        return 0
    if args.command == "token" and args.drop:
        return int(_run(_drop(config, args.client)))
    if args.command == "token":
        from proxy.tokens.tokeninfo import inspect_token

        # The mint line goes to stderr, in the configured format; stdout is the JSON.
        configure_logging("warning", log_format=config.log.format)  # --log-format applied
        return int(_run(inspect_token(config, args.client, args.scope)))
    configure_logging(config.log.level, log_format=config.log.format, gather=True)
    from proxy.server import WORKER_PORT_ENV, serve_forever

    workers = config.workers
    try:
        if workers > 1 and WORKER_PORT_ENV not in os.environ:
            from proxy.ops.supervisor import Supervisor

            return Supervisor(config, path, workers).run()
        _run(serve_forever(config))
    except OSError as exc:
        print(f"authproxy: {_cannot_listen(config, exc)}", file=sys.stderr)
        return 1
    return 0


_BIND_ERROR = re.compile(r"address \('([^']*)', (\d+)[^)]*\): (.*)")


def _cannot_listen(config: Config, exc: OSError) -> str:
    """The bind error, naming the address that failed (the admin port's,
    when it is that one), not always ``listen``'s."""
    reason = exc.strerror or str(exc)
    host, port = config.listen_host, str(config.listen_port)
    found = _BIND_ERROR.search(reason)  # asyncio's "error while attempting to bind on ..."
    if found:
        host, port, reason = found.groups()
    host = f"[{host}]" if ":" in host else host
    return f"cannot listen on {host}:{port}: {reason}"
