"""An expert bundle: what fine-tuning hands to merging, on disk.

A bundle directory holds::

    base.safetensors        θ₀, the pretrained backbone
    expert_0.safetensors    θ_1 ... one backbone state dict per expert
    heads.safetensors       the per-task heads ("<t>.weight", "<t>.bias")
    bundle.json             backbone spec, task names, classes, file list (written last)

Every file is written atomically and ``bundle.json`` last, so a bundle whose manifest
exists is complete; :meth:`ExpertBundle.load` refuses a directory without one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from merging.io import load_state_dict, save_state_dict, write_text_atomic
from merging.models import build_backbone
from merging.state import StateDict, check_compatible

MANIFEST = "bundle.json"


@dataclass
class ExpertBundle:
    """K experts fine-tuned from one base, with their per-task heads.

    Attributes:
        backbone: backbone name for :func:`merging.models.build_backbone`.
        backbone_kwargs: its constructor arguments.
        in_chans: input channels.
        task_names: one name per task; expert t was fine-tuned on task t.
        num_classes: classes of each task.
        base: θ₀.
        experts: θ_1..θ_K, keyed like ``base``.
        heads: head t as ``{"weight": (C_t, d), "bias": (C_t,)}``.
    """

    backbone: str
    backbone_kwargs: dict
    in_chans: int
    task_names: list[str]
    num_classes: list[int]
    base: StateDict
    experts: list[StateDict]
    heads: list[StateDict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.task_names) != len(self.num_classes):
            raise ValueError(f"{len(self.task_names)} task names but {len(self.num_classes)} class counts")
        if self.heads and len(self.heads) != len(self.task_names):
            raise ValueError(f"{len(self.heads)} heads for {len(self.task_names)} tasks")
        check_compatible(self.experts, self.base)

    def build_backbone(self) -> nn.Module:
        """A backbone skeleton holding θ₀ (strict load), in eval mode."""
        skeleton = build_backbone(self.backbone, in_chans=self.in_chans, **self.backbone_kwargs)
        skeleton.load_state_dict(self.base, strict=True)
        return skeleton.eval()

    def build_heads(self) -> nn.ModuleList:
        """One ``nn.Linear`` per task, loaded from :attr:`heads`."""
        heads = nn.ModuleList()
        for t, state in enumerate(self.heads):
            out_features, in_features = state["weight"].shape
            if out_features != self.num_classes[t]:
                raise ValueError(
                    f"head {t} has {out_features} outputs, "
                    f"task {self.task_names[t]!r} has {self.num_classes[t]} classes"
                )
            head = nn.Linear(in_features, out_features)
            head.load_state_dict(state, strict=True)
            heads.append(head)
        return heads

    def save(self, directory: str | Path) -> Path:
        """Write the bundle (each file atomically, the manifest last)."""
        directory = Path(directory)
        save_state_dict(self.base, directory / "base.safetensors")
        files = []
        for j, expert in enumerate(self.experts):
            save_state_dict(expert, directory / f"expert_{j}.safetensors")
            files.append(f"expert_{j}.safetensors")
        heads = {f"{t}.{name}": v for t, head in enumerate(self.heads) for name, v in head.items()}
        if heads:
            save_state_dict(heads, directory / "heads.safetensors")
        manifest = {
            "backbone": self.backbone,
            "backbone_kwargs": self.backbone_kwargs,
            "in_chans": self.in_chans,
            "task_names": self.task_names,
            "num_classes": self.num_classes,
            "experts": files,
            "heads": "heads.safetensors" if heads else None,
        }
        write_text_atomic(directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ExpertBundle:
        """Read a bundle written by :meth:`save`.

        Raises:
            FileNotFoundError: no ``bundle.json`` (not a bundle, or an interrupted save).
        """
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{directory} is not an expert bundle: {MANIFEST} is missing "
                "(write one with MultiExpertModule(export_dir=...) or ExpertBundle.save)"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
            expert_files = manifest["experts"]
            heads_file = manifest["heads"]
            spec = {k: manifest[k] for k in ("backbone", "backbone_kwargs", "in_chans", "task_names", "num_classes")}
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{manifest_path}: malformed bundle manifest ({err!r})") from err
        heads: list[StateDict] = []
        if heads_file:
            flat = load_state_dict(directory / heads_file)
            for t in range(len(spec["task_names"])):
                heads.append({name: flat[f"{t}.{name}"] for name in ("weight", "bias")})
        return cls(
            **spec,
            base=load_state_dict(directory / "base.safetensors"),
            experts=[load_state_dict(directory / f) for f in expert_files],
            heads=heads,
        )
