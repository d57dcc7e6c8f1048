"""The one place where a Cap'n Proto server of ours turns a failed call into
an answer: errors are data on the wire, never exceptions.

Every method of ``schema/procurator.capnp`` has an error in its results (a
result union's ``error`` arm, or an ``error`` result); :func:`answer` serves
one call and fills it when the call fails:

- a :class:`~procurator.core.errors.ProcuratorError` (typed: invalid,
  notFound, unauthorized, ...) goes out with its code, message, details and
  op id;
- a request that does not decode (a field of the wrong type, a text without
  its NUL or not UTF-8: ``convert.READ_ERRORS`` while reading the
  parameters) is the caller's fault: ``invalid`` (``limitExceeded`` past the
  traversal limit) naming the field (``convert.malformed_error``), one
  WARNING line in the log;
- anything else is a bug: ``internal`` with a short message and an op id,
  the traceback only in this process's log (ERROR, with that op id).

So no stack trace and no file path of ours ever crosses the wire: pycapnp
would send a raised exception's whole formatted traceback to the peer.

A call is served in two steps, so that an unreadable request can be told
from a bug: ``decode(params)`` reads and checks everything the call needs
from the parameters (capnp thread, no awaiting), then ``serve(request,
results)`` does the work and fills the results. The handler is a pycapnp
``<method>_context`` method, which gets the call context without pycapnp
reading the parameters first (it would raise from its own code, out of
reach of this module, for a malformed top-level parameter).

Capnp thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from procurator.core.errors import ProcuratorError, UnauthorizedError
from procurator.logs import log_context, new_op_id
from procurator.rpc.convert import READ_ERRORS, fill_error, malformed_error

__all__ = ["answer", "error_arm", "error_result", "refuse"]

R = TypeVar("R")

ErrorBuilder = Callable[[Any], Any]
"""Results builder -> the ``Error`` builder to fill (see :func:`error_arm`,
:func:`error_result`)."""


def error_arm(results: Any) -> Any:
    """The ``error`` arm of the ``result`` union (register, control, apply,
    describeVm, the reports)."""
    return results.result.init("error")


def error_result(results: Any) -> Any:
    """The ``error`` result (status, events, getAssignment, Node.push)."""
    return results.init("error")


# Methods whose log lines read as another's: a fleet patch is how `apply`
# travels, and operators grep the log for "apply op-...".
_LOG_NAMES = {"Control.applyPatch": "apply"}


async def answer(
    method: str,
    context: Any,
    error_builder: ErrorBuilder,
    decode: Callable[[Any], R],
    serve: Callable[[R, Any], Awaitable[None]],
    *,
    logger: logging.Logger,
    who: object = "",
    op_id: str = "",
    log_name: str = "the server's log",
) -> None:
    """Serve one call of ``method`` (e.g. ``"Control.status"``): answer
    ``serve(decode(params), results)``, or the error it failed with (see the
    module docstring). ``who`` names the caller in log lines (a connection);
    ``op_id`` is the operation the call starts, if any: it is given to
    errors that carry none (otherwise an error gets a fresh one, so that the
    answer and the log line can be matched). ``log_name`` is where an
    internal error's message sends the reader ("the master's log")."""
    # Log lines name the method by its short name, and an apply by its op id
    # too ("apply op-3f9a0c12b7de refused ..."), as operators grep for them.
    label = _LOG_NAMES.get(method, method.rsplit(".", 1)[-1]) + (f" {op_id}" if op_id else "")
    error: ProcuratorError
    try:
        try:
            request = decode(context.params)
        except READ_ERRORS as exc:
            error = malformed_error(context.params, exc)
            level, why = logging.WARNING, f"refused, malformed: {error.details[0]}"
        else:
            await serve(request, context.results)
            return
    except ProcuratorError as exc:
        refuse(error_builder(context.results), exc, label, logger=logger, who=who, op_id=op_id)
        return
    except Exception as exc:  # a bug: answered, and logged with its traceback
        error = ProcuratorError(f"{method}: internal error; see {log_name}")
        error.op_id = op_id or new_op_id()
        with log_context(op_id=error.op_id):
            logger.error("%s: %s failed unexpectedly", who, label, exc_info=exc)  # noqa: TRY400
        fill_error(error_builder(context.results), error)
        return
    _refuse(error_builder(context.results), error, label, level, why, logger, who, op_id)


def refuse(
    builder: Any,
    error: ProcuratorError,
    label: str,
    *,
    logger: logging.Logger,
    who: object = "",
    op_id: str = "",
    malformed: bool = False,
) -> None:
    """Fill the ``Error`` ``builder`` with ``error`` and log it, as
    :func:`answer` does with an error ``serve`` raised (``malformed``: with
    one ``convert.malformed_error`` made, as for a request that does not
    decode): for a call that answers several results, each with its own
    error (``label`` names the part in the log)."""
    if malformed:
        level, why = logging.WARNING, f"refused, malformed: {error.details[0]}"
    else:
        level = logging.WARNING if isinstance(error, UnauthorizedError) else logging.INFO
        why = f"refused ({error.code}): {error.message}"
    _refuse(builder, error, label, level, why, logger, who, op_id)


def _refuse(
    builder: Any,
    error: ProcuratorError,
    label: str,
    level: int,
    why: str,
    logger: logging.Logger,
    who: object,
    op_id: str,
) -> None:
    error.op_id = error.op_id or op_id or new_op_id()
    with log_context(op_id=error.op_id):
        logger.log(level, "%s: %s %s", who, label, why)
    fill_error(builder, error)
