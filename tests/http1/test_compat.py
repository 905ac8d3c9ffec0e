"""proxy/compat.py: the aiohttp pin and the internals the lean engine needs."""

from __future__ import annotations

import pytest

from proxy import cli
from proxy.errors import ConfigError
from proxy.http1 import compat


def test_the_installed_aiohttp_is_one_the_suite_passed_on() -> None:
    assert compat.problems() == []
    compat.check()


@pytest.mark.parametrize("version", ["3.15.0", "3.13.5", "4.0.0a1", "3.14.4"])
def test_a_version_outside_the_pin_is_named(version: str) -> None:
    (problem,) = compat.problems(version)
    assert problem == f"aiohttp {version} is installed; authproxy is tested with >=3.14.5,<3.15.0"


def test_a_missing_internal_stops_the_start_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from aiohttp import client_proto

    monkeypatch.delattr(client_proto.ResponseHandler, "_reschedule_timeout")
    with pytest.raises(ConfigError, match=r"no aiohttp.client_proto.ResponseHandler._reschedule"):
        compat.check()
    assert cli.main(["check", "--config", "proxy.yaml"]) == 1
    assert "ResponseHandler._reschedule_timeout" in capsys.readouterr().err


def test_version_tuples() -> None:
    assert compat.version_tuple("3.14.5") == (3, 14, 5)
    assert compat.version_tuple("3.14.5rc1") == (3, 14, 5)
    assert compat.version_tuple("4.0.0a1") == (4, 0, 0)
