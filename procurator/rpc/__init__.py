"""The Cap'n Proto adapter: the only package that imports ``capnp``.

- ``schema``: loads ``procurator.capnp`` exactly once per process.
- ``bridge``: the one asyncio thread that runs pycapnp, and the trio <-> capnp
  bridge (``open_bridge``, ``Bridge.run``, ``Bridge.call_trio``).
- ``convert``: messages <-> the core's plain values (``procurator.core.models``,
  ``.control``, ``.metrics``), validating every field read off the wire.
- ``master_server``: the master's ``Master``/``Control``/``WorkerSession``
  server over a trio-side ``MasterBackend``.
- ``clients``: ``open_control`` (CLI, CI) and ``CapnpMasterDialer`` (worker).
- ``address``: where a master is (``host:port``, ``unix:/path``) and the
  default (``$PROCURATOR_MASTER``); no capnp.
- ``tls``: mutual TLS contexts, certificate identities and who may do what
  (no capnp; see docs/SECURITY.md).

This ``__init__`` imports nothing, so importing ``procurator.rpc.address``
or ``.tls`` does not pull in Cap'n Proto. The values that cross the
boundary (an apply and its result, the fleet's status, events, metric
samples) are the core's: the master and the worker use them without
depending on this package, which converts them to and from the wire.
"""
