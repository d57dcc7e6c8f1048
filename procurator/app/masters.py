"""The masters a worker or a client is given: ``--master`` and
``$PROCURATOR_MASTER`` name one (``HOST:PORT``, ``[V6]:PORT``, ``HOST``,
``unix:/path``) or several, separated by commas
(``a:7300,b:7300,c:7300``): masters sharing one PostgreSQL database
(docs/HA.md), tried in the order given."""

from __future__ import annotations

from procurator.core.errors import ValidationError
from procurator.rpc.address import Address, parse_address

__all__ = ["master_addresses"]


def master_addresses(text: str) -> list[Address]:
    """Every master ``text`` names, in order; ``ValidationError`` naming
    the entry that is not an address (or empty, or given twice)."""
    entries = [entry.strip() for entry in text.split(",")]
    if not any(entries):
        raise ValidationError("no master address given")
    addresses: list[Address] = []
    for position, entry in enumerate(entries, 1):
        if not entry:
            raise ValidationError(f"master addresses {text!r}: entry {position} is empty")
        address = parse_address(entry)
        if address in addresses:
            raise ValidationError(f"master addresses {text!r}: {entry} is given twice")
        addresses.append(address)
    return addresses
