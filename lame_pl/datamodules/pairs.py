"""Streaming instruction pairs (VLM2Vec/MMEB-train shape) from WebDataset shards.

Each sample is ``KEY.json`` plus the media members it names, in the layout of
``lame_pl.data.instruction_pairs``, which also holds the format's decode stage and collator (written by ``tools/make_shards.py manifest`` and
``mmeb-train``): a query, a positive target and optional hard negatives, each with its own
instruction, text, images and video. Streaming, skipping and ``strict`` are those of
``datamodules.base.ShardDataModule``.
"""

from __future__ import annotations

from typing import Any, Literal

from lame_pl.backbone import BackboneSpec
from lame_pl.data.instruction_pairs import DECODER_LABELS, DecodeInstructionPairs, InstructionCollator
from lame_pl.data.skips import SkipCounter
from lame_pl.datamodules.base import ShardDataModule


class InstructionPairDataModule(ShardDataModule):
    """WebDataset instruction pairs, collated by ``InstructionCollator`` (hard negatives as ``batch["negative"]``).

    Every argument not listed here (shards, batch sizes, workers, seeding, ``strict``, mixtures)
    is ``ShardDataModule``'s.

    Args:
        backbone: The backbone spec; its processor tokenizes and resizes (``self.processor``).
        query_instruction: Instruction of the queries whose sample has an empty one.
        target_instruction: Instruction of the targets whose sample has an empty one, and of
            their hard negatives that have none either.
        max_text_length: Most tokens per instruction and per side's text.
        decoder_max_length: Most decoder tokens per label, ``<|endoftext|>`` included.
        decoder_label: What the latent decoder regenerates. ``target_text`` (default): the
            target's text; rows whose target has none (text-to-image, visual documents) are
            unlabelled and left out of the decoder loss. ``target_or_query_text``: the target's
            text, else the query's text, else unlabelled. Instructions never are labels.
        **kwargs: ``ShardDataModule``'s arguments.
    """

    def __init__(
        self,
        backbone: BackboneSpec,
        query_instruction: str = "",
        target_instruction: str = "",
        max_text_length: int = 64,
        decoder_max_length: int = 32,
        decoder_label: Literal["target_text", "target_or_query_text"] = "target_text",
        **kwargs: Any,
    ) -> None:
        if decoder_label not in DECODER_LABELS:
            raise ValueError(f"data.decoder_label must be one of {', '.join(DECODER_LABELS)}; got {decoder_label!r}")
        super().__init__(backbone, **kwargs)
        self.collator = InstructionCollator(
            self.processor, query_instruction, target_instruction, max_text_length, decoder_max_length, decoder_label
        )

    def decode_stage(self, skips: SkipCounter) -> DecodeInstructionPairs:
        """Raw samples to ``{"key", "query", "target", "negatives"}`` with decoded images and frames."""
        return DecodeInstructionPairs(skips, self.max_image_pixels)
