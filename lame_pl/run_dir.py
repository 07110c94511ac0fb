"""A fit's run folder: where its checkpoints go, whether an earlier run left some there, and the
TensorBoard steps that a resume (or a fresh start) must hide.

Used by ``LaMECLI.before_fit`` (``lame_pl.cli``), before anything is trained or logged.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lightning import Trainer
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lame_pl.checkpoint import load_checkpoint_file

# How a checkpoint folder's hidden temporary files begin (callbacks.checkpointing.temp_path):
# a killed save's leftover, removed by AtomicCheckpoint, not a checkpoint of an earlier run.
_HIDDEN = "."


def checkpoint_folders(trainer: Trainer) -> list[Path]:
    """The local folders the trainer's ``ModelCheckpoint`` callbacks will save into.

    Resolved as ``ModelCheckpoint.setup`` resolves them (``dirpath``, else the first logger's
    ``<save_dir>/<name>/<version>/checkpoints``, else ``<default_root_dir>/checkpoints``).
    """
    folders: list[Path] = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        # Lightning's own resolver (name-mangled private): the same folder setup will use.
        resolve = getattr(callback, "_ModelCheckpoint__resolve_ckpt_dir", None)
        folder = callback.dirpath or (resolve(trainer) if resolve is not None else None)
        if folder and _is_local_file_protocol(str(folder)) and Path(folder) not in folders:
            folders.append(Path(folder))
    return folders


def existing_checkpoints(folder: Path) -> list[Path]:
    """The ``*.ckpt`` entries (files, links, sharded folders) in ``folder``, without temporary files."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.ckpt") if not p.name.startswith(_HIDDEN))


def remove_checkpoints(paths: list[Path]) -> None:
    """Deletes ``paths`` (links first, so that no link is left pointing at a deleted file)."""
    for path in sorted(paths, key=lambda p: not p.is_symlink()):
        rank_zero_info(f"--start_over: removing {path}")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def resumed_step(trainer: Trainer, ckpt_path: str) -> int | None:
    """The global step a fit with ``ckpt_path`` resumes at (``None`` when it is not known here).

    ``"last"`` is resolved as the Trainer resolves it: the newest of the checkpoint callbacks'
    last checkpoints (``AtomicCheckpoint``: the newest that loads).
    """
    if ckpt_path == "last":
        candidates: set[str] = set()
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                candidates |= callback._find_last_checkpoints(trainer)
        local = [c for c in candidates if _is_local_file_protocol(c) and os.path.exists(c)]
        if not local:
            return None  # Lightning warns and starts from scratch
        ckpt_path = max(local, key=os.path.getmtime)
    path = Path(ckpt_path)
    if not path.is_file():  # a URL, "hpc", or a sharded folder: not read here
        return None
    return int(load_checkpoint_file(path, "--ckpt_path").get("global_step", 0))


def set_purge_step(trainer: Trainer, step: int) -> None:
    """Makes the TensorBoard loggers hide the events their run folder holds at ``step`` and after.

    ``SummaryWriter(purge_step=step)`` writes a restart marker at ``step``; TensorBoard then drops
    the earlier files' events at or past it. A resumed run's first logged step is the checkpoint's
    ``global_step`` (Lightning logs a batch at the count of optimiser steps before it), so the
    events a killed run logged after its checkpoint are dropped and each step is shown once.
    """
    for logger in trainer.loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        if logger._experiment is not None:  # the writer exists: too late to give it a purge step
            rank_zero_warn(
                f"TensorBoard writer of {logger.log_dir} already open: events past step {step} "
                "of the earlier run are not hidden"
            )
            continue
        # The logger hands its extra keyword arguments to SummaryWriter when it first creates it.
        logger._kwargs["purge_step"] = step
