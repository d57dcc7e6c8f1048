"""procurator: a declarative control plane for microVMs whose images are Nix
store paths.

Entry points: ``procurator.cli.main`` (the ``procurator`` command) with its
``master``, ``worker``, ``apply`` and ``status`` subcommands. The package is
split into a pure core (``procurator.core``: models, fleet rules, reconcile
planning) and adapters (``rpc``, ``master``, ``worker``, ``nix``).
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
