"""The egress CA (issue 14, docs/egress.md): it signs the leaf certificates
the proxy shows apps inside intercepted CONNECT tunnels, and ``authproxy ca
init`` makes a new one.

A leaf is issued only for a DNS name the CA's name constraints permit (RFC
5280 §4.2.1.10), never for an IP address, and lives ``leaf_lifetime`` at
most (never past the CA itself). Leaves are cached per host in a bounded LRU
and renewed when a third of their life is left. One EC P-256 key serves
every leaf of a process: it never leaves memory (the chain is handed to
OpenSSL through an anonymous memory file, not a path on disk).

Messages name the file and what is wrong with it, never key material.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.config.keys import read_private_key
from proxy.errors import CAError

MAX_LEAVES: Final = 1024  # hosts whose leaf stays cached; one per routed host is the usual need
BACKDATE: Final = 300.0  # seconds a leaf is valid before it is made: apps' clocks drift
RENEW_FRACTION: Final = 1 / 3  # a cached leaf with less of its life left is replaced
CA_LIFETIME: Final = 10 * 365 * 86400.0  # `ca init`'s default: rotate by making a new one
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class NameConstraints:
    """The DNS subtrees of a CA's name constraints extension, lower-case.
    As OpenSSL checks them: ``a.b`` covers itself and every name below it,
    ``.a.b`` only the names below it; an excluded subtree wins."""

    permitted: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.permitted and not self.excluded

    def permits(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        if any(_within(host, tree) for tree in self.excluded):
            return False
        return not self.permitted or any(_within(host, tree) for tree in self.permitted)


def _within(host: str, tree: str) -> bool:
    if tree.startswith("."):
        return host.endswith(tree) and len(host) > len(tree)
    return host == tree or host.endswith("." + tree)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _constraints(cert: x509.Certificate) -> tuple[NameConstraints, bool]:
    """The DNS name constraints of ``cert``, and whether it has any extension
    at all (a CA constrained to IP ranges only still permits every name)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return NameConstraints(), False

    def dns(trees: Iterable[x509.GeneralName] | None) -> tuple[str, ...]:
        return tuple(t.value.lower() for t in trees or () if isinstance(t, x509.DNSName))

    return NameConstraints(dns(ext.permitted_subtrees), dns(ext.excluded_subtrees)), True


class CertificateAuthority:
    """A loaded CA that issues leaf contexts. Thread-safe (workers are
    processes; the lock guards the cache against executor threads)."""

    def __init__(
        self,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
        *,
        source: str,
        leaf_lifetime: float,
        max_leaves: int = MAX_LEAVES,
        clock: Clock = time.time,
        on_issue: Callable[[], None] | None = None,
    ) -> None:
        self.cert = cert
        self._key = key
        self.source = source
        self.leaf_lifetime = leaf_lifetime
        self.constraints, self.constrained = _constraints(cert)
        self._max = max_leaves
        self._clock = clock
        self._on_issue = on_issue
        self._ca_pem = cert.public_bytes(serialization.Encoding.PEM)
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._ski = x509.SubjectKeyIdentifier.from_public_key(self._leaf_key.public_key())
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
        self._leaves: OrderedDict[str, tuple[ssl.SSLContext, float, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.issued = 0

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()

    @property
    def not_after(self) -> float:
        return self.cert.not_valid_after_utc.timestamp()

    @classmethod
    def load(
        cls,
        cert_file: str,
        key_file: str,
        *,
        leaf_lifetime: float,
        max_leaves: int = MAX_LEAVES,
        clock: Clock = time.time,
        on_issue: Callable[[], None] | None = None,
    ) -> CertificateAuthority:
        """Read and check a CA: a CA certificate (basicConstraints ca, and
        keyCertSign if it has key usage), still valid, and the private key
        that matches it. Raises CAError naming the file."""
        cert_pem = _read(cert_file)
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise CAError(f"{cert_file!r} is not a PEM certificate") from None
        try:
            key = read_private_key(key_file)[1]
        except ValueError as exc:
            raise CAError(str(exc)) from None
        if not isinstance(
            key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)
        ):
            raise CAError(f"{key_file!r}: a CA key must be EC, RSA or Ed25519")
        try:
            basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            basic = None
        if basic is None or not basic.ca:
            raise CAError(f"{cert_file!r} is not a CA certificate (basicConstraints CA:TRUE)")
        try:
            usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is not None and not usage.key_cert_sign:
            raise CAError(f"{cert_file!r} may not sign certificates (keyUsage has no keyCertSign)")
        if _public_der(key.public_key()) != _public_der(cert.public_key()):
            raise CAError(f"{key_file!r} is not the private key of the CA in {cert_file!r}")
        now = clock()
        if cert.not_valid_after_utc.timestamp() <= now:
            raise CAError(f"the CA in {cert_file!r} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        if cert.not_valid_before_utc.timestamp() > now + BACKDATE:
            raise CAError(
                f"the CA in {cert_file!r} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
            )
        return cls(
            cert,
            key,
            source=cert_file,
            leaf_lifetime=leaf_lifetime,
            max_leaves=max_leaves,
            clock=clock,
            on_issue=on_issue,
        )

    def permits(self, host: str) -> bool:
        """Whether this CA may sign for ``host``: a DNS name (never an IP
        address) its name constraints allow."""
        return not _is_ip(host) and self.constraints.permits(host)

    def leaf_context(self, host: str) -> ssl.SSLContext:
        """A server-side TLS context holding a leaf for ``host`` (and the CA
        in its chain), cached; a new leaf once a third of the cached one's
        life is left. Raises CAError for a host this CA may not sign for."""
        host = host.lower().rstrip(".")
        if not self.permits(host):
            raise CAError(f"the egress CA may not sign for {host} (outside its name constraints)")
        now = self._clock()
        with self._lock:
            cached = self._leaves.get(host)
            if cached is not None:
                context, issued_at, expires = cached
                if expires - now > (expires - issued_at) * RENEW_FRACTION:
                    self._leaves.move_to_end(host)
                    return context
            context, expires = self._issue(host, now)
            self._leaves[host] = (context, now, expires)
            self._leaves.move_to_end(host)
            while len(self._leaves) > self._max:
                self._leaves.popitem(last=False)
        return context

    def leaf(self, host: str) -> x509.Certificate:
        """The certificate of a fresh leaf for ``host`` (for tests and `ca`
        diagnostics; serving uses :meth:`leaf_context`)."""
        if not self.permits(host):
            raise CAError(f"the egress CA may not sign for {host} (outside its name constraints)")
        return self._certificate(host.lower().rstrip("."), self._clock())[0]

    def _certificate(self, host: str, now: float) -> tuple[x509.Certificate, float]:
        expires = min(now + self.leaf_lifetime, self.not_after)
        start = max(now - BACKDATE, self.cert.not_valid_before_utc.timestamp())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(self.cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(start))
            .not_valid_after(_utc(expires))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(digital_signature=True),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(self._ski, critical=False)
            .add_extension(self._aki, critical=False)
        )
        algorithm = None if isinstance(self._key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        return builder.sign(self._key, algorithm), expires

    def _issue(self, host: str, now: float) -> tuple[ssl.SSLContext, float]:
        cert, expires = self._certificate(host, now)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])  # the app side speaks HTTP/1.1 only
        chain = cert.public_bytes(serialization.Encoding.PEM) + self._ca_pem
        _load_in_memory(context, chain, self._leaf_key_pem)
        self.issued += 1
        if self._on_issue is not None:
            self._on_issue()
        return context, expires


