"""The pure core: domain models, fleet rules, reconcile planning.

Nothing in here does I/O or imports an I/O library (enforced by the
import-linter contracts in pyproject.toml); adapters translate to and from
these types.
"""
