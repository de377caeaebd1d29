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
