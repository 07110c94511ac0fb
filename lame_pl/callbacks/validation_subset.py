"""The shared base of the diagnostics callbacks: the first N validation samples, every N validations.

Validation reads its shards in file order, so the first N samples of a validation run are the
same samples every time: a fixed subset whose statistics can be compared across a run. Under
DDP each rank reads its own shards; the subset is rank 0's first N samples and every statistic
is computed and logged on rank 0 alone, so no collective is added (and none can be left waiting).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

from lame_pl.eval_output import EvalOutput


class FirstRows:
    """Collects named columns (tensors or lists, one row per sample) up to ``limit`` rows."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self._parts: dict[str, list[Any]] = {}

    @property
    def room(self) -> int:
        """How many more rows fit."""
        return self.limit - self.count

    def add(self, **columns: torch.Tensor | list[Any]) -> None:
        """Appends the first ``room`` rows of every column; all columns must have as many rows."""
        sizes = {name: len(value) for name, value in columns.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"columns disagree on the number of rows: {sizes}")
        taken = min(self.room, next(iter(sizes.values()), 0))
        if taken <= 0:
            return
        for name, value in columns.items():
            part = value[:taken]
            self._parts.setdefault(name, []).append(part.detach().cpu() if torch.is_tensor(part) else list(part))
        self.count += taken

    def tensor(self, name: str) -> torch.Tensor:
        """The rows of a tensor column, concatenated."""
        return torch.cat(self._parts[name])

    def values(self, name: str) -> list[Any]:
        """The rows of a list column, concatenated."""
        return [row for part in self._parts[name] for row in part]

    def __contains__(self, name: str) -> bool:
        return name in self._parts


class ValidationSubsetCallback(Callback):
    """Collects the first ``num_samples`` validation samples on rank 0 and reports on them.

    A subclass implements ``collect`` (called per validation batch while there is room) and
    ``report`` (called at the end of the validation run). Sanity-check runs are left out.

    Args:
        num_samples: Size of the fixed validation subset (rank 0's first samples).
        every_n_epochs: Report on every n-th validation run (the first one included).
    """

    def __init__(self, num_samples: int = 64, every_n_epochs: int = 1) -> None:
        name = type(self).__name__
        if not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"{name}.num_samples must be an integer >= 2 (pairs are compared), got {num_samples!r}")
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"{name}.every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.validations = 0  # completed validation runs, counted alike on every rank
        self.rows = FirstRows(num_samples)
        self._active = False

    def collect(self, pl_module: LightningModule, outputs: EvalOutput, batch: dict[str, Any]) -> None:
        """Adds what this callback needs from one validation batch to ``self.rows``."""
        raise NotImplementedError

    def report(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Computes and logs the statistics of ``self.rows`` (rank 0 only)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The count of validation runs, so that a resumed run keeps the ``every_n_epochs`` cadence."""
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        due = self.validations % self.every_n_epochs == 0
        self._active = due and trainer.is_global_zero and not trainer.sanity_checking
        self.rows = FirstRows(self.num_samples)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or self.rows.room <= 0:
            return
        if not isinstance(outputs, EvalOutput):
            raise TypeError(
                f"callbacks.{type(self).__name__} reads the lame_pl.eval_output.EvalOutput that LaMEModule."
                f"validation_step returns; {type(pl_module).__name__}.validation_step returned {type(outputs).__name__}"
            )
        self.collect(pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._active and self.rows.count >= 2:
            self.report(trainer, pl_module)
        self._active = False
        self.rows = FirstRows(self.num_samples)  # not held between validation runs
        self.validations += 1
