"""Merging from files stays light: the merge path imports neither torchmetrics (torchvision)
nor Lightning, numba only when a merge runs the fused kernels, and scipy.optimize only when a
matching is solved."""

from __future__ import annotations

import subprocess
import sys


def test_merge_path_imports_no_heavy_modules():
    code = (
        "import sys, merging.streaming, merging.methods\n"
        "heavy = ('torchmetrics', 'torchvision', 'lightning', 'numba', 'scipy.optimize')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "print(','.join(heavy))\n"
        "from merging.mloss.metric import MLoss\n"  # the one M-Loss module that imports torchmetrics
        "print(MLoss.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == ""
    assert out[1] == "merging.mloss.metric"


def test_research_methods_are_imported_on_first_use():
    code = (
        "import sys, merging.methods as m\n"
        "deferred = ('merging.methods.mties', 'merging.methods.mudsc', 'merging.methods.neulig',\n"
        "            'merging.alignment', 'merging.mloss', 'merging.neulig')\n"
        "print(','.join(d for d in deferred if d in sys.modules))\n"
        "print(','.join(m.available_methods()))\n"
        "print(type(m.get_method('mudsc')).__module__, 'merging.methods.mudsc' in sys.modules)\n"
        "print(m.mties.__name__, m.neulig.__name__)\n"
        "try:\n"
        "    m.no_such_module\n"
        "except AttributeError as err:\n"
        "    print('AttributeError', err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == ""
    assert out[1] == "average,dare,mties,mudsc,neulig,task_arithmetic,ties"
    assert out[2] == "merging.methods.mudsc True"
    assert out[3] == "merging.methods.mties merging.methods.neulig"
    assert out[4].startswith("AttributeError") and "no_such_module" in out[4]


def test_every_deferred_name_is_registered_by_its_module():
    import importlib

    from merging.methods import DEFERRED
    from merging.methods.base import _REGISTRY

    for name, module in DEFERRED.items():
        importlib.import_module(module)
        assert _REGISTRY[name].__module__ == module
