"""Finds the TensorBoard ``SummaryWriter`` of a trainer, for what ``self.log`` cannot write (images, projector)."""

from __future__ import annotations

from typing import Any

from lightning import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn


def summary_writer(trainer: Trainer, wanted_by: str) -> Any | None:
    """The ``SummaryWriter`` of the trainer's first ``TensorBoardLogger`` on rank 0, else ``None``.

    Warns (once per message) when there is no TensorBoard logger, naming the callback that needed it.
    """
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    rank_zero_warn(f"callbacks.{wanted_by} writes to TensorBoard, but the trainer has no TensorBoardLogger; skipped")
    return None


def logged_step(trainer: Trainer) -> int:
    """The step Lightning gives to metrics logged with ``self.log`` now, so that images line up with scalars.

    Lightning's logger connector uses the count of optimiser steps taken before the current
    batch, one less than ``global_step`` during a validation inside training.
    """
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(epoch_loop, "_batches_that_stepped", trainer.global_step))
