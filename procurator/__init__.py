"""procurator: a declarative control plane for microVMs whose images are Nix
store paths.

Entry points: ``procurator.cli.main`` (the ``procurator`` command: ``master``,
``worker``, ``apply``, ``status``, ...) and the composition roots it calls,
``procurator.app.master`` and ``procurator.app.worker``. The package is
layered (``pyproject.toml``'s import contracts): the command and the roots
on top; the adapters (``rpc``, ``master``, ``worker``, then ``nix``) below
them; the pure core (``procurator.core``: models, fleet rules, planners) at
the bottom.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
