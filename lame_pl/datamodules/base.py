"""``ShardDataModule``: streaming samples of one format from WebDataset shards.

It holds what every shard format shares; a subclass supplies the format's decode stage and
collator (``lame_pl.data.image_text`` through ``datamodules.image_text``, ``lame_pl.data.instruction_pairs``
through ``datamodules.pairs``). Training resamples shards with
replacement (or, with ``resampled=False``, reads each shard once per epoch) and shuffles samples
in a buffer, for a fixed number of batches per epoch and rank; validation and test read every
sample exactly once, in file order. Bad samples are skipped and counted
(``datamodules.tar_reading``, ``lame_pl.data.skips``); ``callbacks.DataHealth`` logs them.

Seeds are functions of (seed, epoch, rank, worker): the training loader writes the epoch
(``trainer.current_epoch``, else ``set_epoch``, else one more than the last) into memory shared
with its persistent workers each time it is iterated. ``state_dict`` (saved in checkpoints) holds
the epoch and the batches this rank has consumed in it; see ``ShardDataModule.load_state_dict``
for what a resumed run sees.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import webdataset as wds
from torch.utils.data import DataLoader

from lame_pl.backbone import BackboneSpec, build_processor
from lame_pl.data.decoding import DecodeStage
from lame_pl.data.shard_writer import MANIFEST
from lame_pl.data.skips import DEFAULT_MAX_CONSECUTIVE_SKIPS, SkipCounter, name_shards
from lame_pl.datamodules.epoch_state import (
    EpochLoader,
    EpochShards,
    EpochState,
    EvalLoader,
    ShardList,
    SkipConsumed,
    WorkerShuffle,
)
from lame_pl.datamodules.mixture import ShardSet, WeightedMixture, expand_mixture
from lame_pl.datamodules.shards import count_samples, expand_shards, shard_sizes
from lame_pl.datamodules.tar_reading import DEFAULT_MAX_MEMBER_BYTES, CountedBatches, TarSamples

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
        resampled: Draw training shards with replacement (any shard count; ``samples_per_epoch``
            sets the epoch). False reads every shard once per epoch over all ranks and workers,
            and needs at least ``world_size * max(1, num_workers)`` shards; see
            ``train_batches_per_worker`` for its epoch length.
        train_mixture: Training shards as a weighted mixture of sets (``datamodules.mixture``),
            instead of ``train_shards``; needs ``resampled`` (sampling by weight draws with
            replacement). ``samples_per_epoch`` defaults to the sets' manifests added up; the sets
            share ``shuffle_buffer`` equally.
        mixture_root: Folder that the relative ``shards`` paths of ``train_mixture`` start from
            (absolute paths and URLs are kept), so that a config names each set once and a user
            sets one root; None: relative to the working directory.
        max_consecutive_skips: Training stops with ``NoGoodSamplesError`` naming the shards after
            this many skipped samples in a row with no good one (a loader worker would otherwise
            draw bad shards for ever). Validation and test read each shard once: a split (of a
            rank) with no good sample at all is that error, whatever its length.
        allow_missing_shards: Warn about shards a brace pattern names that do not exist, rather
            than refuse to start.
        max_member_bytes: Tar members larger than this are passed over unread and their sample
            skipped as ``member_too_large``.
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
        resampled: bool = True,
        train_mixture: list[ShardSet] | None = None,
        mixture_root: str | None = None,
        max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS,
        allow_missing_shards: bool = False,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    ) -> None:
        super().__init__()
        # Records the subclass's own arguments too: Lightning reads every __init__ frame of self.
        self.save_hyperparameters()
        for key, value, low in (
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 1),
            ("samples_per_epoch", samples_per_epoch, 1),
            ("max_image_pixels", max_image_pixels, 1),
            ("max_consecutive_skips", max_consecutive_skips, 1),
            ("max_member_bytes", max_member_bytes, 1),
        ):
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"data.{key} must be an integer >= {low}, got {value!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.strict = strict
        self.max_image_pixels = max_image_pixels
        self.max_consecutive_skips = max_consecutive_skips
        self.max_member_bytes = max_member_bytes
        # Expanded now, so that a wrong path fails at construction rather than minutes into a run.
        self.shards = {
            split: None if spec is None else expand_shards(spec, f"data.{split}_shards", allow_missing_shards)
            for split, spec in (("train", train_shards), ("val", val_shards), ("test", test_shards))
        }
        self.mixture: list[tuple[ShardSet, list[str]]] | None = None
        if mixture_root is not None and train_mixture is None:
            raise ValueError(
                "data.mixture_root is set but data.train_mixture is not; it only resolves the mixture's relative paths"
            )
        if train_mixture is not None:
            if train_shards is not None:
                raise ValueError("set data.train_shards or data.train_mixture, not both")
            if not resampled:
                raise ValueError(
                    "data.train_mixture samples its sets by weight, with replacement; it needs data.resampled true"
                )
            self.mixture = expand_mixture(train_mixture, mixture_root, allow_missing=allow_missing_shards)
            self.shards["train"] = [url for _, urls in self.mixture for url in urls]
        self.samples_per_epoch = samples_per_epoch
        if self.shards["train"] is not None and samples_per_epoch is None:
            self.samples_per_epoch = count_samples(self.shards["train"])
            if self.samples_per_epoch is None:
                where = "data.train_mixture's shards" if self.mixture else f"data.train_shards {train_shards!r}"
                raise ValueError(
                    f"data.samples_per_epoch is not set and no {MANIFEST} beside {where} "
                    "lists every shard; set data.samples_per_epoch"
                )
        self.resampled = resampled
        self._train_sizes: list[int] | None = None
        if self.shards["train"] is not None and not resampled:
            self._train_sizes = shard_sizes(self.shards["train"])
            self._check_train_shard_count()
        # Shared with the training workers; made on first use (it pickles only into a new process).
        self._epoch_state: EpochState | None = None
        self._next_epoch: int | None = None  # from set_epoch or load_state_dict
        self._epoch = -1
        self._batches = 0  # training batches this rank has taken in self._epoch
        self._resume: tuple[int, int] | None = None  # (epoch, batches) from load_state_dict
        self.processor = self.build_processor(backbone)

    def build_processor(self, backbone: Any) -> Any:
        """What turns samples into model inputs: the Qwen-VL processor of ``backbone``.

        A format for another model family (``datamodules.clip``) overrides it.
        """
        return build_processor(backbone)

    def decode_stage(self, skips: SkipCounter) -> DecodeStage:
        """The format's stage from raw tar samples to decoded samples, counting bad ones in ``skips``.

        Its ``complete`` attribute (raw sample -> bool) tells ``TarSamples`` whether a sample
        next to damaged tar data still has every member it needs.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement decode_stage")

    def set_decoder_output_ids(self, output_ids: list[int] | None) -> None:
        """The token ids a restricted decoder can emit (``decoder.vocab_file``); None: all of them.

        A row whose label needs another token is left out of the decoder loss and counted as
        ``decoder_unseen_token`` (with ``strict``, an error naming the shard and key). Call it
        before the loaders are made: workers take the collator with them.
        """
        setter = getattr(self.collator, "set_output_ids", None)
        if setter is None:
            raise TypeError(f"{type(self.collator).__name__} builds no decoder labels to restrict")
        setter(output_ids)

    def _urls(self, split: str) -> list[str]:
        urls = self.shards[split]
        if urls is None:
            raise ValueError(f"data.{split}_shards is not set; point it at the {split} shards")
        return urls

    def _shards_to_batches(
        self, batch_size: int, partial: bool, shuffle: wds.PipelineStage | None = None, split: str = "train"
    ) -> list[wds.PipelineStage | DecodeStage]:
        """Stages from shard URLs to batches, sharing one counter that carries skips into the batches."""
        skips = self._skip_counter(split)
        decode = self.decode_stage(skips)
        return [
            TarSamples(skips, complete=decode.complete, max_member_bytes=self.max_member_bytes),
            # Raw bytes are shuffled, before decoding, as a decoded image takes far more memory.
            *([shuffle] if shuffle is not None else []),
            decode,
            CountedBatches(skips, batch_size, self.collator, partial=partial),
        ]

    def _skip_counter(self, split: str) -> SkipCounter:
        # Only training streams are endless; evaluation checks for a split with no good sample.
        limit = self.max_consecutive_skips if split == "train" else None
        what = "data.train_mixture" if split == "train" and self.mixture else f"data.{split}_shards"
        return SkipCounter(self.strict, limit, what)

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        # Outside a Trainer, RANK and WORLD_SIZE (torchrun's) or an initialised process group.
        rank, world_size, _, _ = wds.utils.pytorch_worker_info()
        return rank, world_size

    def _world_size(self) -> int:
        return self._rank_and_world_size()[1]

    def _check_train_shard_count(self) -> None:
        """Non-resampled training needs a shard for every (rank, worker); say so before training."""
        urls = self.shards["train"]
        if self.resampled or urls is None:
            return
        slots = self._world_size() * max(1, self.num_workers)
        if len(urls) < slots:
            raise ValueError(
                f"data.train_shards has {len(urls)} shards, fewer than world_size x num_workers = "
                f"{self._world_size()} x {max(1, self.num_workers)} = {slots}, which data.resampled false "
                "needs; write more, smaller shards, lower data.num_workers, or set data.resampled true"
            )

    def setup(self, stage: str) -> None:
        """Checks the training shard count against the world size, known only now."""
        if stage == "fit":
            self._check_train_shard_count()

    def train_batches_per_worker(self) -> int:
        """Batches each loader worker yields per epoch (the main process counts as one worker).

        Resampled: ``samples_per_epoch`` split evenly over ranks and workers. Not resampled: what
        the unluckiest worker is sure to hold, ``floor(shards / (world_size * workers))`` of the
        smallest shard in ``manifest.json`` (else ``samples_per_epoch / shards``), in whole
        batches. Every rank must take the same number of steps, or DDP waits forever for the
        rank that ran out; so the workers with a spare shard leave its samples (and a partial
        batch) for later epochs, where the per-epoch shuffle deals the shards out differently.
        Bad samples are refilled from a second pass over the worker's shards.
        """
        workers = max(1, self.num_workers)
        if not self.resampled and self.shards["train"] is not None:
            urls = self.shards["train"]
            smallest = min(self._train_sizes) if self._train_sizes else self.samples_per_epoch // len(urls)
            held = len(urls) // (self._world_size() * workers) * smallest
            if held < self.batch_size:
                raise ValueError(
                    f"data.batch_size {self.batch_size} exceeds the {held} samples each training worker "
                    "is sure to hold with data.resampled false; lower it or data.num_workers"
                )
            return held // self.batch_size
        global_batches = max(1, self.samples_per_epoch // (self.batch_size * self._world_size()))
        return math.ceil(global_batches / workers)

    def set_epoch(self, epoch: int) -> None:
        """Seed the next iteration of the training loader with ``epoch`` (outside a Trainer)."""
        self._next_epoch = epoch

    def _start_epoch(self) -> int:
        """Called in the main process as the training loader is iterated: fix the epoch's seeds.

        Returns:
            The batches of this epoch taken before a resume, which the loader leaves out.
        """
        if self._next_epoch is not None:
            epoch, self._next_epoch = self._next_epoch, None
        elif self.trainer is not None:
            epoch = self.trainer.current_epoch
        else:
            epoch = self._epoch + 1
        resumed = 0
        if self._resume is not None and self._resume[0] == epoch:
            resumed = self._resume[1]
        self._resume = None
        self._epoch, self._batches = epoch, resumed
        assert self._epoch_state is not None
        self._epoch_state.set(epoch, resumed)
        return resumed

    def _took_batch(self) -> None:
        self._batches += 1

    def state_dict(self) -> dict[str, Any]:
        """The training epoch and the batches this rank has taken in it, for checkpoints."""
        return {"epoch": self._epoch, "batches": self._batches, "seed": self.seed, "resampled": self.resampled}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume in the saved epoch without starting it again from its first batch.

        When the training loader next starts that epoch (a Trainer resuming mid-epoch does), it
        carries on as follows. Resampled: the shard draw is re-seeded with the batches already
        taken, a fresh sample with replacement rather than a replay. Not resampled: the same shard
        order and shuffle as before, with the raw samples each worker had delivered skipped, so
        the epoch continues where it stopped (give or take the samples skipped as bad before the
        resume, which may be seen again); this holds when ``seed``, ``batch_size``,
        ``num_workers`` and the world size are unchanged. Another epoch starts afresh.
        """
        epoch, batches = int(state_dict.get("epoch", -1)), int(state_dict.get("batches", 0))
        if epoch >= 0:
            self._resume = (epoch, batches)
            self._epoch, self._batches = epoch, batches
            self._next_epoch = epoch if self.trainer is None else None

    def train_dataloader(self) -> DataLoader:
        """Training batches, ``train_batches_per_worker() * max(1, num_workers)`` per epoch and rank."""
        urls = self._urls("train")
        self._check_train_shard_count()
        per_worker = self.train_batches_per_worker()
        rank, world_size = self._rank_and_world_size()
        if self._epoch_state is None:
            self._epoch_state = EpochState()
        state = self._epoch_state
        if self.mixture is not None:
            pipeline = self._mixture_pipeline(state, rank, world_size)
        else:
            shuffle = WorkerShuffle(self.shuffle_buffer, self.seed, state, rank)
            stages = self._shards_to_batches(self.batch_size, partial=False, shuffle=shuffle)
            if not self.resampled:
                stages.insert(2, SkipConsumed(state, self.batch_size))
            pipeline = wds.DataPipeline(EpochShards(urls, self.seed, state, rank, world_size, self.resampled), *stages)
        dataset = (
            pipeline.with_epoch(per_worker)
            # A length lets Lightning show progress and size schedules (estimated_stepping_batches).
            .with_length(per_worker * max(1, self.num_workers), silent=True)
        )
        return EpochLoader(
            dataset,
            self._start_epoch,
            self._took_batch,
            f"data.train_mixture's shards {name_shards(urls)}"
            if self.mixture
            else f"data.train_shards {name_shards(urls)}",
            num_workers=self.num_workers,
            # Workers keep their pipeline; the epoch reaches them through the shared EpochState.
            persistent_workers=self.num_workers > 0,
        )

    def _mixture_pipeline(self, state: EpochState, rank: int, world_size: int) -> wds.DataPipeline:
        """One resampled stream per set (shards to decoded samples), interleaved by weight, then batched."""
        assert self.mixture is not None
        skips = self._skip_counter("train")
        streams = []
        # The sets share data.shuffle_buffer, so a mixture of many sets holds no more raw samples
        # per worker than one set would.
        buffer = max(1, self.shuffle_buffer // len(self.mixture))
        for i, (_, urls) in enumerate(self.mixture):
            seed = f"{self.seed}-set{i}"  # independent draws per set
            decode = self.decode_stage(skips)
            streams.append(
                wds.DataPipeline(
                    EpochShards(urls, seed, state, rank, world_size, resampled=True),
                    TarSamples(skips, complete=decode.complete, max_member_bytes=self.max_member_bytes),
                    WorkerShuffle(buffer, seed, state, rank),
                    decode,
                )
            )
        sets = [item for item, _ in self.mixture]
        return wds.DataPipeline(
            WeightedMixture(streams, sets, self.batch_size, self.seed, state, rank),
            CountedBatches(skips, self.batch_size, self.collator, partial=False),
        )

    def _eval_dataloader(self, split: str) -> DataLoader:
        # Split by rank here, in the main process, which knows its rank under any start method
        # (a spawned worker may not see the process group); then by worker inside the loader.
        rank, world_size = self._rank_and_world_size()
        urls = self._urls(split)[rank::world_size]
        dataset = wds.DataPipeline(
            ShardList(urls),
            wds.split_by_worker,
            # Bad samples are skipped but never silently: each batch reports them (or strict raises).
            *self._shards_to_batches(self.eval_batch_size, partial=True, split=split),
        )
        # Shards are split between workers, so workers beyond the shard count would idle.
        return EvalLoader(dataset, f"data.{split}_shards", urls, num_workers=min(self.num_workers, len(urls)))

    def val_dataloader(self) -> DataLoader | list:
        """Every validation sample once, in file order (per worker when ``num_workers > 1``).

        Without ``val_shards`` a fit runs without validation (no loader), rather than failing.
        """
        if self.shards["val"] is None:
            return []
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        """Every test sample once, in file order (per worker when ``num_workers > 1``)."""
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test split, for ``predict`` (embeddings of both sides, keyed by sample)."""
        return self._eval_dataloader("test")
