"""LightningModules: pretraining, jointly fine-tuned experts, ensembles and merges."""

from merging.modules.evaluate import EnsembleModule, MergedModule
from merging.modules.experts import MultiExpertModule, PretrainModule
from merging.modules.neulig import NeuLigModule
from merging.modules.protocols import HasExperts

__all__ = ["EnsembleModule", "HasExperts", "MergedModule", "MultiExpertModule", "NeuLigModule", "PretrainModule"]
