"""``workers: N``: a small supervisor of N worker processes on one port.

Why our own and not gunicorn: the workers are plain ``authproxy serve``
processes (same code path as one process, same signals, same config file);
the supervisor's whole job is ~150 lines: reserve the port, start N workers
that bind it with SO_REUSEPORT (the kernel spreads connections across them),
restart one that dies, and forward SIGTERM/SIGINT (draining stop) and SIGHUP.
gunicorn would add a dependency, its own config surface and its aiohttp worker
class, which runs ``web.Application`` rather than our low-level server.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Final

from proxy.config.model import Config
from proxy.log import get_logger
from proxy.metrics import MULTIPROC_ENV, mark_worker_dead
from proxy.server import ADMIN_PORT_ENV, RUNTIME_DIR_ENV, WORKER_PORT_ENV

RESTART_BACKOFF_MAX: Final = 10.0  # seconds between restarts of a worker that keeps dying
QUICK_DEATH: Final = 2.0  # a worker dying sooner than this after start counts as crashing
log = get_logger("proxy.supervisor")


def runtime_base() -> str | None:
    """Where the workers' shared token files go: ``$AUTHPROXY_RUNTIME_BASE``, else
    ``/dev/shm`` (memory, never written to disk) when writable, else the temp dir."""
    chosen = os.environ.get("AUTHPROXY_RUNTIME_BASE")
    if chosen:
        return chosen
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):  # noqa: S108
        return "/dev/shm"  # noqa: S108 - mkdtemp makes a private 0700 directory inside
    return None


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) so that port 0 becomes a concrete port shared
    by the workers; a bound, non-listening socket receives no connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Supervisor:
    def __init__(self, config: Config, config_path: str, workers: int) -> None:
        self.config = config
        self.config_path = config_path
        self.workers = workers
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.started_at: dict[int, float] = {}
        self.failures: dict[int, int] = {}
        self.restart_at: dict[int, float] = {}
        self.stopping = False
        self.pending_hup = False
        self.admin_port: int | None = None

    def _spawn(self, slot: int, port: int, runtime: str) -> None:
        env = {
            **os.environ,
            WORKER_PORT_ENV: str(port),
            RUNTIME_DIR_ENV: runtime,
            MULTIPROC_ENV: os.path.join(runtime, "metrics"),
            "AUTHPROXY_WORKER_ID": str(slot),
        }
        if self.admin_port is not None:
            env[ADMIN_PORT_ENV] = str(self.admin_port)
        # The command line's log overrides reach the workers too (the
        # supervisor's config already holds them).
        log = self.config.log
        command = [
            sys.executable, "-m", "proxy", "serve", "--config", self.config_path,
            "--log-level", log.level, "--log-format", log.format,
        ]  # fmt: skip
        self.children[slot] = subprocess.Popen(command, env=env)  # noqa: S603
        self.started_at[slot] = time.monotonic()

    def _on_stop(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def _on_hup(self, signum: int, _frame: object) -> None:
        self.pending_hup = True

    def run(self) -> int:
        reserved = reserve_port(self.config.listen_host, self.config.listen_port)
        port = reserved.getsockname()[1]
        admin_reserved = None
        if self.config.admin is not None:
            admin_reserved = reserve_port(self.config.admin.host, self.config.admin.port)
            self.admin_port = admin_reserved.getsockname()[1]
        runtime = tempfile.mkdtemp(prefix="authproxy-", dir=runtime_base())  # 0700: tokens
        os.mkdir(os.path.join(runtime, "metrics"))
        # The supervisor itself imports prometheus_client only through mark_worker_dead,
        # which needs the same directory.
        os.environ[MULTIPROC_ENV] = os.path.join(runtime, "metrics")
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        try:
            for slot in range(self.workers):
                self._spawn(slot, port, runtime)
            log.info(
                "supervisor_listening",
                host=self.config.listen_host,
                port=port,
                admin_port=self.admin_port,
                workers=self.workers,
                pids=[child.pid for child in self.children.values()],
            )
            while not self.stopping:
                self._tick(port, runtime)
                time.sleep(0.1)
            self._stop_all()
        finally:
            reserved.close()
            if admin_reserved is not None:
                admin_reserved.close()
            shutil.rmtree(runtime, ignore_errors=True)
        log.info("supervisor_stopped")
        return 0

    def _tick(self, port: int, runtime: str) -> None:
        if self.pending_hup:
            self.pending_hup = False
            for child in self.children.values():
                if child.poll() is None:
                    child.send_signal(signal.SIGHUP)
        now = time.monotonic()
        for slot, child in list(self.children.items()):
            code = child.poll()
            if code is None:
                continue
            if slot not in self.restart_at:
                quick = now - self.started_at[slot] < QUICK_DEATH
                self.failures[slot] = self.failures.get(slot, 0) + 1 if quick else 0
                delay = min(RESTART_BACKOFF_MAX, 0.5 * 2 ** self.failures[slot]) if quick else 0.0
                self.restart_at[slot] = now + delay
                log.warning(
                    "worker_exited", slot=slot, pid=child.pid, code=code, restart_in_s=delay
                )
                mark_worker_dead(child.pid)
            if now >= self.restart_at[slot]:
                del self.restart_at[slot]
                self._spawn(slot, port, runtime)
                log.info("worker_restarted", slot=slot, pid=self.children[slot].pid)

    def _stop_all(self) -> None:
        log.info("supervisor_stopping", workers=len(self.children))
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_grace + 5
        for child in self.children.values():
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker_killed", pid=child.pid)
                child.kill()
                child.wait()
