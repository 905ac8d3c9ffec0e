"""Blind CONNECT tunnels (issue 14): bytes relayed between an app and an
``egress.tunnel`` host, both ways, as they come; no token, no look inside.

Flow control is each side's: a side whose writes back up stops the other
side's reads until it drains. Half-closes pass through (an app that shuts
its write side lets the host finish its answer). The tunnel ends when both
sides have closed, either side is lost, or no byte moved either way for
``egress.tunnel_idle_timeout``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from proxy.errors import ConnectFailed, ConnectTimedOut, os_reason

Count = Callable[[int], None]


class AppEnd(Protocol):
    """The app's connection, as the relay needs it (listener.AppConnection)."""

    transport: asyncio.Transport | None

    def write(self, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class RelayResult:
    up: int  # bytes from the app to the host
    down: int  # bytes from the host to the app
    ended: str  # closed, idle, app_lost, host_lost, shutdown


class _HostSide(asyncio.Protocol):
    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def data_received(self, data: bytes) -> None:
        self._relay.down(data)

    def eof_received(self) -> bool:
        self._relay.host_eof()
        return True  # keep our write side open: the app may still be sending

    def connection_lost(self, exc: BaseException | None) -> None:
        self._relay.end("host_lost" if exc is not None else "closed")

    def pause_writing(self) -> None:
        self._relay.pause(self._relay.app.transport)

    def resume_writing(self) -> None:
        self._relay.resume(self._relay.app.transport)


class Relay:
    """One tunnel. :meth:`open` connects to the host; then the app's bytes
    go to :meth:`up`, the app's EOF to :meth:`app_eof`, and :meth:`wait`
    returns when the tunnel has ended."""

    def __init__(self, app: AppEnd, idle_timeout: float, on_up: Count, on_down: Count) -> None:
        self.app = app
        self._loop = asyncio.get_running_loop()
        self._idle_timeout = idle_timeout
        self._on_up = on_up
        self._on_down = on_down
        self._host: asyncio.Transport | None = None
        self._up = 0
        self._down = 0
        self._app_eof = False
        self._host_eof = False
        self._last = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._done: asyncio.Future[str] = self._loop.create_future()

    async def open(self, host: str, port: int, connect_timeout: float) -> None:
        """Connect to ``host:port``; raises ConnectTimedOut or ConnectFailed
        (naming the host, never the app's bytes)."""
        try:
            async with asyncio.timeout(connect_timeout):
                transport, _ = await self._loop.create_connection(
                    lambda: _HostSide(self), host, port
                )
        except TimeoutError:
            raise ConnectTimedOut(
                f"{host}:{port} did not accept within {connect_timeout:g}s (tunnel_connect_timeout)"
            ) from None
        except socket.gaierror as exc:
            raise ConnectFailed(f"cannot resolve {host}: {exc.strerror}") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {host}:{port}: {os_reason(exc)}") from None
        self._host = transport
        self._arm()

    def up(self, data: bytes) -> None:
        host = self._host
        if host is None or host.is_closing() or not data:
            return
        host.write(data)
        self._up += len(data)
        self._on_up(len(data))
        self._last = self._loop.time()

    def down(self, data: bytes) -> None:
        self.app.write(data)
        self._down += len(data)
        self._on_down(len(data))
        self._last = self._loop.time()

    def app_eof(self) -> None:
        self._app_eof = True
        if self._host is not None and self._host.can_write_eof():
            self._host.write_eof()
        if self._host_eof:
            self.end("closed")

    def host_eof(self) -> None:
        self._host_eof = True
        app = self.app.transport
        if app is not None and app.can_write_eof():
            app.write_eof()
        else:
            self.end("closed")
            return
        if self._app_eof:
            self.end("closed")

    def pause(self, transport: asyncio.BaseTransport | None) -> None:
        if isinstance(transport, asyncio.ReadTransport):
            try:
                transport.pause_reading()
            except (AttributeError, NotImplementedError, RuntimeError):
                pass

    def resume(self, transport: asyncio.BaseTransport | None) -> None:
        if isinstance(transport, asyncio.ReadTransport):
            try:
                transport.resume_reading()
            except (AttributeError, NotImplementedError, RuntimeError):
                pass

    def app_paused(self) -> None:
        """The app's side is not draining: stop reading the host."""
        self.pause(self._host)

    def app_resumed(self) -> None:
        self.resume(self._host)

    def end(self, why: str) -> None:
        """Close both sides (once); :meth:`wait` returns ``why``."""
        if self._done.done():
            return
        self._done.set_result(why)
        if self._timer is not None:
            self._timer.cancel()
        if self._host is not None:
            self._host.close()
        if self.app.transport is not None:
            self.app.transport.close()

    async def wait(self) -> RelayResult:
        try:
            ended = await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self.end("app_lost")
            raise
        return RelayResult(self._up, self._down, ended)

    def _arm(self) -> None:
        self._timer = self._loop.call_at(self._last + self._idle_timeout, self._idle)

    def _idle(self) -> None:
        if self._loop.time() >= self._last + self._idle_timeout:
            self.end("idle")
        else:
            self._arm()
