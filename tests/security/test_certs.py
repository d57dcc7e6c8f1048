"""``procurator certs`` and the identity rules of ``procurator.rpc.tls``."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from sechelpers import Pki, cli

from procurator.core.errors import PermanentError, UnauthorizedError, ValidationError
from procurator.rpc.address import parse_address
from procurator.rpc.tls import (
    MASTER_SERVER_NAME,
    PeerIdentity,
    Role,
    TlsFiles,
    authorize_control,
    authorize_register,
    is_local,
    parse_identity_uri,
    peer_identity,
    require_master,
    require_secure,
)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certs_writes_a_ca_and_role_certificates(pki: Pki) -> None:
    ca = _load(pki.fleet / "ca.crt")
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0

    client, server = ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH
    expected = {
        "master": ("procurator://master", [server]),
        # A worker also serves: the other workers' move transfers.
        "worker-host-a": ("procurator://worker/host-a", [client, server]),
        "control-ci": ("procurator://control/ci", [client]),
    }
    for stem, (uri, usage) in expected.items():
        cert = _load(pki.fleet / f"{stem}.crt")
        assert cert.issuer == ca.subject
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == usage
        key_mode = stat.S_IMODE((pki.fleet / f"{stem}.key").stat().st_mode)
        assert key_mode == 0o600, f"{stem}.key is {oct(key_mode)}"
    master = _load(pki.fleet / "master.crt")
    sans = master.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [MASTER_SERVER_NAME]
    assert stat.S_IMODE((pki.fleet / "ca.key").stat().st_mode) == 0o600


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_accepts_the_certificates_for_their_purpose(pki: Pki) -> None:
    def verify(stem: str, purpose: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "openssl",
                "verify",
                "-CAfile",
                str(pki.fleet / "ca.crt"),
                "-purpose",
                purpose,
                str(pki.fleet / f"{stem}.crt"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )

    assert verify("master", "sslserver").returncode == 0
    assert verify("worker-host-a", "sslclient").returncode == 0
    assert verify("control-ci", "sslclient").returncode == 0
    # A worker's certificate serves (the other workers' transfers), a
    # control certificate does not; neither can pose as the master
    # (test_a_worker_certificate_cannot_pose_as_the_master: its name).
    assert verify("worker-host-a", "sslserver").returncode == 0
    assert verify("control-ci", "sslserver").returncode != 0
    # Nor is a foreign CA's certificate valid here.
    foreign = subprocess.run(
        ["openssl", "verify", "-CAfile", str(pki.fleet / "ca.crt"), str(pki.foreign / "ca.crt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert foreign.returncode != 0


def test_certs_refuses_to_overwrite_and_explains_missing_ca(tmp_path: Path) -> None:
    assert cli("certs", "init", str(tmp_path / "pki")).returncode == 0
    again = cli("certs", "init", str(tmp_path / "pki"))
    assert again.returncode == 1
    assert "exists already; pass --force" in again.stderr
    assert cli("certs", "init", str(tmp_path / "pki"), "--force").returncode == 0

    assert cli("certs", "issue", str(tmp_path / "pki"), "--worker", "host-a").returncode == 0
    twice = cli("certs", "issue", str(tmp_path / "pki"), "--worker", "host-a")
    assert twice.returncode == 1
    assert "worker-host-a.crt exists already" in twice.stderr

    bad_id = cli("certs", "issue", str(tmp_path / "pki"), "--worker", "../etc")
    assert bad_id.returncode == 1
    assert "not a valid worker id" in bad_id.stderr
    assert not list(tmp_path.glob("pki/worker-..*"))

    no_ca = cli("certs", "issue", str(tmp_path / "empty"), "--control", "ci")
    assert no_ca.returncode == 1
    assert "procurator certs init" in no_ca.stderr

    # Only the master is dialed by name: a worker with DNS names could pose as it.
    named = cli("certs", "issue", str(tmp_path / "pki"), "--worker", "host-b", "--san", "x.org")
    assert named.returncode == 1
    assert "--san is for the master's certificate only" in named.stderr
    assert not list(tmp_path.glob("pki/worker-host-b*"))


def test_a_client_accepts_only_the_master_identity_from_the_server() -> None:
    require_master({"subjectAltName": (("URI", "procurator://master"),)})
    for uri in ("procurator://worker/host-a", "procurator://control/ci"):
        posing = {"subjectAltName": (("DNS", MASTER_SERVER_NAME), ("URI", uri))}
        with pytest.raises(UnauthorizedError, match="not of the master"):
            require_master(posing)


def test_help_of_certs_explains_with_an_example() -> None:
    for args in (("certs",), ("certs", "init"), ("certs", "issue")):
        result = cli(*args, "--help")
        assert result.returncode == 0, result.stderr
        assert "example:" in result.stdout


def test_identity_uris() -> None:
    assert parse_identity_uri("procurator://worker/host-a") == PeerIdentity(Role.WORKER, "host-a")
    assert parse_identity_uri("procurator://control/ci") == PeerIdentity(Role.CONTROL, "ci")
    assert parse_identity_uri("procurator://master") == PeerIdentity(Role.MASTER, "")
    for bad in (
        "procurator://worker/",
        "procurator://worker/Host_A",
        "procurator://worker/../x",
        "procurator://admin/root",
        "spiffe://worker/host-a",
    ):
        with pytest.raises(ValidationError):
            parse_identity_uri(bad)


def test_peer_identity_needs_exactly_one_procurator_uri() -> None:
    one = {"subjectAltName": (("URI", "procurator://worker/host-a"), ("DNS", "host-a"))}
    assert peer_identity(one) == PeerIdentity(Role.WORKER, "host-a")
    for cert in (
        None,
        {},
        {"subjectAltName": (("DNS", "host-a"),)},
        {
            "subjectAltName": (
                ("URI", "procurator://worker/host-a"),
                ("URI", "procurator://control/ci"),
            )
        },
        {"subjectAltName": (("URI", "procurator://worker/NOT_AN_ID"),)},
    ):
        with pytest.raises(UnauthorizedError):
            peer_identity(cert)


def test_authorization_rules() -> None:
    worker = PeerIdentity(Role.WORKER, "host-a")
    control = PeerIdentity(Role.CONTROL, "ci")
    master = PeerIdentity(Role.MASTER, "")
    authorize_register(worker, "host-a")
    authorize_register(None, "anyone")  # plaintext on loopback: trusted
    authorize_control(control)
    authorize_control(None)
    with pytest.raises(UnauthorizedError, match="may not register as worker 'host-b'"):
        authorize_register(worker, "host-b")
    for other in (control, master):
        with pytest.raises(UnauthorizedError, match="may not register workers"):
            authorize_register(other, "host-a")
    for other in (worker, master):
        with pytest.raises(UnauthorizedError, match="may not use the control interface"):
            authorize_control(other)


def test_local_addresses_and_the_plaintext_policy(pki: Pki) -> None:
    for text in ("127.0.0.1:7300", "127.8.9.10:1", "[::1]:7300", "localhost:7300", "unix:/x"):
        assert is_local(parse_address(text)), text
    for text in ("0.0.0.0:7300", "[::]:7300", "10.0.0.1:7300", "master.example:7300"):
        assert not is_local(parse_address(text)), text
    remote = parse_address("10.0.0.1:7300")
    with pytest.raises(PermanentError, match="refusing plaintext"):
        require_secure(remote, None, insecure=False, what="connecting to")
    require_secure(remote, None, insecure=True, what="connecting to")
    require_secure(remote, pki.files("control-ci"), insecure=False, what="connecting to")


def test_tls_files_come_from_flags_or_the_environment_all_or_none() -> None:
    env = {
        "PROCURATOR_TLS_CERT": "/e/c.crt",
        "PROCURATOR_TLS_KEY": "/e/c.key",
        "PROCURATOR_TLS_CA": "/e/ca.crt",
    }
    assert TlsFiles.from_options(None, None, None, environ={}) is None
    assert TlsFiles.from_options(None, None, None, environ=env) == TlsFiles(
        Path("/e/c.crt"), Path("/e/c.key"), Path("/e/ca.crt")
    )
    assert TlsFiles.from_options("/f/c.crt", None, None, environ=env) == TlsFiles(
        Path("/f/c.crt"), Path("/e/c.key"), Path("/e/ca.crt")
    )
    with pytest.raises(ValidationError, match="--tls-key, --tls-ca missing"):
        TlsFiles.from_options("/f/c.crt", None, None, environ={})
