"""Streaming instruction pairs (VLM2Vec/MMEB-train shape) from WebDataset shards.

Each sample is ``KEY.json`` plus the image members it names, as ``tools/make_shards.py manifest``
writes them: a query (instruction, text, optional image), a positive target (text and/or image)
and optional hard negatives. Streaming, skipping and ``strict`` are those of
``datamodules.image_text.ShardDataModule``.
"""

from __future__ import annotations

import webdataset as wds

from datamodules.collate import InstructionCollator
from datamodules.image_text import ShardDataModule, ShardSpec
from datamodules.mixture import ShardSet
from datamodules.samples import DecodeInstructionPairs, SkipCounter
from lame_pl.backbone import BackboneSpec


class InstructionPairDataModule(ShardDataModule):
    """WebDataset instruction pairs, collated by ``InstructionCollator`` (hard negatives as ``batch["negative"]``).

    Args:
        backbone: The backbone spec; its processor tokenizes and resizes (``self.processor``).
        train_shards: Training shards: brace pattern, glob, directory or list of those.
        val_shards: Validation shards, same forms.
        test_shards: Test shards, same forms.
        batch_size: Training batch size per device.
        eval_batch_size: Validation/test batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes; 0 loads in the main process.
        shuffle_buffer: Samples held in the training shuffle buffer.
        samples_per_epoch: Training samples per epoch over all devices; defaults to the total in
            the ``manifest.json`` beside the training shards.
        query_instruction: Instruction for the queries whose sample has an empty one.
        target_instruction: Text before the text of each target and hard negative.
        max_text_length: Most tokens per instruction and per side's text.
        decoder_max_length: Most decoder tokens per target text, ``<|endoftext|>`` included.
        seed: Seed for shard resampling and buffer shuffling.
        strict: Stop at the first bad sample with a ``BadSampleError`` naming the shard, the key
            and the reason, instead of skipping and counting it (``batch["skipped"]``).
        max_image_pixels: Images with more pixels are skipped as ``image_too_large``, judged from
            the image header before decoding.
        resampled: Draw training shards with replacement (True) or read each once per epoch
            (False); see ``ShardDataModule``.
        train_mixture: Training shards as a weighted mixture of sets, instead of
            ``train_shards`` (see ``datamodules.mixture``).
    """

    def __init__(
        self,
        backbone: BackboneSpec,
        train_shards: ShardSpec = None,
        val_shards: ShardSpec = None,
        test_shards: ShardSpec = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 1,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        query_instruction: str = "",
        target_instruction: str = "",
        max_text_length: int = 64,
        decoder_max_length: int = 32,
        seed: int = 0,
        strict: bool = False,
        max_image_pixels: int = 64_000_000,
        resampled: bool = True,
        train_mixture: list[ShardSet] | None = None,
    ) -> None:
        super().__init__(backbone, train_shards, val_shards, test_shards, batch_size, eval_batch_size, num_workers,
                         shuffle_buffer, samples_per_epoch, seed, strict, max_image_pixels, resampled,
                         train_mixture=train_mixture)
        self.collator = InstructionCollator(
            self.processor, query_instruction, target_instruction, max_text_length, decoder_max_length
        )

    def decode_stage(self, skips: SkipCounter) -> wds.PipelineStage:
        """Raw samples to ``{"key", "query", "target", "negatives"}`` with decoded images."""
        return DecodeInstructionPairs(skips, self.max_image_pixels)
