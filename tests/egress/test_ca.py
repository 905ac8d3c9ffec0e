"""The egress CA (proxy/egress/ca.py): name constraints as OpenSSL reads
them, the leaves it issues (and never issues), the cache and its renewal,
`ca init`'s files. Real certificates, checked by OpenSSL through ``ssl``."""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.egress.ca import BACKDATE, CertificateAuthority, NameConstraints, create_ca
from proxy.errors import CAError


class Clock:
    def __init__(self) -> None:
        self.now = datetime.datetime.now(datetime.UTC).timestamp()

    def __call__(self) -> float:
        return self.now


def load(path: Path, clock: Clock | None = None, **kw: object) -> CertificateAuthority:
    kw.setdefault("leaf_lifetime", 86400.0)
    return CertificateAuthority.load(
        str(path / "ca.pem"),
        str(path / "ca.key"),
        clock=clock or Clock(),
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("trees", "host", "permitted"),
    [
        (("acme.example",), "acme.example", True),
        (("acme.example",), "api.acme.example", True),
        (("acme.example",), "evilacme.example", False),  # a label boundary, not a suffix
        ((".acme.example",), "acme.example", False),  # a leading dot: below only
        ((".acme.example",), "a.b.acme.example", True),
        ((), "anything.example", True),  # no permitted subtree: everything
    ],
)
def test_name_constraints_read_as_openssl_does(trees, host, permitted) -> None:
    assert NameConstraints(trees).permits(host) is permitted


def test_an_excluded_subtree_wins() -> None:
    rules = NameConstraints(("acme.example",), ("internal.acme.example",))
    assert rules.permits("api.acme.example")
    assert not rules.permits("db.internal.acme.example")


def test_ca_init_writes_a_constrained_ca_and_a_private_key(tmp_path: Path) -> None:
    cert_path, key_path = create_ca(str(tmp_path), permit=["API.Acme.Example", ".partner.example"])
    assert os.stat(key_path).st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert ext.critical
    assert [t.value for t in ext.value.permitted_subtrees] == [
        "api.acme.example",
        ".partner.example",
    ]
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    ca = load(tmp_path)
    assert ca.constrained and ca.permits("api.acme.example") and ca.permits("x.partner.example")
    assert not ca.permits("partner.example") and not ca.permits("bank.example")


@pytest.mark.parametrize("bad", ["", "10.0.0.1", "a..b", "."])
def test_ca_init_refuses_a_permit_that_is_not_a_dns_name(tmp_path: Path, bad: str) -> None:
    with pytest.raises(CAError, match="--permit"):
        create_ca(str(tmp_path), permit=[bad])
    assert not (tmp_path / "ca.key").exists()


def test_ca_init_never_overwrites(tmp_path: Path) -> None:
    create_ca(str(tmp_path))
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(CAError, match="exists"):
        create_ca(str(tmp_path))
    assert (tmp_path / "ca.key").read_bytes() == before


def test_a_leaf_is_what_a_tls_server_for_the_host_needs(tmp_path: Path) -> None:
    create_ca(str(tmp_path), permit=["acme.example"])
    clock = Clock()
    ca = load(tmp_path, clock, leaf_lifetime=3600.0)
    leaf = ca.leaf("api.acme.example")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.acme.example"]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.not_valid_after_utc.timestamp() == pytest.approx(clock.now + 3600, abs=1)
    assert leaf.not_valid_before_utc.timestamp() == pytest.approx(clock.now - BACKDATE, abs=1)
    assert leaf.issuer == ca.cert.subject


def test_a_leaf_never_outlives_its_ca(tmp_path: Path) -> None:
    create_ca(str(tmp_path), lifetime=7200.0)
    ca = load(tmp_path, leaf_lifetime=30 * 86400.0)
    assert ca.leaf("api.acme.example").not_valid_after_utc == ca.cert.not_valid_after_utc


@pytest.mark.parametrize("host", ["bank.example", "acme.example.evil", "127.0.0.1", "[::1]"])
def test_no_leaf_outside_the_constraints_or_for_an_address(tmp_path: Path, host: str) -> None:
    create_ca(str(tmp_path), permit=["acme.example"])
    ca = load(tmp_path)
    with pytest.raises(CAError, match="may not sign"):
        ca.leaf_context(host)
    with pytest.raises(CAError):
        ca.leaf(host)
    assert ca.issued == 0


def test_openssl_accepts_the_leaf_for_its_host_only(tmp_path: Path) -> None:
    """A real handshake in memory: the client trusts the CA and checks the name."""
    create_ca(str(tmp_path), permit=["acme.example"])
    ca = load(tmp_path)
    server_context = ca.leaf_context("api.acme.example")

    def handshake(name: str) -> str | None:
        client_context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        client = client_context.wrap_bio(c_in, c_out, server_hostname=name)
        server = server_context.wrap_bio(s_in, s_out, server_side=True)
        for _ in range(10):
            for side, out, into in ((client, c_out, s_in), (server, s_out, c_in)):
                try:
                    side.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLCertVerificationError as exc:
                    return exc.verify_message
                except ssl.SSLError:
                    pass
                into.write(out.read())
        assert client.version() in ("TLSv1.2", "TLSv1.3")
        assert client.selected_alpn_protocol() is None
        return None

    assert handshake("api.acme.example") is None
    assert "mismatch" in (handshake("other.acme.example") or "")


def test_leaves_are_cached_renewed_late_in_life_and_bounded(tmp_path: Path) -> None:
    create_ca(str(tmp_path))
    clock = Clock()
    ca = load(tmp_path, clock, leaf_lifetime=3000.0, max_leaves=2)
    first = ca.leaf_context("a.example")
    assert ca.leaf_context("a.example") is first and ca.issued == 1
    clock.now += 1900  # 1100 s of 3000 left: more than a third
    assert ca.leaf_context("a.example") is first
    clock.now += 200  # 900 s left: less than a third, renewed
    renewed = ca.leaf_context("a.example")
    assert renewed is not first and ca.issued == 2
    ca.leaf_context("b.example")
    ca.leaf_context("c.example")  # a.example is the least recently used: dropped
    assert ca.leaf_context("c.example") is not None and ca.issued == 4
    ca.leaf_context("a.example")
    assert ca.issued == 5


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _self_signed(*, ca: bool, key: ec.EllipticCurvePrivateKey, days: float = 1) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_every_unusable_ca_is_refused_naming_the_file_never_the_key(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    key_file = _write(tmp_path / "k.pem", _pem(key))
    cases = {
        "not a PEM certificate": (_write(tmp_path / "junk.pem", b"junk"), key_file),
        "is not a CA certificate": (
            _write(tmp_path / "leaf.pem", _self_signed(ca=False, key=key)),
            key_file,
        ),
        "is not the private key": (
            _write(tmp_path / "ca.pem", _self_signed(ca=True, key=key)),
            _write(tmp_path / "other.pem", _pem(other)),
        ),
        "expired": (
            _write(tmp_path / "old.pem", _self_signed(ca=True, key=key, days=-1)),
            key_file,
        ),
        "not an unencrypted PEM private key": (
            _write(tmp_path / "ca2.pem", _self_signed(ca=True, key=key)),
            _write(tmp_path / "bad.key", b"nope"),
        ),
        "cannot read": (str(tmp_path / "missing.pem"), key_file),
    }
    secret = _pem(key).decode().splitlines()[1]
    for expected, (cert_file, k) in cases.items():
        with pytest.raises(CAError, match=expected) as caught:
            CertificateAuthority.load(cert_file, k, leaf_lifetime=3600)
        assert secret not in str(caught.value)
