"""Test-wide settings."""

import warnings

import pytest
import torch

# The models in tests are tiny: one intra-op thread is fastest on a 2-core machine and
# avoids oversubscription when DDP tests start processes.
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``cuda`` compare a GPU run with the CPU one: skipped, with the reason,
    where no CUDA device is found (``make test-gpu`` runs them on a GPU)."""
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False here (make test-gpu runs these on a GPU)")
