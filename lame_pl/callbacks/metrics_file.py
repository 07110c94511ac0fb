"""Writes the metrics of a validate or test run to a JSON file."""

from __future__ import annotations

import json
from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

DEFAULT_NAME = "test_metrics.json"


class MetricsFile(Callback):
    """Saves ``trainer.callback_metrics`` as JSON at the end of ``test`` (and ``validate``).

    Args:
        path: File to write; its folder is created. By default ``test_metrics.json`` in the
            logger's ``save_dir`` (``runs/demo/test_metrics.json`` for the demo), or in
            ``trainer.default_root_dir`` when the run has no logger or its logger has no
            ``save_dir``: a config that moves its logger moves the metrics with it.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = Path(path) if path is not None else None

    def resolve_path(self, trainer: Trainer) -> Path:
        """The file this run writes: ``path``, or the default beside the logger's runs."""
        if self.path is not None:
            return self.path
        save_dir = trainer.logger.save_dir if trainer.logger is not None else None
        return Path(save_dir if save_dir is not None else trainer.default_root_dir) / DEFAULT_NAME

    @rank_zero_only
    def _write(self, trainer: Trainer) -> None:
        path = self.resolve_path(trainer)
        metrics = {name: float(value) for name, value in sorted(trainer.callback_metrics.items())}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2) + "\n")
        rank_zero_info(f"metrics written to {path}")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer)
