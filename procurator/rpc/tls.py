"""Mutual TLS for every connection to the master, and who a peer is.

No Cap'n Proto here (only ``ssl``), so the CLI and the certificate tool can
use it without loading the RPC stack.

**Identity.** Every certificate of a fleet is signed by the fleet's private
CA and names its holder with one URI subject alternative name:

- ``procurator://worker/<worker id>``: a worker; it may ``Master.register``
  as exactly that worker id, and nothing else;
- ``procurator://control/<name>``: a person or a CI pipeline; it may call
  ``Master.control`` (apply, status, events, describe) and nothing else;
- ``procurator://master``: the master's server certificate, which also
  carries the DNS name :data:`MASTER_SERVER_NAME`; clients check that name
  (``server_hostname``), whatever address they dialed, so a worker's or a
  control certificate can never pose as the master.

The common name repeats the id for people reading ``openssl x509`` output;
only the URI counts. A certificate with no procurator URI, or with more
than one, has no identity and is refused.

**Invariants.**

- Both sides require a certificate signed by the fleet CA
  (``CERT_REQUIRED``), TLS 1.3 only; there is no anonymous TLS.
- Without TLS material a connection is plaintext, which is allowed only when
  it cannot leave the host: a unix socket or a loopback address
  (:func:`require_secure`). Anything else needs TLS or an explicit
  ``insecure=True`` (the ``--insecure`` flag), which logs a loud warning.
- Over plaintext there is no peer identity: whoever can reach a loopback
  port or a unix socket is trusted with every role (:func:`authorize_register`,
  :func:`authorize_control` get ``None``). Use TLS, or file permissions on
  the unix socket, where that is not acceptable.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from procurator.core.errors import PermanentError, UnauthorizedError, ValidationError
from procurator.core.validation import check_worker_id
from procurator.rpc.address import Address

__all__ = [
    "ENV_CA",
    "ENV_CERT",
    "ENV_KEY",
    "HANDSHAKE_TIMEOUT",
    "IDENTITY_SCHEME",
    "MASTER_SERVER_NAME",
    "PeerIdentity",
    "Role",
    "TlsFiles",
    "authorize_control",
    "authorize_register",
    "client_context",
    "identity_uri",
    "is_local",
    "parse_identity_uri",
    "peer_identity",
    "require_master",
    "require_secure",
    "server_context",
]

logger = logging.getLogger(__name__)

IDENTITY_SCHEME = "procurator"
MASTER_SERVER_NAME = "master.procurator"
ENV_CERT = "PROCURATOR_TLS_CERT"
ENV_KEY = "PROCURATOR_TLS_KEY"
ENV_CA = "PROCURATOR_TLS_CA"
# A peer that opens a TCP connection and never finishes the handshake holds
# a socket only this long (asyncio's default is 60 s).
HANDSHAKE_TIMEOUT = 10.0


class Role(enum.Enum):
    """What a certificate's holder may do."""

    WORKER = "worker"
    CONTROL = "control"
    MASTER = "master"


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who is on the other end of a TLS connection, from its certificate."""

    role: Role
    name: str  # worker id, control name; "" for the master

    def __str__(self) -> str:
        return identity_uri(self.role, self.name)


def identity_uri(role: Role, name: str = "") -> str:
    """The URI SAN naming ``role``/``name``, e.g. ``procurator://worker/host-a``."""
    if role is Role.MASTER:
        return f"{IDENTITY_SCHEME}://master"
    return f"{IDENTITY_SCHEME}://{role.value}/{name}"


def parse_identity_uri(uri: str) -> PeerIdentity:
    """The identity a URI SAN names; raises ``ValidationError`` when it is
    not one of ours or names an invalid id."""
    prefix = f"{IDENTITY_SCHEME}://"
    if not uri.startswith(prefix):
        raise ValidationError(f"{uri[:200]!r} is not a {prefix} identity")
    rest = uri[len(prefix) :]
    if rest == "master":
        return PeerIdentity(Role.MASTER, "")
    kind, sep, name = rest.partition("/")
    if not sep or kind not in (Role.WORKER.value, Role.CONTROL.value):
        raise ValidationError(
            f"{uri[:200]!r}: expected {prefix}worker/<id>, {prefix}control/<name> or {prefix}master"
        )
    # Worker ids and control names obey the same rule: they become log
    # fields and file names.
    if (problem := check_worker_id(name)) is not None:
        raise ValidationError(f"{uri[:200]!r}: {problem}")
    return PeerIdentity(Role(kind), name)


def peer_identity(peercert: Mapping[str, Any] | None) -> PeerIdentity:
    """The identity in a verified peer certificate (``getpeercert()``).
    Raises ``UnauthorizedError`` unless it names exactly one."""
    if not peercert:
        raise UnauthorizedError("the peer presented no certificate")
    uris = [
        value
        for kind, value in peercert.get("subjectAltName", ())
        if kind == "URI" and str(value).startswith(f"{IDENTITY_SCHEME}://")
    ]
    if len(uris) != 1:
        raise UnauthorizedError(
            f"the peer's certificate names {len(uris)} {IDENTITY_SCHEME}:// identities; "
            "exactly one is required (see docs/SECURITY.md)"
        )
    try:
        return parse_identity_uri(str(uris[0]))
    except ValidationError as exc:
        raise UnauthorizedError(f"the peer's certificate: {exc.message}") from None


