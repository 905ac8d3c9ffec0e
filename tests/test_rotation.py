"""Rotating a client's secret without an outage (issue 13), as the runbook in
docs/operations.md does it: the secret lives in a file swapped through a
symlink, the way Kubernetes updates a mounted Secret, and the proxy notices
by itself (watch_interval), with no SIGHUP.

Requests flow the whole time; none may fail. Counted: mints, the token each
partner request carried, the pending-rotation metric."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conftest import Stack, StackFactory, eventually, samples, value
from proxy.config.load import load_config
from proxy.tokens.tokeninfo import inspect_token

WATCH = "watch_interval: 100ms"


class SecretVolume:
    """A Kubernetes-style secret volume: ``secret`` -> ``..data/secret``,
    ``..data`` -> a timestamped directory, swapped atomically."""

    def __init__(self, root: Path, value: str) -> None:
        self.root = root
        self.generation = 0
        self.swap(value)
        (root / "secret").symlink_to("..data/secret")

    def swap(self, value: str) -> None:
        self.generation += 1
        directory = self.root / f"..2026_12_02_{self.generation}"
        directory.mkdir(mode=0o700)
        (directory / "secret").write_text(value + "\n")
        (directory / "secret").chmod(0o400)
        link = self.root / "..data_tmp"
        link.symlink_to(directory.name)
        os.replace(link, self.root / "..data")

    @property
    def path(self) -> str:
        return str(self.root / "secret")


class Traffic:
    """Requests through the proxy every 20 ms until stopped; every status kept."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.statuses: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            async with self.stack.http.get(self.stack.url("/demo/orders")) as response:
                await response.read()
                self.statuses.append(response.status)
            await asyncio.sleep(0.02)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
async def rotating(
    make_stack: StackFactory, tmp_path: Path
) -> AsyncIterator[tuple[Stack, SecretVolume, Path]]:
    volume_dir = tmp_path / "secrets"
    volume_dir.mkdir(mode=0o700)
    volume = SecretVolume(volume_dir, "demo-secret")
    path = tmp_path / "proxy.yaml"
    stack = await make_stack(path=path, top=WATCH + "\nadmin: 127.0.0.1:0", secret_file=volume.path)
    yield stack, volume, path


async def metric(stack: Stack, name: str, **labels: str) -> float:
    async with stack.http.get(stack.proxy.admin_url + "/metrics") as response:
        return value(samples(await response.text()), name, **labels)


async def report(stack: Stack) -> dict[str, object]:
    async with stack.http.get(stack.proxy.admin_url + "/tokens") as response:
        (entry,) = (await response.json())["tokens"]
        return dict(entry)


async def test_the_runbook_rotates_a_secret_with_no_failed_request(
    rotating: tuple[Stack, SecretVolume, Path], tmp_path: Path
) -> None:
    stack, volume, path = rotating
    tokens = stack.tokens
    traffic = Traffic(stack)
    traffic.start()
    await eventually(lambda: len(traffic.statuses) >= 5)
    old_token = tokens.issued[0]
    # 1. Add the new secret at the identity provider (both are valid now).
    tokens.also_accepted.add("secret-2")
    # 2. Check it with `authproxy token`, from a copy of the config that reads it.
    trial = tmp_path / "trial-secret"
    trial.write_text("secret-2\n")
    trial.chmod(0o400)
    trial_config = tmp_path / "trial.yaml"
    trial_config.write_text(path.read_text().replace(volume.path, str(trial)))
    assert await inspect_token(load_config(str(trial_config)), "demo", None) == 0
    assert tokens.mint_count == 2  # the check minted once, with the new secret
    # 3. Swap the mounted file; the proxy notices by itself.
    volume.swap("secret-2")
    await eventually(lambda: tokens.mint_count == 3)
    new_token = tokens.issued[-1]
    await eventually(lambda: stack.partner.requests[-1].token == new_token)
    # 4. The metric says the rotation is done; 5. remove the old secret.
    assert await metric(stack, "authproxy_credentials_rotation_pending", client="demo") == 0
    tokens.client_secret = "secret-2"
    tokens.also_accepted.clear()
    count = len(traffic.statuses)
    await eventually(lambda: len(traffic.statuses) >= count + 5)
    await traffic.stop()
    assert set(traffic.statuses) == {200}, traffic.statuses
    seen = [request.token for request in stack.partner.requests]
    assert set(seen) == {old_token, new_token}
    assert seen.index(new_token) > seen.index(old_token)
    assert seen[seen.index(new_token) :] == [new_token] * (len(seen) - seen.index(new_token))


