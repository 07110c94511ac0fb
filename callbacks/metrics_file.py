"""Writes the metrics of a validate or test run to a JSON file."""

from __future__ import annotations

import json
from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only


class MetricsFile(Callback):
    """Saves ``trainer.callback_metrics`` as JSON at the end of ``test`` (and ``validate``).

    Args:
        path: File to write; its folder is created.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    @rank_zero_only
    def _write(self, trainer: Trainer) -> None:
        metrics = {name: float(value) for name, value in sorted(trainer.callback_metrics.items())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(metrics, indent=2) + "\n")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer)
