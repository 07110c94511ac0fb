"""The query-target cosine similarity matrix of a fixed validation subset, as a TensorBoard image."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning import LightningModule, Trainer
from PIL import Image, ImageDraw, ImageFont

from lame_pl.callbacks.tensorboard_writer import logged_step, summary_writer
from lame_pl.callbacks.validation_subset import ValidationSubsetCallback
from lame_pl.eval_output import EvalOutput

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


# The figure's frame around the matrix, in pixels: room for the axis labels (PIL's default font,
# about 11 px high) and, right of the matrix, the colour scale and its tick labels.
LABEL_BAND = 16
SCALE_GAP, SCALE_WIDTH, TICK_BAND = 8, 10, 28
TICKS = ((1.0, "+1"), (0.0, "0"), (-1.0, "-1"))


def figure_size(rows: int, columns: int, cell: int = 4) -> tuple[int, int]:
    """``(height, width)`` in pixels of ``heatmap_figure`` for a ``rows x columns`` matrix."""
    return LABEL_BAND + rows * cell + LABEL_BAND // 2, LABEL_BAND + columns * cell + SCALE_GAP + SCALE_WIDTH + TICK_BAND


def heatmap_figure(values: torch.Tensor, cell: int = 4) -> torch.Tensor:
    """``render_heatmap`` framed as a figure: axis labels and a colour scale, as a ``(3, H, W)`` uint8 image.

    "targets" runs along the top (column ``j``), "queries" down the left (row ``i``); right of
    the matrix a bar shows the colours from +1 (top) to -1 (bottom), the cosine similarity they
    stand for. The size is ``figure_size``: fixed for a matrix size, so steps compare.
    """
    matrix = render_heatmap(values, cell)
    rows, columns = values.shape
    height, width = figure_size(rows, columns, cell)
    top, left = LABEL_BAND, LABEL_BAND
    canvas = Image.new("RGB", (width, height), "white")
    canvas.paste(Image.fromarray(matrix.permute(1, 2, 0).numpy()), (left, top))
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(canvas)
    draw.text((left + columns * cell // 2, top // 2), "targets", fill="black", font=font, anchor="mm")
    # The row axis label, written horizontally and turned a quarter to read bottom-up.
    label = Image.new("RGB", (rows * cell, LABEL_BAND), "white")
    ImageDraw.Draw(label).text((rows * cell // 2, LABEL_BAND // 2), "queries", fill="black", font=font, anchor="mm")
    canvas.paste(label.rotate(90, expand=True), (0, top))
    # The colour scale: one row per pixel of the matrix's height, +1 at the top.
    bar_left = left + columns * cell + SCALE_GAP
    scale = torch.linspace(1.0, -1.0, rows * cell)[:, None].expand(-1, SCALE_WIDTH)
    canvas.paste(Image.fromarray(render_heatmap(scale, 1).permute(1, 2, 0).numpy()), (bar_left, top))
    draw.rectangle((bar_left - 1, top - 1, bar_left + SCALE_WIDTH, top + rows * cell), outline="black")
    for value, text in TICKS:
        y = top + round((1.0 - value) / 2 * (rows * cell - 1))
        draw.line((bar_left + SCALE_WIDTH, y, bar_left + SCALE_WIDTH + 3, y), fill="black")
        draw.text((bar_left + SCALE_WIDTH + 5, y), text, fill="black", font=font, anchor="lm")
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


class SimilarityHeatmap(ValidationSubsetCallback):
    """Writes the cosine similarities of the first validation queries and targets as an image (``diag/similarity``).

    The image is ``heatmap_figure``'s: the matrix (queries down, targets across, positive pairs
    on the diagonal) with its axis labels and a colour scale from -1 (blue) to +1 (red).

    Args:
        num_samples: Size of the fixed validation subset (the image is ``num_samples`` square).
        every_n_epochs: Write on every n-th validation run.
        cell: Pixels per matrix entry (the matrix is ``num_samples * cell`` square inside the figure).
    """

    def __init__(self, num_samples: int = 64, every_n_epochs: int = 1, cell: int = 4) -> None:
        super().__init__(num_samples, every_n_epochs)
        if not isinstance(cell, int) or cell < 1:
            raise ValueError(f"SimilarityHeatmap.cell must be an integer >= 1, got {cell!r}")
        self.cell = cell

    def collect(self, pl_module: LightningModule, outputs: EvalOutput, batch: dict[str, Any]) -> None:
        self.rows.add(query=outputs.query.embedding.float(), target=outputs.target.embedding.float())

    def report(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer = summary_writer(trainer, type(self).__name__)
        if writer is None:
            return
        similarity = self.rows.tensor("query") @ self.rows.tensor("target").T
        writer.add_image(
            TAG, heatmap_figure(similarity, self.cell), global_step=logged_step(trainer), dataformats="CHW"
        )