def _load_in_memory(context: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    """``load_cert_chain`` from memory: OpenSSL reads files only, so the PEM
    goes into anonymous memory files (Linux memfd) that vanish when closed;
    the leaf key never touches a file system."""
    fds = []
    try:
        for label, data in (("chain", chain), ("key", key)):
            fd = os.memfd_create(f"authproxy-leaf-{label}", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
        context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)


_KEY_USAGES: Final = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    """A keyUsage extension allowing only ``allowed`` (RFC 5280 §4.2.1.3)."""
    return x509.KeyUsage(**{name: allowed.get(name, False) for name in _KEY_USAGES})


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CAError(f"cannot read {path!r}: {exc.strerror}") from None


def _public_der(key: object) -> bytes:
    assert isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey))
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _utc(timestamp: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(timestamp), tz=datetime.UTC)


def _tree(name: str) -> str:
    """A ``--permit`` value as a DNS subtree: lower-case; ``.a.b`` keeps its dot."""
    lead = "." if name.startswith(".") else ""
    bare = name.strip(".").lower()
    if not bare or _is_ip(bare) or any(not label for label in bare.split(".")):
        raise CAError(f"--permit {name!r}: expected a DNS name such as api.partner.example")
    return lead + bare


def create_ca(
    out_dir: str,
    *,
    permit: Iterable[str] = (),
    name: str = "authproxy egress CA",
    lifetime: float = CA_LIFETIME,
    clock: Clock = time.time,
) -> tuple[str, str]:
    """Write a new CA into ``out_dir``: ``ca.pem`` (0644) and ``ca.key``
    (0600, created exclusively). With ``permit``, the CA carries critical
    name constraints: only names inside those subtrees can be signed by it
    in a way apps accept. Refuses to overwrite either file. Returns both paths."""
    trees = tuple(_tree(p) for p in permit)
    os.makedirs(out_dir, mode=0o755, exist_ok=True)
    cert_path = os.path.join(out_dir, "ca.pem")
    key_path = os.path.join(out_dir, "ca.key")
    for path in (cert_path, key_path):
        if os.path.exists(path):
            raise CAError(f"{path!r} exists; move it away or pick another --out")
    key = ec.generate_private_key(ec.SECP256R1())
    now = clock()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - BACKDATE))
        .not_valid_after(_utc(now + lifetime))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if trees:
        builder = builder.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.DNSName(t) for t in trees], excluded_subtrees=None
            ),
            critical=True,
        )
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    fd = os.open(cert_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
