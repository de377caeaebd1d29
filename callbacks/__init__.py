"""Lightning callbacks that plug into any project: they observe (MLossMonitor,
StabilityMonitor) or, when added on purpose, act (ExpertDriftStopper)."""

from callbacks.drift import ExpertDriftStopper
from callbacks.mloss_monitor import MLossMonitor
from callbacks.stability_monitor import StabilityMonitor

__all__ = ["ExpertDriftStopper", "MLossMonitor", "StabilityMonitor"]
