"""The ``merging`` console script: LightningCLI over every LightningModule and DataModule.

    merging fit --config configs/experts/digits_pretrain.yaml   # θ₀
    merging fit --config configs/experts/digits.yaml            # K experts -> bundle
    merging test --config configs/merge/ties.yaml               # merge + evaluate
    merging diagnose --out runs/diagnostics                     # weight-averaging diagnostics
    merging claims --config benchmarks/claims.yaml              # the pre-registered claims benchmark
    merging merge --experts a.safetensors b.safetensors --base base.safetensors --method ties --out merged.safetensors
    merging convert model.ckpt model.safetensors --prefix model.  # torch/Lightning file -> safetensors

Any LightningModule / LightningDataModule is selected by ``class_path`` (subclass mode), so
the modules of this project and a user's own are configured the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch.cli import LightningCLI
from rich.console import Console
from rich.table import Table


class MergingCLI(LightningCLI):
    """LightningCLI with this project's defaults: configs are overwritten, not refused, on
    re-runs, and ``validate``/``test`` print one table with each metric once.

    Lightning prints a column per DataLoader and repeats there every metric logged once per
    epoch (a merge's summary metrics), cutting long names short; :meth:`validate` and
    :meth:`test` print :func:`results_table` instead (``--verbose false`` prints nothing).
    """

    def validate(self, model: Any, verbose: bool = True, **kwargs: Any) -> list[dict[str, float]]:
        """``trainer.validate`` with :func:`results_table` in place of Lightning's tables."""
        results = self.trainer.validate(model, verbose=False, **kwargs)
        if verbose and self.trainer.is_global_zero:
            Console().print(results_table(results, "Validate"))
        return results

    def test(self, model: Any, verbose: bool = True, **kwargs: Any) -> list[dict[str, float]]:
        """``trainer.test`` with :func:`results_table` in place of Lightning's tables."""
        results = self.trainer.test(model, verbose=False, **kwargs)
        if verbose and self.trainer.is_global_zero:
            Console().print(results_table(results, "Test"))
        return results


def results_table(results: Sequence[Mapping[str, float]], stage: str = "Test") -> Table:
    """One row per metric, full names, from ``trainer.test``/``validate``'s per-DataLoader dicts.

    A metric logged without a DataLoader index appears in every DataLoader's dict with the
    same value; it is listed once. Per-DataLoader metrics keep their ``/dataloader_idx_<i>``
    suffix, so no name is lost.
    """
    merged: dict[str, float] = {}
    for per_loader in results:
        merged.update(per_loader)
    table = Table(title=f"{stage} results ({len(merged)} metrics)")
    table.add_column("metric", overflow="fold", no_wrap=False)
    table.add_column("value", justify="right", overflow="fold")
    for name in sorted(merged):
        table.add_row(name, f"{float(merged[name]):.6g}")
    return table


def convert(argv: Sequence[str]) -> None:
    """``merging convert IN OUT [--prefix P]``: a torch or Lightning checkpoint to safetensors.

    The file is read with :func:`merging.io.load_state_dict` (``weights_only``: never
    arbitrary unpickling; values checked) and written atomically with
    :func:`merging.io.save_state_dict`.
    """
    from merging.io import load_state_dict, save_state_dict

    parser = argparse.ArgumentParser(
        prog="merging convert", description="Convert a torch / Lightning checkpoint into a safetensors state dict."
    )
    parser.add_argument("source", metavar="IN", help="*.pt, *.pth, *.bin or a Lightning *.ckpt")
    parser.add_argument("target", metavar="OUT", help="the *.safetensors file to write")
    parser.add_argument("--prefix", help="keep only keys with this prefix and strip it (e.g. model.)")
    args = parser.parse_args(argv)
    try:
        state = load_state_dict(args.source, prefix=args.prefix)
        save_state_dict(state, args.target, metadata={"converted_from": str(args.source)})
    except (OSError, ValueError) as err:  # StateDictError is a ValueError
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    sys.stderr.write(f"{parser.prog}: wrote {args.target} ({len(state)} tensors)\n")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``merging`` script.

    ``merging diagnose ...`` runs :func:`merging.experiments.diagnostics.main` (the analyses of
    *Rethinking Weight-Averaged Model-merging*, arXiv 2411.09263, on digits);
    ``merging claims ...`` runs :func:`merging.experiments.claims.run.main` (the claims benchmark);
    ``merging merge ...`` runs :func:`merging.streaming.main` (a streamed merge of
    safetensors files); ``merging convert IN OUT`` turns a torch checkpoint into one
    (:func:`convert`); every other subcommand is LightningCLI's.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["diagnose"]:
        from merging.experiments.diagnostics import main as diagnose

        diagnose(argv[1:])
        return
    if argv[:1] == ["claims"]:
        from merging.experiments.claims.run import main as claims

        claims(argv[1:])
        return
    if argv[:1] == ["convert"]:
        convert(argv[1:])
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
