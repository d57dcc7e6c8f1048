"""``procurator certs``: a small private CA and the certificates of a fleet.

Meant for test fleets and small installations; a site with its own PKI
issues the same certificates with it (docs/SECURITY.md has the openssl
steps). What a certificate must carry is defined by ``procurator.rpc.tls``:
one URI SAN ``procurator://worker/<id>``, ``procurator://control/<name>`` or
``procurator://master`` (the master's also the DNS name
``master.procurator``). The ``procurator certs`` command is
``procurator.cli.certs``.

Layout of a certificate directory::

    ca.crt  ca.key                    the fleet CA (keep ca.key offline)
    master.crt  master.key            the master's server certificate
    worker-<id>.crt  worker-<id>.key  one per worker
    control-<name>.crt  control-<name>.key   one per person or CI pipeline

Invariants: private keys are written 0600 and never overwritten unless
``force`` is given (nor are certificates); a key and its certificate are
written together or not at all (both staged as temporary files, then
renamed), so a failure never leaves a key without its certificate. Output
is printed only after both are in place: a closed pipe on stdout (exit
status 141, see ``procurator.cli.pipes``) cannot cut the files short. Keys are
ECDSA P-256, signatures SHA-256; the CA may sign leaves only (path length
0).

Extended key usage: the master's certificate serves (``serverAuth``);
a control certificate dials (``clientAuth``); a worker's does both, as it
dials the master and is to serve other workers' move transfers (a worker
certificate still cannot pose as the master: it lacks the master's name
and identity, which clients check). Worker certificates issued before
they carried ``serverAuth`` keep working with the master (it asks only
for ``clientAuth``); such a worker could not be the TLS server of a
transfer once transfers use TLS (not built yet: docs/SNAPSHOTS.md, "Who
may feed a move"): reissue it (``procurator certs issue DIR --worker ID
--force``).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from procurator.core.errors import PermanentError, ValidationError
from procurator.core.validation import check_worker_id
from procurator.rpc.tls import MASTER_SERVER_NAME, Role, identity_uri

__all__ = ["CA_DAYS", "LEAF_DAYS", "IssuedCert", "init_ca", "issue"]

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_DAYS = 3650
LEAF_DAYS = 365


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """Where a certificate and its key were written."""

    cert: Path
    key: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_pair(paths: IssuedCert, key_pem: bytes, cert_pem: bytes, *, force: bool) -> None:
    """Write a key (0600) and its certificate (0644) together or not at all:
    both go to temporary files beside their targets first, fsynced, and are
    renamed into place only once both are complete. A failure on the way
    (disk full, a size limit, an interrupt) removes what it staged and
    leaves the directory as it was, also with ``force``: never a key
    without its certificate, which a rerun would refuse to replace."""
    if not force:
        for path in (paths.cert, paths.key):
            if path.exists():
                raise PermanentError(f"{path} exists already; pass --force to replace it")
    staged: list[Path] = []
    try:
        for path, data, mode in ((paths.key, key_pem, 0o600), (paths.cert, cert_pem, 0o644)):
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                staged.append(tmp)
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as exc:
                raise PermanentError(f"cannot write {path}: {exc.strerror or exc}") from exc
        # The key first: a certificate never names a key that is not there.
        os.replace(staged[0], paths.key)
        os.replace(staged[1], paths.cert)
    except BaseException:
        for tmp in staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "procurator"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def init_ca(
    directory: Path,
    *,
    common_name: str = "procurator fleet CA",
    days: int = CA_DAYS,
    force: bool = False,
) -> IssuedCert:
    """Make ``directory`` (if needed) and a new CA in it."""
    if days <= 0:
        raise ValidationError(f"--days must be positive, not {days}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermanentError(f"cannot make {directory}: {exc.strerror or exc}") from exc
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    name = _name(common_name)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    paths = IssuedCert(directory / CA_CERT, directory / CA_KEY)
    if not force:
        for path in (paths.cert, paths.key):
            if path.exists():
                raise PermanentError(f"{path} exists already; pass --force to replace the CA")
    _write_pair(paths, _key_pem(key), cert.public_bytes(serialization.Encoding.PEM), force=force)
    return paths


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PermanentError(
            f"{exc.filename}: no CA here; run `procurator certs init {directory}` first"
        ) from None
    except (OSError, ValueError) as exc:
        raise PermanentError(f"cannot load the CA in {directory}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PermanentError(f"{key_path}: expected an ECDSA key")
    return cert, key


def _file_stem(role: Role, name: str) -> str:
    return "master" if role is Role.MASTER else f"{role.value}-{name}"


def _sans(role: Role, name: str, extra: Sequence[str]) -> list[x509.GeneralName]:
    if extra and role is not Role.MASTER:
        # Only the master is dialed by name; a client certificate with DNS
        # names could pose as it wherever extended key usage is not checked.
        raise ValidationError("--san is for the master's certificate only")
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity_uri(role, name))]
    if role is Role.MASTER:
        names.append(x509.DNSName(MASTER_SERVER_NAME))
    for text in extra:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(text)))
        except ValueError:
            if not text or any(c.isspace() or c in "/:@" for c in text):
                raise ValidationError(f"--san {text!r}: expected a DNS name or an IP") from None
            names.append(x509.DNSName(text))
    return names


def issue(
    directory: Path,
    role: Role,
    name: str = "",
    *,
    extra_sans: Sequence[str] = (),
    days: int = LEAF_DAYS,
    force: bool = False,
) -> IssuedCert:
    """Issue a certificate for ``role``/``name`` signed by the CA in
    ``directory``; returns where it and its key were written."""
    if role is not Role.MASTER and (problem := check_worker_id(name)) is not None:
        raise ValidationError(f"{role.value} name: {problem}")
    if days <= 0:
        raise ValidationError(f"--days must be positive, not {days}")
    ca_cert, ca_key = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usage = {
        Role.MASTER: [ExtendedKeyUsageOID.SERVER_AUTH],
        Role.WORKER: [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
        Role.CONTROL: [ExtendedKeyUsageOID.CLIENT_AUTH],
    }[role]
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name or "master"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(x509.SubjectAlternativeName(_sans(role, name, extra_sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    stem = _file_stem(role, name)
    paths = IssuedCert(directory / f"{stem}.crt", directory / f"{stem}.key")
    _write_pair(paths, _key_pem(key), cert.public_bytes(serialization.Encoding.PEM), force=force)
    return paths
