"""The TensorBoard projector for a fixed validation subset: queries and targets in one space."""

from __future__ import annotations

from typing import Any

import torch
from lightning import LightningModule, Trainer

from lame_pl.callbacks.tensorboard_writer import logged_step, summary_writer
from lame_pl.callbacks.thumbnails import side_thumbnails
from lame_pl.callbacks.validation_subset import ValidationSubsetCallback
from lame_pl.eval_output import DiagnosedModule, EvalOutput

TAG = "val_subset"
HEADER = ["side", "key", "text"]


def _cell(text: Any) -> str:
    # The projector's metadata is TSV: a tab or newline inside a caption would shift the columns.
    return " ".join(str(text).split()) or "-"


class EmbeddingProjector(ValidationSubsetCallback):
    """Adds the first validation queries and targets to the TensorBoard projector (``add_embedding``).

    Rows are the ``num_samples`` queries and then their ``num_samples`` targets, with metadata
    columns ``side`` (query/target), ``key`` and ``text`` (the target's text, on both rows of a
    pair, so hovering over an image shows its caption), and thumbnails of the images each side
    saw (rows without an image show a grey tile). The projector data goes under the logger's run
    folder (``projector_config.pbtxt`` and ``<step>/val_subset/``).

    Args:
        num_samples: Size of the fixed validation subset.
        every_n_epochs: Write on every n-th validation run.
        thumbnail_size: Side of each thumbnail in pixels; 0 writes no thumbnails.
    """

    def __init__(self, num_samples: int = 64, every_n_epochs: int = 1, thumbnail_size: int = 32) -> None:
        super().__init__(num_samples, every_n_epochs)
        if not isinstance(thumbnail_size, int) or not 0 <= thumbnail_size <= 128:
            raise ValueError(
                f"EmbeddingProjector.thumbnail_size must be an integer in [0, 128], got {thumbnail_size!r}"
            )
        self.thumbnail_size = thumbnail_size

    def collect(self, pl_module: DiagnosedModule, outputs: EvalOutput, batch: dict[str, Any]) -> None:
        rows = len(outputs.keys)
        texts = outputs.texts or [""] * rows
        columns: dict[str, Any] = {
            "query": outputs.query.embedding.float(),
            "target": outputs.target.embedding.float(),
            "keys": list(outputs.keys),
            "texts": list(texts),
        }
        if self.thumbnail_size:
            backbone = pl_module.encoder.backbone
            image_token_id = backbone.config.image_token_id
            for side in ("query", "target"):
                columns[f"{side}_thumbnail"] = side_thumbnails(
                    batch[side], backbone.config.vision_config, image_token_id, self.thumbnail_size
                )
        self.rows.add(**columns)

    def report(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer = summary_writer(trainer, type(self).__name__)
        if writer is None:
            return
        keys, texts = self.rows.values("keys"), self.rows.values("texts")
        metadata = [["query", _cell(k), _cell(t)] for k, t in zip(keys, texts, strict=True)]
        metadata += [["target", _cell(k), _cell(t)] for k, t in zip(keys, texts, strict=True)]
        embeddings = torch.cat([self.rows.tensor("query"), self.rows.tensor("target")])
        thumbnails = None
        if self.thumbnail_size:
            thumbnails = torch.cat([self.rows.tensor("query_thumbnail"), self.rows.tensor("target_thumbnail")])
        writer.add_embedding(
            embeddings,
            metadata=metadata,
            metadata_header=HEADER,
            label_img=thumbnails,
            global_step=logged_step(trainer),
            tag=TAG,
        )
