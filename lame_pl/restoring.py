"""Restoring a ``LaMEModule`` from a checkpoint file alone: no backbone folder, vocabulary file or ``init_from``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from lame_pl.checkpoint import read_checkpoint

_Module = TypeVar("_Module", bound="RestoredFromFile")  # the class it is called on: LaMEModule

# True while load_from_checkpoint builds a module whose state dict then supplies every weight:
# the backbone and decoder are built from their configs, without reading (or needing) the
# pretrained weights of a local folder. A context variable, not an argument, so that it is
# neither a hyper-parameter saved in checkpoints nor an option of the CLI.
_RESTORING: ContextVar[bool] = ContextVar("lame_restoring", default=False)


def is_restoring() -> bool:
    """Whether the module being built will take every weight from a checkpoint (skip pretrained weights)."""
    return _RESTORING.get()


@contextmanager
def restoring_from_file() -> Iterator[None]:
    """Within the block, modules being built are restored from a checkpoint (``is_restoring``)."""
    token = _RESTORING.set(True)
    try:
        yield
    finally:
        _RESTORING.reset(token)


class RestoredFromFile:
    """Mixin for ``LaMEModule``: Lightning's ``load_from_checkpoint``, reading no file beside the checkpoint."""

    @classmethod
    def load_from_checkpoint(
        cls: type[_Module],
        checkpoint_path: str | Path,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = True,
        **kwargs: Any,
    ) -> _Module:
        """Lightning's ``load_from_checkpoint``, reading no file beside the checkpoint.

        ``init_from`` (weights already in the checkpoint) is not re-read, and the decoder takes
        its output ids from the checkpoint's weights, not from ``decoder.vocab_file`` (an older
        checkpoint without them still reads that file, and names it when it is missing). The
        backbone and decoder are built from their configs alone, since the checkpoint holds
        every weight: a local ``backbone.path`` or ``decoder.path`` is read for its configs when
        it is here, and when it is not, the copies of its configs and processor files stored in
        the checkpoint are unpacked under ``$LAME_PL_CACHE`` (with a warning) and the restored
        module's spec names that folder. (With ``strict=False``, weights missing from the
        checkpoint are therefore randomly initialised, not pretrained.) Keyword arguments
        override hyper-parameters, as in Lightning.
        """
        # A missing folder is replaced only where the caller gives no spec of their own.
        folders = [name for name in ("backbone", "decoder") if name not in kwargs]
        overrides = read_checkpoint(checkpoint_path).restore_overrides(folders)
        with restoring_from_file():
            # weights_only by default: a user-given file must not run code.
            return super().load_from_checkpoint(
                checkpoint_path,
                map_location,
                hparams_file,
                strict,
                weights_only=weights_only,
                **{**overrides, **kwargs},
            )
