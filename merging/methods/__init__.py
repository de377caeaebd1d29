"""Merge methods on plain state dicts, and their registry.

``get_method(name, **hparams)`` builds one. Importing this package registers the classic
methods (averaging, task arithmetic, TIES, DARE); the research methods (M-TIES, MuDSC,
NeuLig) are registered by name and their modules imported on first use (by
``get_method``, or as attributes: ``merging.methods.mudsc``), so a process that merges with
a classic method does not import the M-Loss meter, the alignment solvers or NeuLig.
"""

import importlib
from types import ModuleType

from merging.methods import classic  # noqa: F401  (registers the classic methods)
from merging.methods.base import MergeMethod, available_methods, get_method, register_deferred, register_method

DEFERRED = {"mties": "merging.methods.mties", "mudsc": "merging.methods.mudsc", "neulig": "merging.methods.neulig"}
"""The research methods: name -> the module that registers it."""

for _name, _module in DEFERRED.items():
    register_deferred(_name, _module)


def __getattr__(name: str) -> ModuleType:
    """``merging.methods.mties`` and the like: the deferred modules, imported on access."""
    module = f"{__name__}.{name}"
    if module in DEFERRED.values():
        return importlib.import_module(module)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MergeMethod", "available_methods", "get_method", "register_deferred", "register_method"]
