"""The Cap'n Proto adapter: the only package that imports ``capnp``.

- ``schema``: loads ``procurator.capnp`` exactly once per process.
- ``bridge``: the one asyncio thread that runs pycapnp, and the trio <-> capnp
  bridge (``open_bridge``, ``Bridge.run``, ``Bridge.call_trio``).
- ``convert``: messages <-> ``procurator.core.models``, validating the wire.
- ``master_server``: the master's ``Master``/``Control``/``WorkerSession``
  server over a trio-side ``MasterBackend``.
- ``clients``: ``open_control`` (CLI, CI) and ``CapnpMasterDialer`` (worker).
- ``messages``: plain values of the boundary (no capnp), usable anywhere.
- ``tls``: mutual TLS contexts, certificate identities and who may do what
  (no capnp; see docs/SECURITY.md).

This ``__init__`` imports nothing, so importing ``procurator.rpc.messages``
does not pull in Cap'n Proto.
"""
