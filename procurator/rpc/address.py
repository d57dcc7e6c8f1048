"""Where a master is: ``host:port``, ``[v6]:port`` or ``unix:/path``, and
the default (``$PROCURATOR_MASTER``, else ``127.0.0.1:7300``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from procurator.core.errors import ValidationError

__all__ = [
    "DEFAULT_MASTER_ADDRESS",
    "DEFAULT_PORT",
    "MASTER_ENV",
    "Address",
    "default_master_address",
    "parse_address",
]

DEFAULT_PORT = 7300
DEFAULT_MASTER_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"
MASTER_ENV = "PROCURATOR_MASTER"


@dataclass(frozen=True, slots=True)
class Address:
    """Where a master listens: TCP ``host:port`` or a unix socket path."""

    host: str = ""
    port: int = 0
    unix_path: str | None = None

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(text: str, *, default_port: int = DEFAULT_PORT) -> Address:
    """Parse ``host:port``, ``[v6]:port``, ``host`` (default port) or
    ``unix:/path``. Raises ``ValidationError`` naming the text."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValidationError(f"address {text!r}: empty unix socket path")
        return Address(unix_path=path)
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValidationError(f"address {text!r}: unbalanced '['")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValidationError(f"address {text!r}: expected ':port' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise ValidationError(f"address {text!r}: empty host")
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ValidationError(f"address {text!r}: port must be 0..65535")
        port = int(port_text)
    return Address(host=host, port=port)


def default_master_address() -> str:
    """``$PROCURATOR_MASTER`` or ``127.0.0.1:7300``."""
    return os.environ.get(MASTER_ENV) or DEFAULT_MASTER_ADDRESS
