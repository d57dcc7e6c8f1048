"""Composition roots: the one place each daemon is put together.

- ``procurator.app.master``: ``MasterConfig`` -> ``run_master`` (in this
  process, until cancelled) or ``master_main`` (the ``procurator master``
  process: logging, the open-file limit, SIGTERM/SIGINT).
- ``procurator.app.worker``: ``WorkerConfig`` -> ``run_worker`` or
  ``worker_main``, the same for ``procurator worker``.

Each root reads one frozen config object and wires the adapters
(``procurator.rpc``: the bridge, the Cap'n Proto server and dialer) to the
daemon's own package (``procurator.master``, ``procurator.worker``), which
know nothing of Cap'n Proto and nothing of each other. Nothing here parses
flags or prints: ``procurator.cli`` turns flags into a config and calls a
root; tests and benchmarks build a config and call the same root. The
import layers (``pyproject.toml``) put this package above ``rpc``,
``master`` and ``worker`` and below ``cli``.
"""
