"""The ``merging`` console script: LightningCLI over every LightningModule and DataModule.

    merging fit --config configs/experts/digits_pretrain.yaml   # θ₀
    merging fit --config configs/experts/digits.yaml            # K experts -> bundle
    merging test --config configs/merge/ties.yaml               # merge + evaluate
    merging diagnose --out runs/diagnostics                     # weight-averaging diagnostics
    merging merge --experts a.safetensors b.safetensors --base base.safetensors --method ties --out merged.safetensors

Any LightningModule / LightningDataModule is selected by ``class_path`` (subclass mode), so
the modules of this project and a user's own are configured the same way.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI


class MergingCLI(LightningCLI):
    """LightningCLI with this project's defaults (configs are overwritten, not refused, on re-runs)."""


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``merging`` script.

    ``merging diagnose ...`` runs :func:`merging.diagnostics.main` (seed 003's analyses);
    ``merging merge ...`` runs :func:`merging.streaming.main` (a streamed merge of
    safetensors files); every other subcommand is LightningCLI's.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["diagnose"]:
        from merging.diagnostics import main as diagnose

        diagnose(argv[1:])
        return
    if argv[:1] == ["merge"]:
        from merging.streaming import main as merge

        merge(argv[1:])
        return
    MergingCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
