"""The Trainer factory and the hardware options of the experiment scripts."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def quiet_trainer(accelerator: str = "cpu", devices: int | str = 1, **kwargs: Any) -> pl.Trainer:
    """A Trainer with no logger, checkpoints, progress bar or summary (scripted runs).

    Args:
        accelerator: Lightning's accelerator (``"cpu"``, ``"gpu"``, ``"auto"``, ...).
        devices: Lightning's devices.
        **kwargs: any other ``Trainer`` argument.
    """
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def add_hardware_arguments(parser: Any) -> None:
    """``--accelerator`` (default ``auto``: a GPU where one is found) and ``--devices`` (default 1)
    for the scripts' Trainers (an ``argparse.ArgumentParser``)."""
    parser.add_argument(
        "--accelerator", default="auto", help="Lightning accelerator: auto (a GPU where there is one), cpu, gpu, ..."
    )
    parser.add_argument(
        "--devices",
        type=_devices,
        default=1,
        help="Lightning devices: a count, a list such as 0,1, or auto (default 1)",
    )


def _devices(value: str) -> int | str:
    return int(value) if value.lstrip("-").isdigit() else value
