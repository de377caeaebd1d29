"""Test-wide settings."""

import warnings

import torch

# The models in tests are tiny: one intra-op thread is fastest on a 2-core machine and
# avoids oversubscription when DDP tests start processes.
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
