"""Saves what ``lightning predict`` computes: the embeddings of every sample, keyed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter


class EmbeddingWriter(BasePredictionWriter):
    """Writes ``{"keys": [...], "query": (N, D), "target": (N, D)}`` to one ``.pt`` file per rank.

    Args:
        path: Output file; with several processes, ``.rankN`` is added before the suffix.
    """

    def __init__(self, path: str) -> None:
        super().__init__(write_interval="epoch")
        self.path = Path(path)

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: list[Any], batch_indices: Any
    ) -> None:
        if not predictions:
            return
        out: dict[str, Any] = {"keys": [key for batch in predictions for key in batch["keys"]]}
        for side in ("query", "target"):
            if side in predictions[0]:
                out[side] = torch.cat([batch[side].float().cpu() for batch in predictions])
        path = self.path
        if trainer.world_size > 1:
            path = path.with_suffix(f".rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
