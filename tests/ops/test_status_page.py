"""The status page (``GET /`` on the admin port): the pure renderer, the
response, and the page as a real headless browser (Debian's ``chromium``)
renders it, DOM and screenshot, from a fake Operated's realistic data."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import struct
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from aiohttp import web
from operated_fake import ADMIN_TOKEN, SECRETS, FakeOperated, realistic_status

from proxy.ops.admin import admin_app
from proxy.ops.status import render_status

CHROMIUM = "/usr/bin/chromium"
WIDTH, HEIGHT = 1200, 900


# ------------------------------------------------------------------ renderer


def assert_no_secret(page: str) -> None:
    for secret in (*SECRETS, ADMIN_TOKEN):
        assert secret not in page, secret


URL_ATTRIBUTES = frozenset({"src", "href", "action", "formaction", "srcset", "poster", "data"})
LOOPBACK = re.compile(r"(?i)https?://(127\.0\.0\.1|localhost|\[::1\])[:/]")


class Attributes(HTMLParser):
    """Every tag and attribute of a page, as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[str] = []
        self.styles: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self._in_style = tag == "style"
        for name, value in attrs:
            if name in URL_ATTRIBUTES and value is not None:
                self.urls.append(value)
            if name == "style" and value is not None:
                self.styles.append(value)
            if name == "content" and value is not None and "url=" in value.lower():
                self.urls.append(value.lower().split("url=", 1)[1])  # a redirecting refresh

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.styles.append(data)


def assert_no_external_url(page: str) -> None:
    parsed = Attributes()
    parsed.feed(page)
    for url in parsed.urls:
        assert not re.match(r"(?i)\s*([a-z][a-z0-9+.-]*:)?//", url) or LOOPBACK.match(url), url
    for style in parsed.styles:
        assert "url(" not in style and "@import" not in style, style
    assert not {"script", "link", "img", "iframe", "object", "embed"} & set(parsed.tags)


def test_the_page_shows_what_an_operator_needs() -> None:
    page = render_status(realistic_status())
    assert '<meta http-equiv="refresh" content="5">' in page
    for shown in ("acme-orders", "globex-billing", "acme", "globex", "orders.read"):
        assert shown in page
    assert "width:30%" in page  # acme's token: 1071 s of 3570
    assert "17m 51s of 59m 30s" in page
    assert "circuit-open" in page and "credentials rejected (invalid_client)" in page
    assert "1200" in page and "2.00" in page  # acme-orders: 1200 requests over 600 s
    assert "0.5 %" in page and "100.0 %" in page  # error shares
    assert "token endpoint refused the client: invalid_client" in page
    assert "rotation pending" in page
    assert "4242" in page and "4243" in page and "2 configured" in page
    assert "3f9a1c0d2b7e" in page and "/etc/authproxy/proxy.yaml" in page
    assert "redis://10.0.0.5:6379/0" in page  # the URL, without its password
    assert "billing.globex.example" in page
    assert_no_secret(page)
    assert_no_external_url(page)


def test_every_value_is_escaped() -> None:
    data = realistic_status()
    hostile = '<script>alert("x")</script>'
    data["routes"][0]["name"] = hostile
    data["clients"][0]["circuit"] = '"><img src=//evil.example/x>'
    data["clients"][1]["tokens"][0]["last_error"] = "<b>boom</b> & more"
    data["config"]["source"] = "/etc/<x>.yaml"
    page = render_status(data)
    assert hostile not in page and "&lt;script&gt;" in page
    assert "<img" not in page and "<b>boom" not in page and "&amp; more" in page
    assert "/etc/&lt;x&gt;.yaml" in page
    assert_no_external_url(page)


def test_an_empty_or_odd_report_is_a_page_with_gaps() -> None:
    for data in ({}, {"routes": None, "clients": "x", "uptime_s": "soon", "config": 3}):
        page = render_status(data)
        assert page.startswith("<!DOCTYPE html>") and "no routes" in page
    odd = realistic_status()
    odd["clients"][0]["tokens"][0].update(expires_in_s=9999.0, lifetime_s=100.0)
    assert "width:100%" in render_status(odd)  # clamped
    odd["clients"][0]["tokens"][0].update(expires_in_s=-5.0)
    assert "width:0%" in render_status(odd)