# ---------------------------------------------------------------- authorization


def authorize_register(peer: PeerIdentity | None, worker_id: str) -> None:
    """Raise ``UnauthorizedError`` unless ``peer`` may register as
    ``worker_id``. ``None``: a plaintext connection, trusted (module doc)."""
    if peer is None:
        return
    if peer.role is not Role.WORKER:
        raise UnauthorizedError(
            f"{peer} may not register workers: only a worker certificate can "
            f"(procurator://worker/{worker_id})"
        )
    if peer.name != worker_id:
        raise UnauthorizedError(
            f"{peer} may not register as worker {worker_id!r}: its certificate is for "
            f"worker {peer.name!r}"
        )


def authorize_control(peer: PeerIdentity | None) -> None:
    """Raise ``UnauthorizedError`` unless ``peer`` may use ``Control``."""
    if peer is None or peer.role is Role.CONTROL:
        return
    raise UnauthorizedError(
        f"{peer} may not use the control interface: it needs a control certificate "
        "(procurator://control/<name>)"
    )


def require_master(peercert: Mapping[str, Any] | None) -> None:
    """Raise ``UnauthorizedError`` unless the server we dialed holds the
    master's identity. The name check in the handshake (``master.procurator``)
    plus OpenSSL's purpose check already stop a fleet worker or control
    certificate; this holds even for a certificate issued without extended
    key usage that also carries the master's DNS name."""
    peer = peer_identity(peercert)
    if peer.role is not Role.MASTER:
        raise UnauthorizedError(
            f"the server presented the certificate of {peer}, not of the master "
            f"({identity_uri(Role.MASTER)})"
        )


# ---------------------------------------------------------------- contexts


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files of one party: its certificate (chain), key and the fleet CA."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_options(
        cls,
        cert: str | None,
        key: str | None,
        ca: str | None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> TlsFiles | None:
        """From flags, each falling back to its ``PROCURATOR_TLS_*``
        variable; None when none of the three is given anywhere. Raises
        ``ValidationError`` when only some are."""
        env = os.environ if environ is None else environ
        values = {
            "--tls-cert": cert or env.get(ENV_CERT, ""),
            "--tls-key": key or env.get(ENV_KEY, ""),
            "--tls-ca": ca or env.get(ENV_CA, ""),
        }
        given = [name for name, value in values.items() if value]
        if not given:
            return None
        missing = [name for name in values if name not in given]
        if missing:
            raise ValidationError(
                f"TLS needs a certificate, its key and the CA: {', '.join(missing)} "
                f"missing (or ${ENV_CERT} / ${ENV_KEY} / ${ENV_CA})"
            )
        return cls(Path(values["--tls-cert"]), Path(values["--tls-key"]), Path(values["--tls-ca"]))


def _base_context(purpose: ssl.Purpose, files: TlsFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        # Only the fleet CA: never the system's public roots.
        context.load_verify_locations(cafile=str(files.ca))
    except (OSError, ssl.SSLError) as exc:
        raise PermanentError(f"TLS CA {files.ca}: cannot load: {_reason(exc)}") from None
    try:
        context.load_cert_chain(certfile=str(files.cert), keyfile=str(files.key))
    except (OSError, ssl.SSLError) as exc:
        raise PermanentError(
            f"TLS certificate {files.cert} with key {files.key}: cannot load: {_reason(exc)}"
        ) from None
    return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The master's context: TLS 1.3, a client certificate from the fleet CA
    required. Raises ``PermanentError`` naming the file that is wrong."""
    return _base_context(ssl.Purpose.CLIENT_AUTH, files)


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A worker's or a control client's context: TLS 1.3, the master's
    certificate must come from the fleet CA and name
    :data:`MASTER_SERVER_NAME` (pass it as ``server_hostname``)."""
    context = _base_context(ssl.Purpose.SERVER_AUTH, files)
    context.check_hostname = True
    return context


# ---------------------------------------------------------------- policy


def is_local(address: Address) -> bool:
    """True when traffic to ``address`` cannot leave this host: a unix
    socket, ``localhost`` or a loopback IP. Other names are not resolved
    (DNS could say anything), so they count as remote."""
    if address.unix_path is not None:
        return True
    host = address.host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def require_secure(
    address: Address, tls: TlsFiles | ssl.SSLContext | None, *, insecure: bool, what: str
) -> None:
    """Refuse plaintext to or on a non-local ``address`` unless ``insecure``
    (then warn loudly). ``what`` says who asks: "the master listening on",
    "connecting to the master at"."""
    if tls is not None or is_local(address):
        return
    if not insecure:
        raise PermanentError(
            f"{what} {address}: refusing plaintext Cap'n Proto on a non-loopback address; "
            "give --tls-cert, --tls-key and --tls-ca (or $PROCURATOR_TLS_CERT/KEY/CA; "
            "`procurator certs` makes them), or --insecure to accept that anyone on the "
            "network can read the traffic and act as any worker or operator"
        )
    logger.warning(
        "INSECURE: %s %s without TLS: anyone on the network can read the traffic and "
        "act as any worker or operator (--insecure)",
        what,
        address,
    )
