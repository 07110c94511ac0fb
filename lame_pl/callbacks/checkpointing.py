"""Checkpoints that survive a kill: atomic writes, ``last.ckpt`` as an atomic link, recent steps kept.

``AtomicCheckpoint`` is a ``ModelCheckpoint`` that

- writes every checkpoint through ``AtomicCheckpointIO``: a temporary file in the checkpoint's own
  directory (never ``$TMPDIR``, which may be another filesystem, where a rename is a copy that a
  kill truncates), fsynced, then renamed over the final name;
- makes ``last.ckpt`` a link to the newest step checkpoint (a symlink, a hard link where
  symlinks fail), replaced atomically, so it is never a second full copy nor a half-written one;
- keeps the newest ``keep_last_n`` step checkpoints (Lightning's top-k, ranked by step), so a
  rollback exists;
- resolves ``--ckpt_path last`` to the newest checkpoint in its directory that loads, warning
  about any newer one that does not (``newest_loadable_checkpoint``);
- removes the temporary files a killed run left in its directory when a new fit starts.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lame_pl.checkpoint import CheckpointError, load_checkpoint_file

# A temporary file is hidden and named after its final file: ".last.ckpt.tmp-<pid>-<random>".
# Hidden, so that Lightning's own "last*.ckpt" search never mistakes one for a checkpoint.
TEMP_INFIX = ".tmp-"
_TEMP_NAME = re.compile(r"^\..+\.ckpt" + re.escape(TEMP_INFIX) + r"\d+-[0-9a-f]+$")


def temp_path(path: Path) -> Path:
    """A fresh temporary name beside ``path`` (same directory, so the final rename is atomic)."""
    return path.with_name(f".{path.name}{TEMP_INFIX}{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_file(path: Path) -> bool:
    """Whether ``path`` is named as ``temp_path`` names a temporary checkpoint file."""
    return bool(_TEMP_NAME.match(path.name))


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in ``directory`` durable (a crash after it does not bring the old entry back)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_link(target: Path, link: Path) -> None:
    """Points ``link`` at ``target``: a relative symlink, else a hard link, else a copy, put in
    place by one rename, so that ``link`` is at every moment either the old file or the new one."""
    tmp = temp_path(link)
    try:
        try:
            os.symlink(os.path.relpath(target, link.parent), tmp)
        except OSError:
            if target.is_dir():  # a sharded (DeepSpeed) checkpoint folder: no hard link to a folder
                shutil.copytree(target, tmp)
            else:
                try:
                    os.link(target, tmp)
                except OSError:  # neither link kind: a full copy, still complete before it is visible
                    shutil.copyfile(target, tmp)
                    with open(tmp, "rb+") as copied:
                        os.fsync(copied.fileno())
        if link.is_dir() and not link.is_symlink():  # a rename cannot replace a folder (Lightning removes it too)
            shutil.rmtree(link)
        os.replace(tmp, link)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(link.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic on the checkpoint's own filesystem.

    ``torch.save`` writes to a temporary file beside the target, which is fsynced and renamed over
    it; a kill leaves the previous file whole (and at most a hidden temporary file, removed by
    ``AtomicCheckpoint`` at the next fit). Remote paths (``s3://``...) are saved as Lightning does.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Writes ``checkpoint`` to ``path`` through a temporary file in the same directory."""
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        try:
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_directory(path.parent)


