"""Lightning callbacks that plug into any project: they observe (MLossMonitor,
StabilityMonitor) or, when added on purpose, act (ExpertDriftStopper)."""

from merging.callbacks.drift import ExpertDriftStopper
from merging.callbacks.mloss_monitor import MLossMonitor
from merging.callbacks.stability_monitor import StabilityMonitor

__all__ = ["ExpertDriftStopper", "MLossMonitor", "StabilityMonitor"]
