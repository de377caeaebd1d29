"""The fused CPU kernels where numba finds no writable cache folder (a read-only
site-packages with a read-only home): they are compiled without a cache, with one warning,
instead of failing the merge with numba's "no locator available" error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, warnings
    import numba.core.caching as caching
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # renamed in numba 0.59
    impl._locator_classes = []  # numba finds no writable cache folder anywhere
    import torch
    from merging.methods import _kernels, get_method
    torch.manual_seed(0)
    base = {"w": torch.randn(1 << 20), "b": torch.randn(64)}
    experts = [{k: v + 0.01 * torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    assert _kernels.available(list(base.values()), total=sum(v.numel() for v in base.values()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = get_method("ties").merge(experts, base)
    with _kernels.disabled():
        plain = get_method("ties").merge(experts, base)
    from merging.methods import _numba_kernels
    print(json.dumps({
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "uncached": _numba_kernels._uncached,
        "max_diff": max(float((fused[k] - plain[k]).abs().max()) for k in base),
    }))
    """
)


@pytest.mark.slow
def test_kernels_compile_without_a_cache_folder_and_warn_once():
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "MERGING_NO_NUMBA")}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report["warnings"]) == 1
    assert "NUMBA_CACHE_DIR" in report["warnings"][0]
    assert set(report["uncached"]) >= {"_scan_kernel", "_ties_kernel"}
    assert report["max_diff"] < 1e-6
