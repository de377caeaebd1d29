"""Merge methods on plain state dicts, and their registry.

Importing this package registers every method; ``get_method(name, **hparams)`` builds one.
"""

# Importing a method module registers its methods.
from merging.methods import (
    classic,  # noqa: E402,F401
    mties,  # noqa: E402,F401
    mudsc,  # noqa: E402,F401
    neulig,  # noqa: E402,F401
)
from merging.methods.base import MergeMethod, available_methods, get_method, register_method

__all__ = ["MergeMethod", "available_methods", "get_method", "register_method"]
