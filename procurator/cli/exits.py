"""The ``procurator`` command's exit statuses, in one place.

0 success; 1 refused, invalid or unreachable (the message says which); 2
bad usage; 3 ``apply --wait`` timed out; 4 ``apply --wait`` saw a failed
VM; 5 ``apply --wait``: converged, except disconnected workers that the
apply left with nothing to run and that have not confirmed stopping their
VMs (they may still run them); 6 ``apply``: the outcome is unknown (the
master went away after the request was sent and answered no retry within
``--retry-for``; the message names the request id and how to check); 7
``apply --wait``: the rollout the apply started failed or was reverted
(docs/ROLLOUTS.md); 130
interrupted (Ctrl-C); 141 the reader of the output went away (``procurator
status | head``: quietly, as a tool killed by SIGPIPE; see
``procurator.cli.pipes``).
"""

from __future__ import annotations

__all__ = [
    "EXIT_ERROR",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_OUTPUT_CLOSED",
    "EXIT_ROLLOUT_FAILED",
    "EXIT_TIMEOUT",
    "EXIT_UNCONFIRMED",
    "EXIT_UNKNOWN",
    "EXIT_USAGE",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_FAILED = 4
EXIT_UNCONFIRMED = 5
EXIT_UNKNOWN = 6
EXIT_ROLLOUT_FAILED = 7
EXIT_INTERRUPTED = 130
# The reader of our output went away: 128 + SIGPIPE, the status a shell
# reports for a tool that SIGPIPE killed.
EXIT_OUTPUT_CLOSED = 141
