import pytest

from proxy.units import parse_duration, parse_share, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("250ms", 0.25),
        ("1h", 3600.0),
        (12, 12.0),
        ("1.5s", 1.5),
        ("7", 7.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-1s", -3, True, "5 minutes", None, "1d"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("1MiB", 1048576), ("512KiB", 524288), (100, 100), ("64KB", 64000), ("1GiB", 1 << 30)],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["big", "-1", 1.5, "1 TB"])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_shares() -> None:
    assert parse_share("10%") == pytest.approx(0.10)
    assert parse_share("0%") == 0.0
    assert parse_share(0.25) == 0.25
    for bad in ("100%", "-5%", "lots", 1.0):
        with pytest.raises(ValueError, match="share"):
            parse_share(bad)
