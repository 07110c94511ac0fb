"""``ImageTextDataModule``: image-caption shards (``lame_pl.data.image_text``) for LaME.

The format (its layout, decode stage and collator) lives in ``lame_pl.data.image_text``; the
streaming, shuffling, epochs and skip counting are ``ShardDataModule``'s (``datamodules.base``).
"""

from __future__ import annotations

from typing import Any

from lame_pl.backbone import BackboneSpec
from lame_pl.data.image_text import DecodePairs, PairCollator
from lame_pl.data.skips import SkipCounter
from lame_pl.datamodules.base import ShardDataModule


class ImageTextDataModule(ShardDataModule):
    """WebDataset image-caption pairs, collated through the backbone's processor.

    The query is the image followed by ``query_instruction``, the target the caption. Every
    other argument (shards, batch sizes, workers, seeding, ``strict``, mixtures) is
    ``ShardDataModule``'s.

    Args:
        backbone: The backbone spec; its processor tokenizes and resizes (``self.processor``).
        query_instruction: Text after the image in each query.
        target_instruction: Text before the caption in each target.
        max_text_length: Most text tokens per query instruction or target.
        decoder_max_length: Most decoder tokens per caption, ``<|endoftext|>`` included.
        **kwargs: ``ShardDataModule``'s arguments.
    """

    def __init__(
        self,
        backbone: BackboneSpec,
        query_instruction: str = "Find the caption that describes this image.",
        target_instruction: str = "",
        max_text_length: int = 64,
        decoder_max_length: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        self.collator = PairCollator(
            self.processor, query_instruction, target_instruction, max_text_length, decoder_max_length
        )

    def decode_stage(self, skips: SkipCounter) -> DecodePairs:
        """Raw samples to ``{"key", "image", "text"}`` pairs."""
        return DecodePairs(skips, self.max_image_pixels)
