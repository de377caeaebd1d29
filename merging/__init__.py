"""lightning-merging: merge-aware fine-tuning and model merging for PyTorch Lightning."""

__version__ = "0.1.0"
