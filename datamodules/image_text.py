"""Streaming samples from WebDataset shards; ``ImageTextDataModule`` reads image-caption pairs.

``ShardDataModule`` holds what every shard format shares; a format supplies its decoding stage
and its collator (``datamodules.pairs`` for instruction pairs). Training resamples shards with replacement and shuffles samples in a buffer, for a fixed number
of batches per epoch; validation and test read every sample exactly once, in file order. Bad
samples are skipped and counted (``datamodules.samples``); ``callbacks.DataHealth`` logs them.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import webdataset as wds
from torch.utils.data import DataLoader

from datamodules.collate import PairCollator
from datamodules.samples import CountedBatches, DecodePairs, SkipCounter, TarSamples, WorkerShuffle
from datamodules.shards import MANIFEST, count_samples, expand_shards
from lame_pl.backbone import BackboneSpec, build_processor

ShardSpec = str | list[str] | None


class ShardDataModule(L.LightningDataModule):
    """Streams WebDataset shards of one sample format, collated through the backbone's processor.

    A subclass sets ``self.collator`` (samples to a batch) after calling this constructor and
    implements ``decode_stage`` (raw tar samples to decoded samples); the rest (shard lists,
    resampling, shuffling, epochs, skip counting) is shared.

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
        seed: Seed for shard resampling and buffer shuffling.
        strict: Stop at the first bad sample with a ``BadSampleError`` naming the shard, the key
            and the reason, instead of skipping and counting it (``batch["skipped"]``).
        max_image_pixels: Images with more pixels are skipped as ``image_too_large``, judged from
            the image header before decoding. PIL's own limit (``Image.MAX_IMAGE_PIXELS``, twice
            of which raises) still applies above it.
    """

    collator: Any

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
        seed: int = 0,
        strict: bool = False,
        max_image_pixels: int = 64_000_000,
    ) -> None:
        super().__init__()
        # Records the subclass's own arguments too: Lightning reads every __init__ frame of self.
        self.save_hyperparameters()
        for key, value, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                ("num_workers", num_workers, 0), ("shuffle_buffer", shuffle_buffer, 1),
                                ("samples_per_epoch", samples_per_epoch, 1), ("max_image_pixels", max_image_pixels, 1)):
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"data.{key} must be an integer >= {low}, got {value!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.strict = strict
        self.max_image_pixels = max_image_pixels
        # Expanded now, so that a wrong path fails at construction rather than minutes into a run.
        self.shards = {
            split: None if spec is None else expand_shards(spec, f"data.{split}_shards")
            for split, spec in (("train", train_shards), ("val", val_shards), ("test", test_shards))
        }
        self.samples_per_epoch = samples_per_epoch
        if self.shards["train"] is not None and samples_per_epoch is None:
            self.samples_per_epoch = count_samples(self.shards["train"])
            if self.samples_per_epoch is None:
                raise ValueError(
                    f"data.samples_per_epoch is not set and no {MANIFEST} beside data.train_shards "
                    f"{train_shards!r} lists every shard; set data.samples_per_epoch"
                )
        self.processor = build_processor(backbone)

    def decode_stage(self, skips: SkipCounter) -> wds.PipelineStage:
        """The stage from raw tar samples to decoded samples, counting bad ones in ``skips``.

        Its ``complete`` attribute (raw sample -> bool) tells ``TarSamples`` whether a sample
        next to damaged tar data still has every member it needs.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement decode_stage")

    def _urls(self, split: str) -> list[str]:
        urls = self.shards[split]
        if urls is None:
            raise ValueError(f"data.{split}_shards is not set; point it at the {split} shards")
        return urls

    def _shards_to_batches(
        self, batch_size: int, partial: bool, shuffle: wds.PipelineStage | None = None
    ) -> list[wds.PipelineStage]:
        """Stages from shard URLs to batches, sharing one counter that carries skips into the batches."""
        skips = SkipCounter(self.strict)
        decode = self.decode_stage(skips)
        return [
            TarSamples(skips, complete=decode.complete),
            # Raw bytes are shuffled, before decoding, as a decoded image takes far more memory.
            *([shuffle] if shuffle is not None else []),
            decode,
            CountedBatches(skips, batch_size, self.collator, partial=partial),
        ]

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def train_batches_per_worker(self) -> int:
        """Batches each loader worker yields per epoch (the main process counts as one worker)."""
        global_batches = max(1, self.samples_per_epoch // (self.batch_size * self._world_size()))
        return math.ceil(global_batches / max(1, self.num_workers))

    def train_dataloader(self) -> DataLoader:
        """Endless resampled stream cut into epochs of ``samples_per_epoch // batch_size`` batches."""
        urls = self._urls("train")
        per_worker = self.train_batches_per_worker()
        dataset = (
            wds.DataPipeline(
                # Resampling with a per-(rank, worker, epoch) seed: no node or worker split needed.
                wds.ResampledShards(urls, seed=self.seed, deterministic=True),
                *self._shards_to_batches(
                    self.batch_size, partial=False, shuffle=WorkerShuffle(self.shuffle_buffer, self.seed)
                ),
            )
            .with_epoch(per_worker)
            # A length lets Lightning show progress and size schedules (estimated_stepping_batches).
            .with_length(per_worker * max(1, self.num_workers), silent=True)
        )
        return DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=self.num_workers,
            # Persistent workers keep their pipeline, so the epoch counters behind the seeds advance.
            persistent_workers=self.num_workers > 0,
        )

    def _eval_dataloader(self, split: str) -> DataLoader:
        urls = self._urls(split)
        dataset = wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.split_by_node,
            wds.split_by_worker,
            # Bad samples are skipped but never silently: each batch reports them (or strict raises).
            *self._shards_to_batches(self.eval_batch_size, partial=True),
        )
        # Shards are split between workers, so workers beyond the shard count would idle.
        return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=min(self.num_workers, len(urls)))

    def val_dataloader(self) -> DataLoader:
        """Every validation sample once, in file order (per worker when ``num_workers > 1``)."""
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        """Every test sample once, in file order (per worker when ``num_workers > 1``)."""
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test split, for ``predict`` (embeddings of both sides, keyed by sample)."""
        return self._eval_dataloader("test")


class ImageTextDataModule(ShardDataModule):
    """WebDataset image-caption pairs, collated through the backbone's processor.

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
        query_instruction: Text after the image in each query.
        target_instruction: Text before the caption in each target.
        max_text_length: Most text tokens per query instruction or target.
        decoder_max_length: Most decoder tokens per caption, ``<|endoftext|>`` included.
        seed: Seed for shard resampling and buffer shuffling.
        strict: Stop at the first bad sample with a ``BadSampleError`` naming the shard, the key
            and the reason, instead of skipping and counting it (``batch["skipped"]``).
        max_image_pixels: Images with more pixels are skipped as ``image_too_large``, judged from
            the image header before decoding. PIL's own limit (``Image.MAX_IMAGE_PIXELS``, twice
            of which raises) still applies above it.
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
        query_instruction: str = "Find the caption that describes this image.",
        target_instruction: str = "",
        max_text_length: int = 64,
        decoder_max_length: int = 32,
        seed: int = 0,
        strict: bool = False,
        max_image_pixels: int = 64_000_000,
    ) -> None:
        super().__init__(backbone, train_shards, val_shards, test_shards, batch_size, eval_batch_size, num_workers,
                         shuffle_buffer, samples_per_epoch, seed, strict, max_image_pixels)
        self.collator = PairCollator(
            self.processor, query_instruction, target_instruction, max_text_length, decoder_max_length
        )

    def decode_stage(self, skips: SkipCounter) -> wds.PipelineStage:
        """Raw samples to ``{"key", "image", "text"}`` pairs."""
        return DecodePairs(skips, self.max_image_pixels)