async def test_the_response_forbids_loading_anything(aiohttp_client: object) -> None:
    client = await aiohttp_client(admin_app(FakeOperated()))  # type: ignore[operator]
    async with client.get("/") as response:
        assert response.status == 200
        assert response.content_type == "text/html" and response.charset == "utf-8"
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        page = await response.text()
    assert "acme-orders" in page
    assert_no_secret(page)


# ------------------------------------------------------------ real browser


def chromium() -> str:
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    found = shutil.which("chromium")
    if found:
        return found
    if os.environ.get("AUTHPROXY_REQUIRE_CHROMIUM"):
        pytest.fail("chromium is required here (AUTHPROXY_REQUIRE_CHROMIUM) but not installed")
    pytest.skip("no chromium on this machine (apt-get install chromium)")


@pytest.fixture
async def admin_url() -> AsyncIterator[str]:
    """The admin app with the fake behind it, on a real loopback port."""
    runner = web.AppRunner(admin_app(FakeOperated()), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/"
    await runner.cleanup()


async def run_chromium(binary: str, profile: Path, *args: str) -> bytes:
    process = await asyncio.create_subprocess_exec(
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{HEIGHT}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HOME": str(profile)},
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 90)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out


async def test_a_real_browser_renders_the_page(admin_url: str, tmp_path: Path) -> None:
    binary = chromium()
    dom = (await run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", admin_url)).decode()
    # The DOM as the browser built it (attributes normalised by the parser).
    assert re.search(r'<meta http-equiv="refresh" content="5"\s*/?>', dom)
    for name in ("acme-orders", "globex-billing", "acme", "globex"):
        assert f">{name}<" in dom, name
    assert re.search(r'class="fill mid" style="width:\s*30%;?"', dom)
    assert re.search(r'class="pill circuit-open">open<', dom)
    assert re.search(r'class="pill circuit-closed">closed<', dom)
    assert_no_external_url(dom)
    assert_no_secret(dom)

    shot = tmp_path / "status.png"
    await run_chromium(binary, tmp_path / "profile-shot", f"--screenshot={shot}", admin_url)
    image = read_png(shot.read_bytes())
    assert (image.width, image.height) == (WIDTH, HEIGHT)
    colours = image.colours()
    assert len(colours) > 20, "the screenshot is (nearly) one flat colour"
    # The page's own colours made it to the screen: the table heads' dark blue
    # and the green of a healthy pill.
    assert (0x27, 0x43, 0x5E) in colours
    assert (0xD4, 0xF1, 0xDE) in colours


# ------------------------------------------------------------- PNG, by hand


@dataclass
class Png:
    width: int
    height: int
    channels: int
    rows: list[bytes]  # unfiltered scanlines

    def colours(self) -> set[tuple[int, int, int]]:
        found: set[tuple[int, int, int]] = set()
        step = self.channels
        for row in self.rows:
            for i in range(0, len(row), step):
                found.add((row[i], row[i + 1], row[i + 2]))
        return found


def read_png(data: bytes) -> Png:
    """An 8-bit RGB or RGBA, non-interlaced PNG (what chromium writes), decoded
    with zlib alone."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, header, idat = 8, b"", bytearray()
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(bytes(idat))
    stride = width * channels
    assert len(raw) == height * (stride + 1)
    rows: list[bytes] = []
    previous = bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        unfilter(kind, line, previous, channels)
        previous = bytes(line)
        rows.append(previous)
    return Png(width, height, channels, rows)


def unfilter(kind: int, line: bytearray, up: bytes, bpp: int) -> None:
    if kind == 0:
        return
    if kind == 2:
        line[:] = bytes((a + b) & 0xFF for a, b in zip(line, up, strict=True))
        return
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        if kind == 1:
            line[i] = (line[i] + left) & 0xFF
        elif kind == 3:
            line[i] = (line[i] + ((left + up[i]) >> 1)) & 0xFF
        elif kind == 4:
            corner = up[i - bpp] if i >= bpp else 0
            p = left + up[i] - corner
            pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - corner)
            predictor = left if pa <= pb and pa <= pc else up[i] if pb <= pc else corner
            line[i] = (line[i] + predictor) & 0xFF
        else:
            raise AssertionError(f"unknown PNG filter {kind}")
