"""Merge methods on plain state dicts, and their registry.

Importing this package registers every method; ``get_method(name, **hparams)`` builds one.
"""

from merging.methods.base import MergeMethod, available_methods, get_method, register_method

# Importing a method module registers its methods.
from merging.methods import classic  # noqa: E402,F401
from merging.methods import mties  # noqa: E402,F401
from merging.methods import neulig  # noqa: E402,F401
from merging.methods import mudsc  # noqa: E402,F401

__all__ = ["MergeMethod", "available_methods", "get_method", "register_method"]
