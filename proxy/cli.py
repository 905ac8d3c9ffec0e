"""The ``authproxy`` command: serve, check, demo."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from proxy.config.load import config_path, load_config
from proxy.errors import ConfigError
from proxy.http1 import compat
from proxy.log import configure_logging


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run, on uvloop when it is installed (``authproxy[speed]``)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="authproxy",
        description="Authenticating egress proxy for OAuth 2.0 client-credentials partners.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    help_config = "config file (default: $AUTHPROXY_CONFIG, then ./proxy.yaml)"
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help=help_config)
    serve.add_argument("--log-level", help="overrides log.level")
    serve.add_argument("--workers", type=int, help="worker processes (overrides workers:)")
    check = commands.add_parser("check", help="validate the config and exit")
    check.add_argument("--config", help=help_config)
    token = commands.add_parser(
        "token", help="mint one token for CLIENT and print its metadata (never the token)"
    )
    token.add_argument("client")
    token.add_argument("--config", help=help_config)
    token.add_argument("--scope", help="scope to ask for (default: the client's)")
    commands.add_parser("demo", help="run a self-contained demo against local mock servers")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from proxy.demo import run_demo

        return int(_run(run_demo()))
    path = config_path(args.config)
    try:
        if args.command in ("serve", "check"):
            compat.check()  # the lean engine's aiohttp internals, before anything runs
        config = load_config(path)
    except ConfigError as exc:
        print(f"authproxy: {exc}", file=sys.stderr)
        return 1
    if args.command == "check":
        print(f"{path}: OK ({len(config.clients)} clients, {len(config.routes)} routes)")
        return 0
    if args.command == "token":
        from proxy.tokens.tokeninfo import inspect_token

        configure_logging("warning")  # the mint line goes to stderr; stdout is the JSON
        return int(_run(inspect_token(config, args.client, args.scope)))
    configure_logging(args.log_level or config.log.level, log_format=config.log.format)
    from proxy.server import WORKER_PORT_ENV, serve_forever

    workers = args.workers or config.workers
    try:
        if workers > 1 and WORKER_PORT_ENV not in os.environ:
            from proxy.ops.supervisor import Supervisor

            return Supervisor(config, path, workers).run()
        _run(serve_forever(config))
    except OSError as exc:
        print(
            f"authproxy: cannot listen on {config.listen_host}:{config.listen_port}: "
            f"{exc.strerror}",
            file=sys.stderr,
        )
        return 1
    return 0
