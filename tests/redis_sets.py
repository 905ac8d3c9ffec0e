"""Real Redis topologies on loopback for the cache tests (issue 17): a
Sentinel set (a primary, a replica, three sentinels) and a three-primary
Cluster, made of Debian's ``redis-server`` (run with ``--sentinel`` for the
sentinels) and ``redis-cli --cluster create``."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

from conftest import RedisProcess, free_port, redis_binary

SERVICE = "authproxy-primary"


def _cli(port: int, *args: str) -> str:
    cli = shutil.which("redis-cli")
    assert cli is not None, "redis-cli comes with redis-server (apt-get install redis-server)"
    return subprocess.run(  # noqa: S603 - our own fixed argv
        [cli, "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True, text=True, timeout=30, check=False,
    ).stdout  # fmt: skip


def _wait(condition: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise RuntimeError(f"redis test set: {what} within {timeout:g}s")


class SentinelSet:
    """A primary, one replica and three sentinels that agree (quorum 2) and
    fail over within about two seconds of the primary's death."""

    def __init__(self, directory: Path) -> None:
        binary = redis_binary()
        directory.mkdir(parents=True, exist_ok=True)
        self.primary = RedisProcess(binary, str(directory / "primary"))
        self.replica = RedisProcess(binary, str(directory / "replica"))
        for server in (self.primary, self.replica):
            Path(server.directory).mkdir(parents=True, exist_ok=True)
        self.replica.extra = ("--replicaof", "127.0.0.1", str(self.primary.port))
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.directory = directory
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self._binary = binary

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        _wait(lambda: "master_link_status:up" in _cli(self.replica.port, "INFO", "replication"),
              "the replica syncs")  # fmt: skip
        for port in self.sentinel_ports:
            conf = self.directory / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 4000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self.sentinels.append(
                subprocess.Popen(  # noqa: S603 - our own fixed argv
                    [self._binary, str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in self.sentinel_ports:
            _wait(lambda port=port: str(self.replica.port) in _cli(port, "SENTINEL", "replicas", SERVICE),
                  "every sentinel knows the replica")  # fmt: skip
        _wait(lambda: all(
            _cli(port, "SENTINEL", "sentinels", SERVICE).count("name") >= 2 for port in self.sentinel_ports
        ), "the sentinels know each other")  # fmt: skip

    def primary_port(self) -> int:
        answer = _cli(self.sentinel_ports[0], "SENTINEL", "get-master-addr-by-name", SERVICE)
        return int(answer.split()[1])

    def kill_primary(self) -> None:
        """The primary dies (SIGKILL); the sentinels promote the replica."""
        assert self.primary.process is not None
        self.primary.process.kill()
        self.primary.process.wait(10)
        self.primary.process = None

    def wait_failover(self) -> None:
        _wait(lambda: self.primary_port() == self.replica.port, "the sentinels promote the replica")

    def stop(self) -> None:
        for process in self.sentinels:
            process.terminate()
            process.wait(10)
        self.replica.stop()
        self.primary.stop()


class ClusterSet:
    """Three primaries, no replicas, slots split evenly."""

    def __init__(self, directory: Path) -> None:
        binary = redis_binary()
        self.nodes: list[RedisProcess] = []
        for i in range(3):
            node_dir = directory / f"node-{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            node = RedisProcess(binary, str(node_dir))
            node.port = _cluster_port()  # its bus is port + 10000, which must exist
            node.extra = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                          "--cluster-node-timeout", "1000")  # fmt: skip
            self.nodes.append(node)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        out = subprocess.run(  # noqa: S603 - our own fixed argv
            [shutil.which("redis-cli") or "redis-cli", "--cluster", "create", *addresses, "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-500:]}")
        _wait(lambda: all("cluster_state:ok" in _cli(n.port, "CLUSTER", "INFO") for n in self.nodes),
              "the cluster is ok")  # fmt: skip

    def node_of(self, key: str) -> RedisProcess:
        slot = int(_cli(self.nodes[0].port, "CLUSTER", "KEYSLOT", key).strip())
        for line in _cli(self.nodes[0].port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            for span in fields[8:]:
                low, _, high = span.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(key)

    def migrate_slot(self, key: str, to: RedisProcess) -> None:
        """Move the slot of ``key`` (and its keys) to ``to``, as resharding does."""
        source = self.node_of(key)
        slot = _cli(source.port, "CLUSTER", "KEYSLOT", key).strip()
        ids = {n.port: _cli(n.port, "CLUSTER", "MYID").strip() for n in self.nodes}
        _cli(to.port, "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source.port])
        _cli(source.port, "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[to.port])
        while True:
            keys = _cli(source.port, "CLUSTER", "GETKEYSINSLOT", slot, "100").split()
            if not keys:
                break
            _cli(source.port, "MIGRATE", "127.0.0.1", str(to.port), "", "0", "5000", "KEYS", *keys)
        for node in self.nodes:
            _cli(node.port, "CLUSTER", "SETSLOT", slot, "NODE", ids[to.port])

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_port() -> int:
    """A free port below 55536 whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = random.randrange(20000, 45000)
        if _free(port) and _free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def reachable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
    except OSError:
        return False
    return True
