"""The query-target cosine similarity matrix of a fixed validation subset, as a TensorBoard image."""

from __future__ import annotations

from typing import Any

import torch
from lightning import LightningModule, Trainer

from callbacks.tensorboard_writer import logged_step, summary_writer
from callbacks.validation_subset import ValidationSubsetCallback

TAG = "diag/similarity"


def render_heatmap(values: torch.Tensor, cell: int = 4) -> torch.Tensor:
    """A ``(N, M)`` matrix of values in ``[-1, 1]`` as a ``(3, N*cell, M*cell)`` uint8 RGB image.

    Diverging colours on a fixed scale, so that images from different steps compare: -1 blue,
    0 white, +1 red; values outside ``[-1, 1]`` are clipped. Row ``i`` is query ``i``, column
    ``j`` target ``j``, so positive pairs lie on the diagonal.
    """
    if values.ndim != 2:
        raise ValueError(f"a heatmap needs a 2-D matrix, got shape {tuple(values.shape)}")
    if cell < 1:
        raise ValueError(f"cell must be >= 1 pixel, got {cell}")
    v = values.detach().float().clamp(-1, 1)
    positive, negative = v.clamp(min=0), (-v).clamp(min=0)
    # Towards red: green and blue fade; towards blue: red and green fade.
    rgb = torch.stack([1 - negative, 1 - positive - negative, 1 - positive])
    image = (rgb * 255).round().to(torch.uint8)
    return image.repeat_interleave(cell, 1).repeat_interleave(cell, 2)


class SimilarityHeatmap(ValidationSubsetCallback):
    """Writes the cosine similarities of the first validation queries and targets as an image (``diag/similarity``).

    Args:
        num_samples: Size of the fixed validation subset (the image is ``num_samples`` square).
        every_n_epochs: Write on every n-th validation run.
        cell: Pixels per matrix entry.
    """

    def __init__(self, num_samples: int = 64, every_n_epochs: int = 1, cell: int = 4) -> None:
        super().__init__(num_samples, every_n_epochs)
        if not isinstance(cell, int) or cell < 1:
            raise ValueError(f"SimilarityHeatmap.cell must be an integer >= 1, got {cell!r}")
        self.cell = cell

    def collect(self, pl_module: LightningModule, outputs: dict[str, Any], batch: dict[str, Any]) -> None:
        self.rows.add(query=outputs["query"].embedding.float(), target=outputs["target"].embedding.float())

    def report(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer = summary_writer(trainer, type(self).__name__)
        if writer is None:
            return
        similarity = self.rows.tensor("query") @ self.rows.tensor("target").T
        writer.add_image(TAG, render_heatmap(similarity, self.cell), global_step=logged_step(trainer), dataformats="CHW")
