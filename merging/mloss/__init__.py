"""M-Loss (Wang et al., AAAI 2026, https://arxiv.org/abs/2602.08564), becoming a package.

Transitional: every name still lives in :mod:`merging.mloss.gap` (the former
``merging/mloss.py``, moved unchanged so that its history follows); the next commit splits
it into modules with one job each.
"""

from typing import Any

from merging.mloss import gap as _gap

globals().update({name: getattr(_gap, name) for name in _gap.__all__ if name != "MLoss"})
__all__ = list(_gap.__all__)


def __getattr__(name: str) -> Any:
    return _gap.__getattr__(name)