async def test_a_new_secret_not_yet_valid_breaks_nothing(
    rotating: tuple[Stack, SecretVolume, Path],
) -> None:
    """The operator swapped the file before the identity provider knew the new
    secret: the old token keeps serving, the failure is named, and the
    rotation completes by itself once the provider accepts the secret."""
    stack, volume, _ = rotating
    tokens = stack.tokens
    traffic = Traffic(stack)
    traffic.start()
    await eventually(lambda: len(traffic.statuses) >= 3)
    old_token = tokens.issued[0]
    volume.swap("secret-2")  # not accepted yet
    await eventually(lambda: tokens.calls >= 2)  # the background mint was refused
    entry = await report(stack)
    await eventually(lambda: len(traffic.statuses) >= 10)
    assert entry["rotation_pending"] is True and "demo" in str(entry["last_error"])
    assert entry["cached"] is True  # the old token, still valid
    assert await metric(stack, "authproxy_credentials_rotation_pending", client="demo") == 1
    assert {request.token for request in stack.partner.requests} == {old_token}
    # The provider learns the secret; the circuit's cool-down passes.
    tokens.also_accepted.add("secret-2")
    stack.clock.advance(31)
    await eventually(lambda: tokens.mint_count == 2, timeout=15)
    new_token = tokens.issued[-1]
    await eventually(lambda: stack.partner.requests[-1].token == new_token)
    await traffic.stop()
    assert set(traffic.statuses) == {200}, traffic.statuses
    assert await metric(stack, "authproxy_credentials_rotation_pending", client="demo") == 0
    assert (await report(stack))["rotation_pending"] is False


async def test_a_rejected_secret_serves_the_old_token_until_it_expires(
    rotating: tuple[Stack, SecretVolume, Path],
) -> None:
    stack, volume, _ = rotating
    async with stack.http.get(stack.url("/demo/a")) as response:
        assert response.status == 200
    volume.swap("wrong-secret")
    await eventually(lambda: stack.tokens.calls >= 2)
    async with stack.http.get(stack.url("/demo/b")) as response:
        assert response.status == 200  # the old token
    stack.clock.advance(3600)  # it expires; the new secret is still refused
    async with stack.http.get(stack.url("/demo/c")) as response:
        assert response.status == 502
        body = await response.json()
    assert body["client"] == "demo" and "wrong-secret" not in str(body)


async def test_a_compromised_secret_is_dropped_in_one_call(make_stack: StackFactory) -> None:
    stack = await make_stack()
    async with stack.http.get(stack.url("/demo/a")) as response:
        assert response.status == 200
    assert await stack.proxy.drop_tokens("demo") == {"client": "demo", "dropped": 1}
    statuses = await asyncio.gather(*(get(stack, f"/demo/{i}") for i in range(20)))
    assert statuses == [200] * 20
    assert stack.tokens.mint_count == 2  # one new mint, shared by the 20
    assert {r.token for r in stack.partner.requests[1:]} == {stack.tokens.issued[1]}
    with pytest.raises(KeyError):
        await stack.proxy.drop_tokens("nobody")


async def get(stack: Stack, path: str) -> int:
    async with stack.http.get(stack.url(path)) as response:
        await response.read()
        return response.status
