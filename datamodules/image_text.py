"""Streaming image-caption pairs from WebDataset shards.

Training resamples shards with replacement and shuffles samples in a buffer, for a fixed number
of batches per epoch; validation and test read every sample exactly once, in file order.
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
from collections.abc import Iterator
from typing import Any

import lightning as L
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import DataLoader

from datamodules.collate import PairCollator
from lame_pl.backbone import BackboneSpec, build_processor

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
MANIFEST = "manifest.json"
ShardSpec = str | list[str] | None


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(spec: str | list[str], key: str) -> list[str]:
    """Expand a shard spec into a list of shard paths or URLs.

    Args:
        spec: A brace pattern (``data/train/shard-{000000..000005}.tar``), a glob, a directory
            (all ``*.tar`` inside, sorted), a single file, or a list of those.
        key: The config key the spec came from, named in errors (e.g. ``data.train_shards``).

    Raises:
        ValueError: When a pattern matches no file or a directory holds no ``.tar``.
        FileNotFoundError: When a named directory or file does not exist.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise ValueError(f"{key} is an empty list; give a shard pattern, a glob or a directory")
    urls: list[str] = []
    for item in specs:
        item = os.path.expanduser(str(item))
        if _is_remote(item):
            urls.extend(braceexpand(item))  # cannot be checked from here; the loader will say
        elif os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.tar")))
            if not found:
                raise ValueError(f"{key} directory {item!r} holds no .tar shard")
            urls.extend(found)
        elif any(c in item for c in "{*?["):
            candidates = [p for pattern in braceexpand(item) for p in sorted(glob.glob(pattern))]
            if not candidates:
                raise ValueError(f"{key} {item!r} matches no shard file")
            urls.extend(candidates)
        elif item.endswith(("/", os.sep)) or not os.path.splitext(item)[1]:
            raise FileNotFoundError(f"{key} directory {item!r} does not exist")
        elif not os.path.isfile(item):
            raise FileNotFoundError(f"{key} shard file {item!r} does not exist")
        else:
            urls.append(item)
    return urls


def count_samples(urls: list[str]) -> int | None:
    """Total samples in ``urls`` from the ``manifest.json`` beside them, or None if any is not listed."""
    manifests: dict[str, dict[str, int]] = {}
    total = 0
    for url in urls:
        if _is_remote(url):
            return None
        folder, name = os.path.split(os.path.abspath(url))
        if folder not in manifests:
            path = os.path.join(folder, MANIFEST)
            try:
                with open(path) as f:
                    manifest = json.load(f)
                manifests[folder] = {s["url"]: int(s["num_samples"]) for s in manifest["shards"]}
            except (OSError, ValueError, KeyError, TypeError):
                manifests[folder] = {}
        if name not in manifests[folder]:
            return None
        total += manifests[folder][name]
    return total


def _to_pair(sample: dict[str, Any]) -> dict[str, Any]:
    """A decoded WebDataset sample as ``{"key", "image", "text"}``."""
    image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image is None or "txt" not in sample:
        raise ValueError(
            f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r} lacks an image "
            f"({'/'.join(IMAGE_EXTENSIONS)}) or a caption (txt); it has {sorted(k for k in sample if not k.startswith('__'))}"
        )
    return {"key": sample["__key__"], "image": image, "text": sample["txt"]}


class _WorkerShuffle(wds.PipelineStage):
    """Buffer shuffle seeded by (seed, rank, worker, epoch): reproducible, yet different per worker and epoch."""

    def __init__(self, bufsize: int, seed: int) -> None:
        self.bufsize = bufsize
        self.seed = seed
        self.epoch = -1

    def run(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        # With persistent workers each worker keeps this object, so the count advances per epoch.
        self.epoch += 1
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{self.seed}-{rank}-{worker}-{self.epoch}")
        return wds.filters.shuffle(self.bufsize, initial=min(self.bufsize, 100), rng=rng)(src)


class ImageTextDataModule(L.LightningDataModule):
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for key, value, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                ("num_workers", num_workers, 0), ("shuffle_buffer", shuffle_buffer, 1),
                                ("samples_per_epoch", samples_per_epoch, 1)):
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"data.{key} must be an integer >= {low}, got {value!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
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
        self.collator = PairCollator(
            self.processor, query_instruction, target_instruction, max_text_length, decoder_max_length
        )

    def _urls(self, split: str) -> list[str]:
        urls = self.shards[split]
        if urls is None:
            raise ValueError(f"data.{split}_shards is not set; point it at the {split} shards")
        return urls

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
                wds.tarfile_to_samples(handler=wds.warn_and_continue),
                _WorkerShuffle(self.shuffle_buffer, self.seed),
                wds.decode("pil", handler=wds.warn_and_continue),
                wds.map(_to_pair, handler=wds.warn_and_continue),
                wds.batched(self.batch_size, collation_fn=self.collator, partial=False),
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
            # Errors are raised, not skipped: an evaluation that silently drops samples is wrong.
            wds.tarfile_to_samples(),
            wds.decode("pil"),
            wds.map(_to_pair),
            wds.batched(self.eval_batch_size, collation_fn=self.collator, partial=True),
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
