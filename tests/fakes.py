"""Test doubles: a token endpoint and a partner API on loopback, with the
failure modes the behaviour tests need. Each counts what it sees, so that a
test can assert "exactly one mint" or "exactly one upstream request with
these body bytes". (The demo has its own two small mocks, in proxy/demo.py.)
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import itertools
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from aiohttp import web

from proxy.demo import EXPIRED_CHALLENGE, REVOKED_CHALLENGE, LocalServer


@dataclass
class MintRequest:
    form: dict[str, str]
    authorization: str | None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = ""
    client_cert: Any = None  # the TLS peer certificate, when one was presented


class FakeTokenEndpoint(LocalServer):
    """A client-credentials token endpoint at ``/oauth2/token``.

    ``mode`` chooses its behaviour: ``ok`` (default), ``invalid_client``,
    ``invalid_scope``, ``server_error``, ``throttled`` (429) and ``unavailable``
    (503), both with ``retry_after`` as ``Retry-After`` when set, ``html``,
    ``no_access_token``, ``wrong_token_type``, ``error_in_200``; ``delay``
    slows every answer. ``script`` lists modes for the next calls, one each. ``expires_in`` may be a number, a
    numeric string or ``None`` (omitted). Issued tokens are random and start
    with ``tok-`` so tests can look for them in logs.
    """

    def __init__(self, client_id: str = "demo-client", client_secret: str = "demo-secret") -> None:
        super().__init__()
        self.client_id = client_id
        self.client_secret = client_secret
        self.also_accepted: set[str] = set()  # more secrets of the client (a rotation under way)
        self.assertion_key: Any = None  # verify client assertions with it (PEM public key, secret)
        self.public_clients = False  # accept a bare client_id (auth_method none)
        self.assertions: list[dict[str, Any]] = []  # verified assertion claims
        self.mode = "ok"
        self.script: list[str] = []  # modes for the next calls, one each; then ``mode``
        self.retry_after: str | None = None  # Retry-After sent with "throttled"/"unavailable"
        self.delay = 0.0
        self.expires_in: Any = 3600
        self.mint_count = 0  # successful mints
        self.calls = 0  # every request, failed ones included
        self.requests: list[MintRequest] = []
        self.issued: list[str] = []
        self._serial = itertools.count(1)

    @property
    def secrets(self) -> set[str]:
        """The client secrets this identity provider accepts now."""
        return {self.client_secret, *self.also_accepted}

    @property
    def token_url(self) -> str:
        return f"{self.url}/oauth2/token"

    def _authenticated(self, form: dict[str, str], authorization: str | None) -> bool:
        if "client_assertion" in form and self.assertion_key is not None:
            import jwt

            try:
                claims = jwt.decode(
                    form["client_assertion"],
                    self.assertion_key,
                    algorithms=["RS256", "PS256", "ES256", "HS256"],
                    audience=self.token_url,
                    issuer=self.client_id,
                    # Times are the proxy's (tests move its clock): check the window only.
                    options={
                        "require": ["exp", "iat", "jti", "sub"],
                        "verify_exp": False,
                        "verify_iat": False,
                        "verify_nbf": False,
                    },
                )
            except jwt.PyJWTError:
                return False
            if not 0 < claims["exp"] - claims["iat"] <= 300:
                return False
            header = jwt.get_unverified_header(form["client_assertion"])
            self.assertions.append({**claims, "_header": header})
            return bool(
                claims["sub"] == self.client_id
                and form.get("client_assertion_type")
                == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            )
        if (
            self.requests
            and self.requests[-1].client_cert
            and form.get("client_id") == self.client_id
        ):
            return "client_secret" not in form  # tls_client_auth: the certificate proves it
        if self.public_clients and set(form) >= {"client_id"} and not authorization:
            return form["client_id"] == self.client_id and "client_secret" not in form
        if authorization and authorization.startswith("Basic "):
            pair = base64.b64decode(authorization[6:]).decode()
            client_id, _, secret = pair.partition(":")
            return (
                unquote_plus(client_id) == self.client_id and unquote_plus(secret) in self.secrets
            )
        return form.get("client_id") == self.client_id and form.get("client_secret") in self.secrets

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.calls += 1
        if request.path != "/oauth2/token" or request.method != "POST":
            return web.json_response({"error": "not_found"}, status=404)
        body = await request.read()
        if request.content_type == "application/json":
            form = {k: str(v) for k, v in json.loads(body or b"{}").items()}
        else:
            form = dict(parse_qsl(body.decode()))
        authorization = request.headers.get("Authorization")
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        self.requests.append(
            MintRequest(form, authorization, dict(request.headers), request.content_type, peer)
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        mode = self.script.pop(0) if self.script else self.mode
        if mode in ("throttled", "unavailable"):
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            status = 429 if mode == "throttled" else 503
            return web.json_response({"error": "slow_down"}, status=status, headers=headers)
        if mode == "invalid_scope":
            return web.json_response({"error": "invalid_scope"}, status=400)
        if mode == "invalid_client" or not self._authenticated(form, authorization):
            return web.json_response(
                {"error": "invalid_client", "error_description": "Client authentication failed"},
                status=401,
            )
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if mode == "server_error":
            return web.Response(status=500, text="upstream exploded")
        if mode == "html":
            return web.Response(
                status=200, text="<html><body>Login</body></html>", content_type="text/html"
            )
        if mode == "error_in_200":
            return web.json_response({"error": "invalid_scope"}, status=200)
        token = f"tok-{next(self._serial)}-{secrets.token_hex(8)}"
        document: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if mode == "no_access_token":
            del document["access_token"]
        if mode == "wrong_token_type":
            document["token_type"] = "DPoP"
        if self.expires_in is not None:
            document["expires_in"] = self.expires_in
        if "scope" in form:
            document["scope"] = form["scope"]
        if "access_token" in document and mode == "ok":
            self.mint_count += 1
            self.issued.append(token)
        return web.json_response(document)


@dataclass
class SeenRequest:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes
    token: str | None
    at: float = field(default_factory=time.monotonic)


class FakePartner(LocalServer):
    """A partner API that checks bearer tokens against a :class:`FakeTokenEndpoint`.

    Tokens put in ``expired`` get a 401 with an RFC 6750 expired-token
    challenge; tokens in ``revoked`` a 401 saying revoked. The last path
    segment picks a behaviour (see :meth:`respond`); anything else echoes.
    """

    def __init__(self, issuer: FakeTokenEndpoint) -> None:
        super().__init__()
        self.issuer = issuer
        self.expired: set[str] = set()
        self.revoked: set[str] = set()
        self.requests: list[SeenRequest] = []
        self.sunk: list[tuple[int, str]] = []  # (size, sha256) of bodies sent to .../sink
        self.download_sent = 0  # bytes of .../download written so far (back-pressure tests)
        self.early_reject = False  # answer an expired token's 401 before reading the body
        self.token_header = "Authorization"  # where this partner expects the token ...
        self.token_prefix = "Bearer "  # ... and what comes before it

    def expire_all(self) -> None:
        """Declare every token issued so far expired."""
        self.expired.update(self.issuer.issued)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        presented = request.headers.get(self.token_header, "")
        prefix = self.token_prefix
        token = presented[len(prefix) :] if presented and presented.startswith(prefix) else None
        name = request.raw_path.split("?", 1)[0].rsplit("/", 1)[-1]
        body = b""
        rejecting_early = self.early_reject and token in self.expired
        if name == "sink":
            # Count and hash a body of any size without keeping it.
            digest = hashlib.sha256()
            size = 0
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
            self.sunk.append((size, digest.hexdigest()))
        elif name != "early401" and not rejecting_early:
            body = await request.read()
        self.requests.append(
            SeenRequest(
                request.method, request.raw_path, list(request.headers.items()), body, token
            )
        )
        if name == "plain401":
            return web.Response(status=401, text="go away")
        if token is None or token not in self.issuer.issued:
            return web.Response(
                status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )
        if token in self.revoked:
            return web.Response(status=401, headers={"WWW-Authenticate": REVOKED_CHALLENGE})
        if token in self.expired or name == "early401":
            return web.Response(
                status=401,
                headers={"WWW-Authenticate": EXPIRED_CHALLENGE},
                text='{"code": "TOKEN_EXPIRED"}',
            )
        return await self.respond(name, request, body)

    async def respond(self, name: str, request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        query = dict(parse_qsl(request.query_string))
        if name == "stream":
            # Chunked, with pauses: a proxy that buffers shows up as one late chunk.
            out = web.StreamResponse(headers={"Content-Type": "text/plain"})
            out.enable_chunked_encoding()
            await out.prepare(request)
            for i in range(int(query.get("n", "3"))):
                await out.write(f"chunk-{i}\n".encode())
                await asyncio.sleep(float(query.get("delay", "0.2")))
            await out.write_eof()
            return out
        if name == "cookies":
            response = web.Response(text="two cookies")
            response.headers.add("Set-Cookie", "a=1; Path=/")
            response.headers.add("Set-Cookie", "b=2; Path=/")
            return response
        if name == "gzip":
            return web.Response(
                body=gzip.compress(b"compressed hello " * 20),
                headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
            )
        if name == "hop":
            return web.Response(
                text="hop",
                headers={
                    "Connection": "X-Secret-Hop",
                    "X-Secret-Hop": "1",
                    "Keep-Alive": "timeout=5",
                    "X-End-To-End": "kept",
                },
            )
        if name == "download":
            size = int(query.get("size", "1048576"))
            out = web.StreamResponse(headers={"Content-Length": str(size)})
            await out.prepare(request)
            block = b"d" * 65536
            sent = 0
            while sent < size:
                piece = block[: min(len(block), size - sent)]
                await out.write(piece)
                sent += len(piece)
                self.download_sent += len(piece)
            await out.write_eof()
            return out
        if name == "cut":
            # Promise 1000 bytes, send 10, then drop the connection.
            out = web.StreamResponse(headers={"Content-Length": "1000"})
            await out.prepare(request)
            await out.write(b"x" * 10)
            await out.drain()
            assert request.transport is not None
            request.transport.close()
            return out
        if name == "cut-chunked":
            # A chunked answer whose last chunk never comes: the connection drops.
            out = web.StreamResponse()
            out.enable_chunked_encoding()
            await out.prepare(request)
            await out.write(b"hello")
            await out.drain()
            assert request.transport is not None
            request.transport.close()
            return out
        if name == "slow":
            await asyncio.sleep(float(query.get("delay", "2")))
        return web.json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": list(request.headers.items()),
                "body_length": len(body),
            }
        )
