"""Streaming instruction pairs (VLM2Vec/MMEB-train shape) from WebDataset shards.

Each sample is ``KEY.json`` plus the image members it names, as ``tools/make_shards.py manifest``
writes them: a query (instruction, text, optional image), a positive target (text and/or image)
and optional hard negatives. Streaming, skipping and ``strict`` are those of
``datamodules.image_text.ShardDataModule``.
"""

from __future__ import annotations

from typing import Any

import webdataset as wds

from datamodules.collate import InstructionCollator
from datamodules.image_text import ShardDataModule
from datamodules.samples import DecodeInstructionPairs, SkipCounter
from lame_pl.backbone import BackboneSpec


class InstructionPairDataModule(ShardDataModule):
    """WebDataset instruction pairs, collated by ``InstructionCollator`` (hard negatives as ``batch["negative"]``).

    Every argument not listed here (shards, batch sizes, workers, seeding, ``strict``, mixtures)
    is ``ShardDataModule``'s.

    Args:
        backbone: The backbone spec; its processor tokenizes and resizes (``self.processor``).
        query_instruction: Instruction for the queries whose sample has an empty one.
        target_instruction: Text before the text of each target and hard negative.
        max_text_length: Most tokens per instruction and per side's text.
        decoder_max_length: Most decoder tokens per target text, ``<|endoftext|>`` included.
        **kwargs: ``ShardDataModule``'s arguments.
    """

    def __init__(
        self,
        backbone: BackboneSpec,
        query_instruction: str = "",
        target_instruction: str = "",
        max_text_length: int = 64,
        decoder_max_length: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, **kwargs)
        self.collator = InstructionCollator(
            self.processor, query_instruction, target_instruction, max_text_length, decoder_max_length
        )

    def decode_stage(self, skips: SkipCounter) -> wds.PipelineStage:
        """Raw samples to ``{"key", "query", "target", "negatives"}`` with decoded images."""
        return DecodeInstructionPairs(skips, self.max_image_pixels)