def newest_loadable_checkpoint(directory: str | Path) -> Path | None:
    """The newest ``*.ckpt`` in ``directory`` that loads (``None`` if none does).

    Files are tried newest first (by the modification time of the file a link points to); each
    newer one that does not load is skipped with a warning naming it and what is wrong. A link
    (``last.ckpt``) is returned in place of its target when it points to the chosen file. A
    sharded checkpoint folder (DeepSpeed) is taken as it is: only its strategy can read it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    # One entry per file on disk: last.ckpt (a symlink or a hard link) and the step file it names.
    by_file: dict[tuple[int, int], list[Path]] = {}
    for path in sorted(directory.glob("*.ckpt")):
        if is_temp_file(path):
            continue
        if not path.exists():  # a link whose file is gone
            rank_zero_warn(f"checkpoint {path} is a link to a missing file: skipped")
            continue
        stat = path.stat()
        by_file.setdefault((stat.st_dev, stat.st_ino), []).append(path)
    for names in sorted(by_file.values(), key=lambda names: names[0].stat().st_mtime_ns, reverse=True):
        if names[0].is_dir():  # a sharded (DeepSpeed) checkpoint folder: only its strategy can read it
            return next((p for p in names if p.name.startswith(ModelCheckpoint.CHECKPOINT_NAME_LAST)), names[0])
        try:
            load_checkpoint_file(names[0])
        except CheckpointError as error:
            rank_zero_warn(f"{error}: skipped, trying an older checkpoint")
            continue
        # The last*.ckpt name where the file has one (what Lightning would have picked).
        return next((p for p in names if p.name.startswith(ModelCheckpoint.CHECKPOINT_NAME_LAST)), names[0])
    return None


class AtomicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with atomic saves, ``last.ckpt`` as an atomic link and a keep-last-N policy.

    Args:
        keep_last_n: Keep the newest N step checkpoints (ranked by global step with Lightning's
            ``save_top_k``), deleting older ones; ``None`` keeps what ``save_top_k`` says.
            Needs no ``monitor`` (it ranks by step).
        save_last: As ``ModelCheckpoint``'s; ``"link"`` (the default) makes ``last.ckpt`` a link
            to the newest checkpoint instead of a second full copy.
        **kwargs: ``ModelCheckpoint``'s other arguments (``dirpath``, ``every_n_train_steps``...).
    """

    def __init__(self, keep_last_n: int | None = None, save_last: bool | str | None = "link", **kwargs: Any) -> None:
        if keep_last_n is not None:
            if isinstance(keep_last_n, bool) or not isinstance(keep_last_n, int) or keep_last_n < 1:
                raise ValueError(f"AtomicCheckpoint keep_last_n must be an integer >= 1, got {keep_last_n!r}")
            if kwargs.get("monitor") is not None or kwargs.get("save_top_k") not in (None, 1):
                raise ValueError(
                    "AtomicCheckpoint keep_last_n ranks checkpoints by step: give neither monitor "
                    "nor save_top_k with it"
                )
            # Lightning's top-k over the step, highest kept: the newest N, with its own pruning.
            kwargs.update(monitor="step", mode="max", save_top_k=keep_last_n)
        super().__init__(save_last=save_last, **kwargs)
        self.keep_last_n = keep_last_n

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Installs ``AtomicCheckpointIO`` and removes the temporary files a killed fit left."""
        super().setup(trainer, pl_module, stage)
        # Only the stock single-file writer is replaced: DeepSpeed and sharded strategies write
        # their own folders, and a user's own CheckpointIO plugin is left alone.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if stage == "fit" and trainer.is_global_zero and self.dirpath and _is_local_file_protocol(self.dirpath):
            directory = Path(self.dirpath)
            for path in directory.iterdir() if directory.is_dir() else ():
                if is_temp_file(path):
                    rank_zero_info(f"removing {path}, a partial checkpoint of an interrupted save")
                    path.unlink(missing_ok=True)
        if stage == "fit" and self.save_last == "link" and self.dirpath:
            # A last.ckpt that is only a link is re-pointed, never left stale beside a last-v1.ckpt
            # (Lightning keeps a last.ckpt it did not write this run, as it may be a full file).
            last = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
            if os.path.islink(last) or (os.path.isfile(last) and os.stat(last).st_nlink > 1):
                self.last_model_path = last

    @staticmethod
    def _link_checkpoint(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        # Lightning's version removes last.ckpt before linking: a kill between leaves none.
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            atomic_link(Path(filepath), Path(linkpath))
        trainer.strategy.barrier()

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        # Called by Lightning to resolve ckpt_path="last": the newest checkpoint of this
        # callback's directory that loads, not the newest file named last*.ckpt.
        found = {Path(p).parent for p in super()._find_last_checkpoints(trainer)}
        resolve = getattr(self, "_ModelCheckpoint__resolve_ckpt_dir", None)  # where setup will save
        if resolve is not None and _is_local_file_protocol(str(resolve(trainer))):
            found.add(Path(resolve(trainer)))
        newest = [path for path in map(newest_loadable_checkpoint, found) if path is not None]
        return {os.path.normpath(path) for path in newest}
