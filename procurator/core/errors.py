"""The project's error taxonomy.

Every adapter (Cap'n Proto, httpx, pyroute2, subprocess, sqlite) translates
the exceptions of its library into these at its boundary, so the core and the
callers only ever see one vocabulary:

- ``PermanentError``: retrying cannot help (bad image, bad config, invalid
  request). Report it and wait for the desired state to change.
- ``TemporaryError``: retrying later may help (VMM not answering, master
  unreachable). Carries a suggested ``delay`` in seconds.

``code`` values match the ``ErrorCode`` enum of ``schema/procurator.capnp``
so that errors cross the wire typed.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "LimitExceededError",
    "NotFoundError",
    "PermanentError",
    "ProcuratorError",
    "StaleGenerationError",
    "TemporaryError",
    "UnauthorizedError",
    "UnavailableError",
    "UnsupportedError",
    "ValidationError",
]


class ProcuratorError(Exception):
    """Base of all errors procurator raises on purpose."""

    code = "internal"

    def __init__(self, message: str, *, details: Sequence[str] = (), op_id: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.details: tuple[str, ...] = tuple(details)
        self.op_id = op_id

    def __str__(self) -> str:
        text = self.message
        if self.details:
            text += "\n" + "\n".join(f"  - {d}" for d in self.details)
        if self.op_id:
            text += f" (op {self.op_id})"
        return text


class PermanentError(ProcuratorError):
    """Retrying the same thing will fail the same way."""


class TemporaryError(ProcuratorError):
    """Retrying later may succeed; ``delay`` is a hint in seconds."""

    code = "unavailable"

    def __init__(
        self,
        message: str,
        *,
        delay: float = 1.0,
        details: Sequence[str] = (),
        op_id: str = "",
    ) -> None:
        super().__init__(message, details=details, op_id=op_id)
        self.delay = delay


class ValidationError(PermanentError):
    """Input (fleet file, request, image config) breaks a rule; ``details``
    holds one line per problem, each naming where it is."""

    code = "invalid"


class StaleGenerationError(PermanentError):
    """An apply named an expected generation that is no longer current."""

    code = "staleGeneration"


class NotFoundError(PermanentError):
    code = "notFound"


class UnauthorizedError(PermanentError):
    code = "unauthorized"


class LimitExceededError(ValidationError):
    code = "limitExceeded"


class UnsupportedError(PermanentError):
    """The peer does not implement what was asked (an older release). Only
    ever raised locally, by the adapter that saw the peer's answer."""


class UnavailableError(TemporaryError):
    """A peer (master, VMM, substituter) cannot be reached right now."""

    code = "unavailable"


_BY_CODE: dict[str, type[ProcuratorError]] = {
    "internal": ProcuratorError,
    "invalid": ValidationError,
    "staleGeneration": StaleGenerationError,
    "notFound": NotFoundError,
    "unauthorized": UnauthorizedError,
    "limitExceeded": LimitExceededError,
    "unavailable": UnavailableError,
}


def error_from_code(
    code: str, message: str, details: Sequence[str] = (), op_id: str = ""
) -> ProcuratorError:
    """Rebuild a typed error from its wire form (unknown codes -> internal)."""
    return _BY_CODE.get(code, ProcuratorError)(message, details=details, op_id=op_id)
